"""The framework adapters as a whole: optional imports, the extras named, the examples."""

import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._op_cases import normal

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"


def run_python(code):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_import_jaxbn_imports_no_framework():
    code = (
        "import sys, jaxbn, jaxbn._frameworks\n"
        "loaded = sorted({'flax', 'equinox'} & set(sys.modules))\n"
        "sys.exit(f'imported {loaded}' if loaded else 0)"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("jaxbn.nnx", "flax", "flax"),
        ("jaxbn.linen", "flax", "flax"),
        ("jaxbn.interop", "flax", "flax"),
        ("jaxbn.equinox", "equinox", "equinox"),
    ],
)
def test_adapter_without_its_framework_names_the_extra(module, blocked, extra, monkeypatch):
    # sys.modules[name] = None makes "import name" fail as if it were not installed. The
    # adapters are imported afresh; monkeypatch puts the modules loaded before back.
    for name in [blocked, *(m for m in sys.modules if m.startswith(f"{blocked}."))]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("jaxbn.nnx", "jaxbn.linen", "jaxbn.interop", "jaxbn.equinox"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(ImportError) as info:
        importlib.import_module(module)
    message = str(info.value)
    assert f'pip install "jaxbn[{extra}]"' in message
    assert module in message or module.replace("interop", "linen") in message


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "framework", "peer_flag"),
    [("train_nnx", "flax", "--flax"), ("train_equinox", "equinox", "--equinox")],
)
def test_example_trains_and_equals_the_framework_own_batch_norm(name, framework, peer_flag):
    pytest.importorskip(framework)
    example = _load(name)
    argv = ["--steps", "30", "--batch-size", "32", "--hidden", "32"]
    ours = example.main(argv)
    assert ours["steps"] == 30 and len(ours["train_loss"]) == 30
    # Thirty steps already beat chance (10%) by far on the digits.
    assert ours["test_accuracy"] > 0.5
    assert np.mean(ours["train_loss"][-5:]) < np.mean(ours["train_loss"][:5])
    # The same run with the framework's own batch norm: the same training losses
    # (jaxbn is a drop-in), up to float32 rounding grown over the steps.
    theirs = example.main([*argv, peer_flag])
    np.testing.assert_allclose(ours["train_loss"], theirs["train_loss"], rtol=1e-3, atol=1e-4)


def _nnx_run(x, dtype):
    from flax import nnx

    from jaxbn import nnx as bn_nnx

    model = bn_nnx.BatchNorm(x.shape[-1], momentum=0.9, dtype=dtype, rngs=nnx.Rngs(0))
    ct = normal(1, x.shape)

    def loss(model, x, mask):
        y = model(x, use_running_average=False, mask=mask)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    mask = np.arange(x.shape[0])[:, None] > 0
    dx, y = nnx.grad(loss, argnums=1, has_aux=True)(model, x, mask)
    return y, dx, model(x, use_running_average=True), nnx.state(model, nnx.BatchStat)


def _linen_run(x, dtype):
    from jaxbn import linen as bn_linen

    module = bn_linen.BatchNorm(momentum=0.9, dtype=dtype)
    variables = module.init(jax.random.key(0), x, use_running_average=False)
    ct = normal(1, x.shape)

    def loss(x, mask):
        y, updates = module.apply(
            variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"]
        )
        return jnp.sum(y.astype(jnp.float32) * ct), (y, updates)

    mask = np.arange(x.shape[0])[:, None] > 0
    dx, (y, updates) = jax.grad(loss, has_aux=True)(x, mask)
    y_eval = module.apply({**variables, **updates}, x, use_running_average=True)
    return y, dx, y_eval, updates


def _equinox_run(x, dtype):
    import equinox as eqx

    from jaxbn import equinox as bn_eqx

    model, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(
        x.shape[-1], "batch", momentum=0.9, dtype=dtype
    )
    ct = normal(1, x.shape)

    def run(model, x, state):
        return jax.vmap(model, (0, None), (0, None), axis_name="batch")(x, state)

    def loss(x):
        y, new_state = run(model, x, state)
        return jnp.sum(y.astype(jnp.float32) * ct), (y, new_state)

    dx, (y, state) = jax.grad(loss, has_aux=True)(x)
    return y, dx, run(eqx.nn.inference_mode(model), x, state)[0], state


STRICT_RUNS = {
    "nnx": ("flax", _nnx_run),
    "linen": ("flax", _linen_run),
    "equinox": ("equinox", _equinox_run),
}


@pytest.mark.parametrize(
    ("x_dtype", "dtype"),
    [(jnp.bfloat16, None), (jnp.float32, jnp.bfloat16)],
    ids=["x_bf16", "dtype_bf16"],
)
@pytest.mark.parametrize("framework", list(STRICT_RUNS))
def test_adapters_work_under_strict_promotion(framework, x_dtype, dtype, assert_trees_close):
    """Strict dtype promotion and rank promotion "raise": the same results as without.

    The adapters promote on purpose (their framework's output dtype; a bfloat16
    input, float32 params or statistics), so nothing is left to implicit promotion.
    For Equinox ``dtype`` is the weights' and the statistics' dtype.
    """
    package, run = STRICT_RUNS[framework]
    pytest.importorskip(package)
    x = (2.0 * normal(0, (8, 3)) + 1.0).astype(x_dtype)
    expected = run(x, dtype)
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        got = run(x, dtype)
    dtypes = [[jnp.result_type(v) for v in jax.tree.leaves(t)] for t in (got, expected)]
    assert dtypes[0] == dtypes[1]
    assert_trees_close(got, expected, tol=0.0)

"""Data-parallel training on 8 forced CPU devices.

The reference everywhere is single-device training on the same global batch: a
data-parallel step, loop or run must reproduce it to float32 rounding.
"""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxbn.data import make_blobs
from jaxbn.mlp import MLP
from jaxbn.train import (
    cross_entropy,
    data_mesh,
    fit,
    init_train_state,
    make_train_loop,
    make_train_step,
)

if jax.device_count() < 8:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs 8 devices (XLA_FLAGS)", allow_module_level=True)

RTOL, ATOL = 1e-5, 1e-6
DEVICES = [1, 8]  # one device and all; 2 and 4 are the two-axis mesh and the other tests
BLOBS = make_blobs(num_examples=400, num_features=8, num_classes=3, separation=1.0, seed=0)
MODEL = MLP((8, 16, 16, 3), activation="sigmoid")
OPT = optax.sgd(0.1, momentum=0.9)
BATCH = 32
EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"


def _data(leaf) -> np.ndarray:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf, np.float64)


def _pairs(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    return zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)


def _max_diff(got, want) -> float:
    """Largest absolute difference between two trees of arrays (keys by their data)."""
    return max(
        float(np.max(np.abs(_data(a) - _data(b)), initial=0.0)) for a, b in _pairs(got, want)
    )


def _close(got, want):
    for a, b in _pairs(got, want):
        np.testing.assert_allclose(_data(a), _data(b), rtol=RTOL, atol=ATOL)


def _replicated(tree, n):
    for leaf in jax.tree.leaves(tree):
        assert leaf.sharding.is_fully_replicated
        assert len(leaf.sharding.device_set) == n


def _start():
    """A train state a few steps in (non-trivial running stats and momentum)."""
    ts = init_train_state(MODEL, OPT, jax.random.key(0))
    ts, _ = make_train_loop(MODEL, OPT, batch_size=BATCH)(ts, BLOBS.x_train, BLOBS.y_train, 3)
    return ts


def _global_batch(seed=1):
    idx = np.random.default_rng(seed).choice(BLOBS.x_train.shape[0], BATCH, replace=False)
    return jnp.asarray(BLOBS.x_train[idx]), jnp.asarray(BLOBS.y_train[idx])


@pytest.mark.parametrize("n", DEVICES, ids=lambda n: f"{n}dev")
def test_step_equals_single_device_step(n):
    ts, batch = _start(), _global_batch()
    args = (ts.params, ts.state, ts.opt_state, batch)
    want = jax.jit(make_train_step(MODEL, OPT))(*args)
    got = jax.jit(make_train_step(MODEL, OPT, mesh=data_mesh(n)))(*args)
    _close(got, want)  # params, state, opt_state, metrics
    _replicated(got, n)
    print(f"step {n} devices: max |diff| {_max_diff(got, want):.3g}")


def test_gradient_is_the_global_batch_gradient():
    """With plain SGD at rate 1 the update is minus the gradient; compare with jax.grad."""
    ts, (x, labels) = _start(), _global_batch(2)
    sgd = optax.sgd(1.0)

    def global_loss(params):
        logits, _ = MODEL.apply(params, ts.state, x, training=True)
        return cross_entropy(logits, labels)

    want = jax.jit(jax.grad(global_loss))(ts.params)
    step = jax.jit(make_train_step(MODEL, sgd, mesh=data_mesh(8)))
    new_params, _, _, _ = step(ts.params, ts.state, sgd.init(ts.params), (x, labels))
    got = jax.tree.map(lambda old, new: old - new, ts.params, new_params)
    _close(got, want)


def test_synchronization_matters():
    """The mesh step equals the per-device body with a synchronized model, by hand,
    and differs from per-device statistics."""
    ts, batch = _start(), _global_batch()
    mesh = data_mesh(4)
    specs = (P(), P(), P(), P("data"))
    args = jax.device_put(
        (ts.params, ts.state, ts.opt_state, batch),
        tuple(jax.NamedSharding(mesh, s) for s in specs),
    )
    synced = jax.jit(make_train_step(MODEL, OPT, mesh=mesh))(*args)
    body = make_train_step(dataclasses.replace(MODEL, axis_name="data"), OPT, axis_name="data")
    by_hand = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=P()))(*args)
    _close(by_hand, synced)
    local = make_train_step(MODEL, OPT, axis_name="data")
    # Each device keeps its own running statistics: state comes back stacked.
    out_specs = (P(), P("data"), P(), P())
    unsynced = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs))(*args)
    assert unsynced[1]["layers"][0]["batch_norm"]["mean"].shape == (4 * 16,)
    assert _max_diff(unsynced[0], synced[0]) > 1e-4


@pytest.mark.parametrize("n", DEVICES, ids=lambda n: f"{n}dev")
def test_scan_loop_equals_single_device_loop(n):
    ts = init_train_state(MODEL, OPT, jax.random.key(3))
    data = (BLOBS.x_train, BLOBS.y_train)
    want = make_train_loop(MODEL, OPT, batch_size=BATCH)(ts, *data, 15)
    got = make_train_loop(MODEL, OPT, batch_size=BATCH, mesh=data_mesh(n))(ts, *data, 15)
    _close(got, want)
    _replicated(got, n)
    assert int(got[0].step) == 15
    print(f"loop {n} devices: max |diff| {_max_diff(got, want):.3g}")


def test_step_by_step_loop_on_a_mesh_equals_the_scan_on_one_device():
    ts = init_train_state(MODEL, OPT, jax.random.key(3))
    data = (BLOBS.x_train, BLOBS.y_train)
    want = make_train_loop(MODEL, OPT, batch_size=BATCH)(ts, *data, 15)
    run = make_train_loop(MODEL, OPT, batch_size=BATCH, mesh=data_mesh(4), scan=False)
    got = run(ts, *data, 15)
    _close(got, want)
    _replicated(got, 4)


def test_fit_on_a_two_axis_mesh():
    mesh = jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices())
    kwargs = dict(steps=12, batch_size=BATCH, key=jax.random.key(4), chunk_size=5)
    want = fit(MODEL, OPT, BLOBS.x_train, BLOBS.y_train, **kwargs)
    got = fit(MODEL, OPT, BLOBS.x_train, BLOBS.y_train, mesh=mesh, **kwargs)
    _close(got, want)


def test_checkpoint_from_four_devices_resumes_on_one(tmp_path):
    kwargs = dict(batch_size=BATCH, key=jax.random.key(5), chunk_size=5)
    data = (BLOBS.x_train, BLOBS.y_train)
    want = fit(MODEL, OPT, *data, steps=10, **kwargs)
    path = tmp_path / "ckpt.npz"
    fit(MODEL, OPT, *data, steps=5, checkpoint_path=path, mesh=data_mesh(4), **kwargs)
    got = fit(MODEL, OPT, *data, steps=10, checkpoint_path=path, resume=True, **kwargs)
    _close(got, want)


NOT_DIVISIBLE = "batch_size 30 is not divisible by the number of devices 4"


def test_batch_size_not_divisible():
    mesh = data_mesh(4)
    with pytest.raises(ValueError, match=NOT_DIVISIBLE):
        make_train_loop(MODEL, OPT, batch_size=30, mesh=mesh)
    with pytest.raises(ValueError, match=NOT_DIVISIBLE):
        fit(
            MODEL,
            OPT,
            BLOBS.x_train,
            BLOBS.y_train,
            steps=1,
            batch_size=30,
            key=jax.random.key(0),
            mesh=mesh,
        )
    ts, (x, labels) = _start(), _global_batch()
    with pytest.raises(ValueError, match=NOT_DIVISIBLE):
        make_train_step(MODEL, OPT, mesh=mesh)(
            ts.params, ts.state, ts.opt_state, (x[:30], labels[:30])
        )


def test_too_many_devices():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
        data_mesh(16)


@pytest.fixture(scope="module")
def train_mlp():
    spec = importlib.util.spec_from_file_location("train_mlp", EXAMPLES / "train_mlp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--hidden", "32,32", "--batch-size", "48", "--log-every", "10", "--no-progress"]


def test_train_mlp_devices_matches_one_device(train_mlp, tmp_path):
    one = train_mlp.main([*TINY, "--steps", "20", "--out", str(tmp_path / "one")])
    four = train_mlp.main(
        [*TINY, "--steps", "20", "--devices", "4", "--out", str(tmp_path / "four")]
    )
    assert (one["devices"], four["devices"], four["steps"]) == (1, 4, 20)
    assert four["config"] == one["config"]
    np.testing.assert_allclose(
        [four["final"]["test_loss"], four["final"]["test_accuracy"]],
        [one["final"]["test_loss"], one["final"]["test_accuracy"]],
        rtol=1e-5,
    )
    for a, b in zip(four["history"], one["history"], strict=True):
        assert a["step"] == b["step"]
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-5)
        np.testing.assert_allclose(a["test_loss"], b["test_loss"], rtol=1e-5)
    print(
        "train_mlp 4 vs 1 devices: test loss diff "
        f"{abs(four['final']['test_loss'] - one['final']['test_loss']):.3g}"
    )


def test_train_mlp_devices_errors(train_mlp, tmp_path, capsys):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit):
        train_mlp.main([*TINY, "--devices", "16", "--out", out])
    assert "XLA_FLAGS=--xla_force_host_platform_device_count=16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_mlp.main([*TINY, "--batch-size", "50", "--devices", "4", "--out", out])
    assert "argument --batch-size: 50 is not divisible by --devices 4" in capsys.readouterr().err
    assert not tmp_path.joinpath("out").exists()  # checked before --out is made

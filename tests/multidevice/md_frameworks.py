"""The framework adapters under axis_name on 4 forced CPU devices.

Flax (NNX and Linen) runs under ``jax.shard_map`` with the batch split over a
``"data"`` mesh axis; Equinox under ``jit`` of a ``vmap`` with ``axis_name``, the
batch sharded over the devices. Each adapter is compared with its framework's own
BatchNorm run the same way, and with one device seeing the whole batch: outputs,
gradients of the input and the parameters (random cotangent), running statistics.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
eqx = pytest.importorskip("equinox")
from jaxbn import equinox as bn_eqx  # noqa: E402
from jaxbn import linen as bn_linen  # noqa: E402
from jaxbn import nnx as bn_nnx  # noqa: E402
from tests._op_cases import normal  # noqa: E402

if jax.device_count() < 4:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs 4 devices (XLA_FLAGS)", allow_module_level=True)

TOL = 32 * float(jnp.finfo(jnp.float32).eps)
N, C, DEVICES = 32, 5, 4


def close(actual, expected, tol=TOL, what=""):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        bound = tol * max(float(np.max(np.abs(e))), 1.0)
        np.testing.assert_allclose(a, e, rtol=0, atol=bound, err_msg=what)


def inputs(seed=0, kept=(8, 3, 6, 1)):
    """``(x, ct, params, mask)``: float32 NumPy arrays drawn from the seeds ``4 * seed``
    to ``4 * seed + 3`` (independent draws), and a boolean mask."""
    s = 4 * seed
    x = 2.0 * normal(s, (N, C)) + 1.5
    ct = normal(s + 1, (N, C))
    params = {"scale": 1.0 + 0.5 * normal(s + 2, (C,)), "bias": normal(s + 3, (C,))}
    # The mask keeps the first kept[i] rows of shard i.
    keep = np.zeros(N, bool)
    for start, k in zip(range(0, N, N // DEVICES), kept, strict=True):
        keep[start : start + k] = True
    return x, ct, params, keep[:, None]


def mesh(axis_type=jax.sharding.AxisType.Explicit):
    return jax.make_mesh(
        (DEVICES,), ("data",), devices=jax.devices()[:DEVICES], axis_types=(axis_type,)
    )


def linen_step(module, variables, x, ct, mask, axis_name):
    """``(y, dx, dparams, batch_stats)`` of one training call."""

    def loss(params, x):
        y, up = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            use_running_average=False,
            mask=mask,
            mutable=["batch_stats"],
        )
        return jnp.sum(y * ct), (y, up["batch_stats"])

    (dparams, dx), (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
    # Under shard_map the gradient of a replicated parameter is already summed
    # over the devices (the transpose of its implicit broadcast).
    return y, dx, dparams, dict(stats)


def nnx_step(graphdef, state, x, ct, mask, axis_name):
    """The same for an NNX module given as ``(graphdef, pure state)``."""

    def loss(params, x, rest):
        model = nnx.merge(graphdef, params, rest)
        y = model(x, use_running_average=False, mask=mask)
        return jnp.sum(y * ct), (y, {"mean": model.mean[...], "var": model.var[...]})

    params, rest = state
    (dparams, dx), (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x, rest)
    return y, dx, dict(dparams), stats


def run_flax(framework, cls, x, ct, params, mask, *, sharded):
    axis_name = "data" if sharded else None
    if framework == "linen":
        module = cls(momentum=0.8, axis_name=axis_name)
        variables = module.init(jax.random.key(0), x, use_running_average=True)
        variables = {"params": params, "batch_stats": variables["batch_stats"]}
        step = lambda v, x, ct, m: linen_step(module, v, x, ct, m, axis_name)  # noqa: E731
        state = variables
    else:
        model = cls(C, momentum=0.8, axis_name=axis_name, rngs=nnx.Rngs(0))
        model.scale[...], model.bias[...] = params["scale"], params["bias"]
        graphdef, p, rest = nnx.split(model, nnx.Param, ...)
        state = (nnx.as_pure(p), nnx.as_pure(rest))
        step = lambda s, x, ct, m: nnx_step(graphdef, s, x, ct, m, axis_name)  # noqa: E731
    if not sharded:
        return jax.jit(step)(state, x, ct, mask)
    m, batch = mesh(), P("data")
    mapped = jax.shard_map(
        step,
        mesh=m,
        in_specs=(P(), batch, batch, None if mask is None else batch),
        out_specs=(batch, batch, P(), P()),
    )
    # On a mesh with explicit axes (jax.make_mesh's default) place the inputs first.
    put = lambda tree, spec: jax.device_put(tree, NamedSharding(m, spec))  # noqa: E731
    mask = None if mask is None else put(mask, batch)
    return jax.jit(mapped)(put(state, P()), put(x, batch), put(ct, batch), mask)


FLAX = {
    "linen": (nn.BatchNorm, bn_linen.BatchNorm),
    "nnx": (nnx.BatchNorm, bn_nnx.BatchNorm),
}


@pytest.mark.parametrize("kept", [None, (5, 5, 5, 5)], ids=["no_mask", "mask_equal_counts"])
@pytest.mark.parametrize("framework", list(FLAX))
def test_flax_adapters_under_shard_map(framework, kept):
    x, ct, params, mask = inputs(seed=1, kept=kept or (8,) * DEVICES)
    mask = None if kept is None else mask
    theirs_cls, ours_cls = FLAX[framework]
    ours = run_flax(framework, ours_cls, x, ct, params, mask, sharded=True)
    theirs = run_flax(framework, theirs_cls, x, ct, params, mask, sharded=True)
    whole = run_flax(framework, theirs_cls, x, ct, params, mask, sharded=False)
    close(ours, theirs, what="jaxbn vs Flax, sharded")
    close(ours, whole, what="jaxbn sharded vs Flax on one device")
    assert float(np.max(np.abs(ours[2]["scale"]))) > 1e-2
    assert float(np.max(np.abs(ours[3]["mean"]))) > 0.1


@pytest.mark.parametrize("framework", list(FLAX))
def test_unequal_counts_per_device_jaxbn_weighs_examples_flax_averages_means(framework):
    """Shards keep 8, 3, 6 and 1 rows. jaxbn equals the whole batch on one device;
    Flax averages the four per-device means, as if each shard had as many rows."""
    x, ct, params, mask = inputs(seed=3, kept=(8, 3, 6, 1))
    theirs_cls, ours_cls = FLAX[framework]
    ours = run_flax(framework, ours_cls, x, ct, params, mask, sharded=True)
    theirs = run_flax(framework, theirs_cls, x, ct, params, mask, sharded=True)
    whole = run_flax(framework, theirs_cls, x, ct, params, mask, sharded=False)
    ours, theirs, whole = jax.device_get((ours, theirs, whole))
    kept = np.asarray(mask[:, 0])
    close(
        (ours[0][kept], ours[1][kept], ours[2], ours[3]),
        (whole[0][kept], whole[1][kept], whole[2], whole[3]),
        what="jaxbn vs one device",
    )
    # The running mean after one step from zero: (1 - momentum) * the batch mean.
    truth = np.asarray(x, np.float64)[kept].mean(0)
    close(ours[3]["mean"], 0.2 * truth)
    shards = np.asarray(x, np.float64).reshape(DEVICES, -1, C)
    means = [shards[i][np.asarray(kept).reshape(DEVICES, -1)[i]].mean(0) for i in range(DEVICES)]
    close(theirs[3]["mean"], 0.2 * np.mean(means, axis=0))
    assert not np.allclose(np.mean(means, axis=0), truth, rtol=1e-2)


def run_equinox(cls, x, ct, params, *, sharded, **kw):
    model, state = eqx.nn.make_with_state(cls)(C, "batch", momentum=0.8, **kw)
    model = eqx.tree_at(lambda m: (m.weight, m.bias), model, (params["scale"], params["bias"]))

    def step(weight_bias, x, ct, state):
        def loss(weight_bias, x):
            m = eqx.tree_at(lambda m: (m.weight, m.bias), model, weight_bias)
            f = jax.vmap(m, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
            y, new_state = f(x, state)
            return jnp.sum(y * ct), (y, new_state)

        (dwb, dx), (y, new_state) = jax.grad(loss, argnums=(0, 1), has_aux=True)(weight_bias, x)
        return y, dx, dwb, new_state.get(model.batch_state_index)[0]

    if sharded:
        # Automatic sharding propagation (the mesh's Auto axes), as plain jit code uses.
        batch = NamedSharding(mesh(jax.sharding.AxisType.Auto), P("data"))
        x, ct = jax.device_put(x, batch), jax.device_put(ct, batch)
    out = jax.jit(step)((model.weight, model.bias), x, ct, state)
    if sharded:
        assert len(out[0].sharding.device_set) == DEVICES
    return out


def test_equinox_adapter_under_vmap_on_sharded_batch():
    x, ct, params, _ = inputs(seed=2)
    ours = run_equinox(bn_eqx.BatchNorm, x, ct, params, sharded=True)
    theirs = run_equinox(eqx.nn.BatchNorm, x, ct, params, sharded=True, mode="batch")
    whole = run_equinox(bn_eqx.BatchNorm, x, ct, params, sharded=False)
    close(ours, theirs, what="jaxbn vs Equinox, sharded")
    close(ours, whole, what="sharded vs one device")
    # The hidden mean after one step is (1 - momentum) times the batch mean.
    close(ours[3], 0.2 * np.mean(np.asarray(x, np.float64), axis=0))

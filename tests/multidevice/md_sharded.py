"""Synchronized batch norm on 8 forced CPU devices.

The op, the reference and the fused op (``batch_norm_act`` with leaky ReLU, whose
truth is ``leaky_relu(reference.batch_norm(x, |scale| + eps, bias))``) under
``shard_map`` with ``axis_name``, against the whole batch on one device.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxbn
from jaxbn import reference
from tests._op_cases import bernoulli, normal

if jax.device_count() < 8:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs 8 devices (XLA_FLAGS)", allow_module_level=True)

SLOPE = 0.1


def fused(x, scale, bias, *, axis_name=None, mask=None):
    return jaxbn.batch_norm_act(
        x, scale, bias, negative_slope=SLOPE, axis_name=axis_name, mask=mask
    )


def fused_oracle(x, scale, bias, *, axis_name=None, mask=None):
    s = jnp.abs(scale) + 1e-5
    y, mean, var = reference.batch_norm(x, s, bias, axis_name=axis_name, mask=mask)
    return jax.nn.leaky_relu(y, SLOPE), mean, var


# name: (function under shard_map, its truth on one device, tolerance). What the
# fused op recovers from z is a little less exact.
OPS = {
    "op": (jaxbn.batch_norm, reference.batch_norm, 2e-5),
    "reference": (reference.batch_norm, reference.batch_norm, 2e-5),
    "fused": (fused, fused_oracle, 3e-5),
}
RTOL = ATOL = OPS["op"][2]


def mesh_of(n, names=("data",), shape=None):
    return jax.make_mesh(shape or (n,), names, devices=jax.devices()[:n])


def inputs(shape, seed=0):
    """``(x, scale, bias, dy, g_mean, g_var)`` as float32 NumPy arrays, drawn from the
    seeds ``6 * seed`` to ``6 * seed + 5`` (independent draws): ``x ~ N(1.5, 2^2)``,
    ``|scale|`` in ``[1, 1.5]`` with alternating signs, ``bias ~ N(0, 0.5^2)``, the
    cotangents standard normal."""
    s, c = 6 * seed, shape[-1]
    x = 2.0 * normal(s, shape) + 1.5
    sign = np.where(np.arange(c) % 2 == 0, 1.0, -1.0)
    uniform = np.random.default_rng(s + 1).uniform(size=c)
    scale = (sign * (1.0 + 0.5 * uniform)).astype(np.float32)
    bias = 0.5 * normal(s + 2, (c,))
    dy = normal(s + 3, shape)
    g_mean = normal(s + 4, (c,))
    g_var = normal(s + 5, (c,))
    return x, scale, bias, dy, g_mean, g_var


def put(mesh, spec, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def close(a, b, tol=RTOL):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=tol, atol=tol), a, b)


def single_device(x, scale, bias, dy, g_mean, g_var, mask=None, oracle=reference.batch_norm):
    """Values and the VJP of the whole batch on one device (the reference, or ``oracle``)."""
    f = functools.partial(oracle, mask=mask)
    out, pull = jax.vjp(f, x, scale, bias)
    return out, pull((dy, g_mean, g_var))


def sharded(fn, mesh, x, scale, bias, dy, g_mean, g_var, mask=None):
    """Values and VJP under shard_map with axis_name: batch sharded, params replicated."""
    names = mesh.axis_names
    axis_name = names if len(names) > 1 else names[0]
    batch = P(names)

    def local(x, scale, bias, dy, g_mean, g_var, mask):
        f = functools.partial(fn, axis_name=axis_name, mask=mask)
        out, pull = jax.vjp(f, x, scale, bias)
        return out, pull((dy, g_mean, g_var))

    specs = (batch, P(), P(), batch, P(), P(), None if mask is None else batch)
    out_specs = ((batch, P(), P()), (batch, P(), P()))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs)
    args = [*put(mesh, batch, x), *put(mesh, P(), scale, bias), *put(mesh, batch, dy)]
    args += put(mesh, P(), g_mean, g_var)
    args.append(None if mask is None else put(mesh, batch, mask)[0])
    return jax.jit(mapped)(*args)


@pytest.mark.parametrize("n", [1, 2, 8])
@pytest.mark.parametrize("name", list(OPS))
def test_shard_map_equals_single_device(n, name):
    fn, oracle, tol = OPS[name]
    args = inputs((32, 5), seed=n)
    got = sharded(fn, mesh_of(n), *args)
    close(got, single_device(*args, oracle=oracle), tol)
    assert got[0][1].shape == (5,)


@pytest.mark.parametrize("n", [2, 8])
def test_nhwc_shard_map(n):
    x, scale, bias, dy, g_mean, g_var = inputs((16, 3, 3, 4), seed=1)
    close(
        sharded(jaxbn.batch_norm, mesh_of(n), x, scale, bias, dy, g_mean, g_var),
        single_device(x, scale, bias, dy, g_mean, g_var),
    )


@pytest.mark.parametrize("name", ["op", "fused"])
def test_two_named_axes_nhwc(name):
    fn, oracle, tol = OPS[name]
    mesh = mesh_of(8, ("a", "b"), (2, 4))
    args = inputs((16, 3, 3, 4), seed=2)
    close(sharded(fn, mesh, *args), single_device(*args, oracle=oracle), tol)


@pytest.mark.parametrize("name", ["op", "fused"])
def test_unequal_per_device_counts_weigh_each_example_equally(name):
    """Masks keep 8, 1, 5 and 0 rows of the four shards: counts are reduced, not means."""
    fn, oracle, tol = OPS[name]
    x, scale, bias, dy, g_mean, g_var = inputs((32, 3), seed=3)
    keep = np.zeros(32, bool)
    keep[0:8] = True
    keep[8:9] = True
    keep[16:21] = True
    mask = keep[:, None]
    dy = np.where(mask, dy, np.float32(0))  # padding contributes no loss
    got = jax.device_get(sharded(fn, mesh_of(4), x, scale, bias, dy, g_mean, g_var, mask))
    # The truth: the kept rows alone, as one batch, with no mask at all.
    kept = (x[keep], scale, bias, dy[keep], g_mean, g_var)
    (y, m, v), (dx, ds, db) = single_device(*kept, oracle=oracle)
    (gy, gm, gv), (gdx, gds, gdb) = got
    close((gy[keep], gm, gv, gdx[keep], gds, gdb), (y, m, v, dx, ds, db), tol)
    # A mean of per-device means would weigh the single row of shard 2 as 8 rows.
    per_device_means = np.mean([x[0:8].mean(0), x[8:9].mean(0), x[16:21].mean(0)], axis=0)
    assert not np.allclose(per_device_means, m, rtol=1e-3)


@pytest.mark.parametrize("name", ["op", "reference"])
def test_mask_varying_along_features_counts_each_feature_globally(name):
    """A Flax-style mask of x's shape: per-feature counts, reduced over the devices."""
    x, scale, bias, dy, g_mean, g_var = inputs((32, 3), seed=4)
    keep = bernoulli(100, 0.6, (32, 3))
    keep[:8, 0] = False  # feature 0 has nothing on shard 0
    keep[8:, 2] = False  # feature 2 is kept on shard 0 only
    keep[:2, 2] = True
    got = jax.device_get(sharded(OPS[name][0], mesh_of(4), x, scale, bias, dy, g_mean, g_var, keep))
    close(got, single_device(x, scale, bias, dy, g_mean, g_var, keep))
    # And the statistics are each feature's own kept values (numpy, float64).
    x64 = np.asarray(x, np.float64)
    for c in range(3):
        kept = x64[keep[:, c], c]
        np.testing.assert_allclose(got[0][1][c], kept.mean(), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(got[0][2][c], kept.var(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["op", "fused"])
def test_per_device_parameters_get_their_own_gradient(name):
    """Parameters that vary per device: the op's VJP equals autodiff of the reference."""
    fn, oracle, tol = OPS[name]
    n, c = 4, 3
    x, _, _, dy, g_mean, g_var = inputs((16, c), seed=4)
    scales = 1.0 + 0.3 * normal(101, (n * c,))
    biases = normal(102, (n * c,))
    mesh = mesh_of(n)

    def run(fn):
        def local(x, scale, bias, dy, g_mean, g_var):
            f = functools.partial(fn, axis_name="data")
            out, pull = jax.vjp(f, x, scale, bias)
            return out, pull((dy, g_mean, g_var))

        d = P("data")
        mapped = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(d, d, d, d, P(), P()),
            out_specs=((d, P(), P()), (d, d, d)),
        )
        args = put(mesh, d, x, scales, biases, dy) + put(mesh, P(), g_mean, g_var)
        return jax.jit(mapped)(*args)

    got, want = run(fn), run(oracle)
    close(got, want, tol)
    # Each device's dscale is its own contribution: they differ between devices.
    dscale = np.asarray(got[1][1])
    assert not np.allclose(dscale[:c], dscale[c : 2 * c])


def test_mixed_replicated_scale_and_per_device_bias():
    n, c = 4, 3
    x, scale, _, dy, g_mean, g_var = inputs((16, c), seed=5)
    biases = normal(103, (n * c,))
    mesh = mesh_of(n)

    def run(fn):
        def local(x, scale, bias, dy):
            out, pull = jax.vjp(functools.partial(fn, axis_name="data"), x, scale, bias)
            return out, pull((dy, g_mean, g_var))

        d = P("data")
        mapped = jax.shard_map(
            local, mesh=mesh, in_specs=(d, P(), d, d), out_specs=((d, P(), P()), (d, P(), d))
        )
        return jax.jit(mapped)(*put(mesh, d, x), *put(mesh, P(), scale), *put(mesh, d, biases, dy))

    close(run(jaxbn.batch_norm), run(reference.batch_norm))


@pytest.mark.parametrize("n", [2, 8])
def test_sharded_jit_without_axis_name_gives_global_statistics(n):
    """Plain jit over a batch sharded by NamedSharding: XLA inserts the reductions."""
    args = inputs((32, 4), seed=6)
    mesh = mesh_of(n)
    x, dy = put(mesh, P("data"), args[0], args[3])

    @jax.jit
    def step(x, scale, bias, dy, g_mean, g_var):
        out, pull = jax.vjp(jaxbn.batch_norm, x, scale, bias)
        return out, pull((dy, g_mean, g_var))

    got = step(x, args[1], args[2], dy, args[4], args[5])
    close(got, single_device(*args))
    assert len(got[0][0].sharding.device_set) == n
    assert got[0][0].sharding.spec[0] == "data"


def test_layer_synchronized_running_statistics():
    bn = jaxbn.BatchNorm(4, axis_name="data", momentum=0.5)
    params, state = bn.init()
    x = inputs((32, 4), seed=7)[0]
    mesh = mesh_of(8)

    def local(params, state, x):
        return bn.apply(params, state, x, training=True)

    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=(P("data"), P())
    )
    y, new_state = jax.jit(mapped)(params, state, put(mesh, P("data"), x)[0])
    y1, state1 = jaxbn.BatchNorm(4, momentum=0.5).apply(params, state, x, training=True)
    close((y, new_state), (y1, state1))


@pytest.mark.parametrize("n", [2, 8])
def test_per_device_statistics_with_replicated_parameters(n):
    """No axis_name inside shard_map: each device normalizes its own shard, and the
    replicated scale and bias get the sum of every device's contribution."""
    x, scale, bias, dy, *_ = inputs((32, 3), seed=10)
    mesh = mesh_of(n)

    def run(fn):
        def local(x, scale, bias, dy):
            out, pull = jax.vjp(fn, x, scale, bias)
            return out, pull((dy, jnp.zeros_like(out[1]), jnp.zeros_like(out[2])))

        d = P("data")
        mapped = jax.shard_map(
            local, mesh=mesh, in_specs=(d, P(), P(), d), out_specs=((d, d, d), (d, P(), P()))
        )
        return jax.jit(mapped)(*put(mesh, d, x), *put(mesh, P(), scale, bias), *put(mesh, d, dy))

    got, want = run(jaxbn.batch_norm), run(reference.batch_norm)
    close(got, want)
    # And the truth without any mesh: a sum over independently normalized shards.
    k = 32 // n
    dscale = sum(
        jax.vjp(reference.batch_norm, x[i : i + k], scale, bias)[1](
            (dy[i : i + k], np.zeros(3, np.float32), np.zeros(3, np.float32))
        )[1]
        for i in range(0, 32, k)
    )
    close(got[1][1], dscale)


def test_groups_of_devices_through_a_two_axis_mesh():
    """Statistics over groups of devices (what axis_index_groups does under pmap): a
    mesh ("group", "data") with axis_name="data" normalizes each group's half of the
    batch on its own; the replicated scale and bias sum both groups' gradients."""
    x, scale, bias, dy, *_ = inputs((32, 3), seed=11)
    mesh = mesh_of(8, ("group", "data"), (2, 4))
    batch = P(("group", "data"))

    def local(x, scale, bias, dy):
        f = functools.partial(jaxbn.batch_norm, axis_name="data")
        out, pull = jax.vjp(f, x, scale, bias)
        return out, pull((dy, jnp.zeros_like(out[1]), jnp.zeros_like(out[2])))

    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(batch, P(), P(), batch),
        out_specs=((batch, P("group"), P("group")), (batch, P(), P())),
    )
    args = [*put(mesh, batch, x), *put(mesh, P(), scale, bias), *put(mesh, batch, dy)]
    (y, mean, var), (dx, dscale, dbias) = jax.device_get(jax.jit(mapped)(*args))
    zeros = np.zeros(3, np.float32)
    halves = [
        single_device(x[i : i + 16], scale, bias, dy[i : i + 16], zeros, zeros) for i in (0, 16)
    ]
    close(y, np.concatenate([h[0][0] for h in halves]))
    close(mean, np.concatenate([h[0][1] for h in halves]))
    close(var, np.concatenate([h[0][2] for h in halves]))
    close(dx, np.concatenate([h[1][0] for h in halves]))
    close(dscale, halves[0][1][1] + halves[1][1][1])
    close(dbias, halves[0][1][2] + halves[1][1][2])


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "mask"])
def test_explicitly_sharded_batch_at_a_large_offset(masked):
    """A batch sharded over an explicit mesh keeps the float32 accuracy at mean 1e6:
    the shift is a sample gathered from the sharded batch (replicated)."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh(
        (4,), ("data",), axis_types=(AxisType.Explicit,), devices=jax.devices()[:4]
    )
    x64 = normal(9, (1024, 3), np.float64) + 1e6
    x32 = x64.astype(np.float32)
    mask = (np.arange(1024) % 7 != 3)[:, None] if masked else None
    kept = np.ones(1024, bool) if mask is None else mask[:, 0]
    with jax.set_mesh(mesh):
        x = jax.device_put(x32, NamedSharding(mesh, P("data")))
        m = None if mask is None else jax.device_put(mask, NamedSharding(mesh, P("data")))
        y, _, var = jax.jit(lambda x, m: jaxbn.batch_norm(x, None, None, mask=m))(x, m)
    truth = x32.astype(np.float64)[kept]
    np.testing.assert_allclose(np.asarray(var, np.float64), truth.var(0), rtol=1e-5)
    y_t = (truth - truth.mean(0)) / np.sqrt(truth.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64)[kept], y_t, rtol=0, atol=1e-4)

"""batch_norm_act with axis_name on 8 forced CPU devices (run by tests/test_multidevice.py).

The truth is the oracle ``leaky_relu(reference.batch_norm(x, |scale| + eps, bias))``
on the whole batch on one device, or under the same ``shard_map``.
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

if jax.device_count() < 8:  # pragma: no cover - guarded by the runner
    pytest.skip("needs 8 devices (XLA_FLAGS)", allow_module_level=True)

RTOL, ATOL = 3e-5, 3e-5
SLOPE = 0.1


def oracle(x, scale, bias, *, axis_name=None, mask=None):
    y, mean, var = reference.batch_norm(
        x, jnp.abs(scale) + 1e-5, bias, axis_name=axis_name, mask=mask
    )
    return jax.nn.leaky_relu(y, SLOPE), mean, var


def fused(x, scale, bias, *, axis_name=None, mask=None):
    return jaxbn.batch_norm_act(
        x, scale, bias, negative_slope=SLOPE, axis_name=axis_name, mask=mask
    )


def mesh_of(n, names=("data",), shape=None):
    return jax.make_mesh(shape or (n,), names, devices=jax.devices()[:n])


def inputs(shape, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    c = shape[-1]
    x = 2.0 * jax.random.normal(ks[0], shape) + 1.5
    scale = jnp.where(jnp.arange(c) % 2 == 0, 1.0, -1.0) * (
        1.0 + 0.5 * jax.random.uniform(ks[1], (c,))
    )
    bias = 0.5 * jax.random.normal(ks[2], (c,))
    cts = (
        jax.random.normal(ks[3], shape),
        jax.random.normal(ks[4], (c,)),
        jax.random.normal(ks[5], (c,)),
    )
    return x, scale, bias, cts


def put(mesh, spec, *arrays):
    return [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]


def close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL), a, b)


def single_device(x, scale, bias, cts, mask=None):
    out, pull = jax.vjp(functools.partial(oracle, mask=mask), x, scale, bias)
    return out, pull(cts)


def sharded(fn, mesh, x, scale, bias, cts, mask=None):
    names = mesh.axis_names
    axis_name = names if len(names) > 1 else names[0]
    batch = P(names)

    def local(x, scale, bias, dz, g_mean, g_var, mask):
        out, pull = jax.vjp(functools.partial(fn, axis_name=axis_name, mask=mask), x, scale, bias)
        return out, pull((dz, g_mean, g_var))

    specs = (batch, P(), P(), batch, P(), P(), None if mask is None else batch)
    out_specs = ((batch, P(), P()), (batch, P(), P()))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs)
    args = [*put(mesh, batch, x), *put(mesh, P(), scale, bias), *put(mesh, batch, cts[0])]
    args += put(mesh, P(), cts[1], cts[2])
    args.append(None if mask is None else put(mesh, batch, mask)[0])
    return jax.jit(mapped)(*args)


@pytest.mark.parametrize("n", [2, 8])
def test_shard_map_equals_single_device(n):
    args = inputs((32, 5), seed=n)
    close(sharded(fused, mesh_of(n), *args), single_device(*args))


def test_two_named_axes_nhwc():
    mesh = mesh_of(8, ("a", "b"), (2, 4))
    args = inputs((16, 3, 3, 4), seed=2)
    close(sharded(fused, mesh, *args), single_device(*args))


def test_masked_shards_with_unequal_counts():
    x, scale, bias, cts = inputs((32, 3), seed=3)
    keep = np.zeros(32, bool)
    keep[0:8] = keep[8:9] = keep[16:21] = True
    mask = jnp.asarray(keep)[:, None]
    got = sharded(fused, mesh_of(4), x, scale, bias, cts, mask)
    close(got, single_device(x, scale, bias, cts, mask))


def test_per_device_parameters_match_autodiff_of_the_oracle():
    n, c = 4, 3
    x, _, _, cts = inputs((16, c), seed=4)
    scales = 1.0 + 0.3 * jax.random.normal(jax.random.key(7), (n * c,))
    biases = jax.random.normal(jax.random.key(8), (n * c,))

    def run(fn):
        d = P("data")

        def local(x, scale, bias, dz, g_mean, g_var):
            out, pull = jax.vjp(functools.partial(fn, axis_name="data"), x, scale, bias)
            return out, pull((dz, g_mean, g_var))

        mapped = jax.shard_map(
            local,
            mesh=mesh_of(n),
            in_specs=(d, d, d, d, P(), P()),
            out_specs=((d, P(), P()), (d, d, d)),
        )
        mesh = mesh_of(n)
        args = put(mesh, d, x, scales, biases, cts[0]) + put(mesh, P(), cts[1], cts[2])
        return jax.jit(mapped)(*args)

    got, want = run(fused), run(oracle)
    close(got, want)
    dscale = np.asarray(got[1][1])
    assert not np.allclose(dscale[:c], dscale[c : 2 * c])

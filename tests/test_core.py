"""The statistics every path shares (``jaxbn/_core.py``): accurate at large offsets everywhere.

float32 data at mean 1e4 and 1e6 with a unit spread, against the float64 truth
computed from the same (float32-rounded) values: the plain op, a mask whose
padding holds garbage, several devices (``vmap`` with ``axis_name``) with unequal
counts, one device's data away from the others' and one device that keeps
nothing, the fused op, and ghost batches. A negative control shows that the same
bounds catch a sum without a shift. And how a call is compiled (``_core.compiled``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference
from tests._op_cases import normal

OFFSETS = [1e4, 1e6]
VAR_RTOL = 1e-5  # the README's promise for the variance
Y_ATOL = 1e-4  # outputs of unit scale
GRAD_RTOL = 1e-4  # gradients, relative to their largest entry
N, C = 1024, 3


def data(offset, seed=0, shape=(N, C)):
    """float32 values at ``offset`` with a unit spread, a garbage-padded mask, cotangents.

    Drawn with NumPy from the seeds ``5 * seed`` to ``5 * seed + 4`` (independent draws).
    """
    s = 5 * seed
    x = normal(s, shape, np.float64) + offset
    x[shape[0] - 24 :] = 3e9  # padding: far out, never kept
    mask = np.ones(shape[:1] + (1,) * (len(shape) - 1), bool)
    mask[shape[0] - 24 :] = False
    scale = 1.0 + 0.3 * normal(s + 1, (shape[-1],))
    bias = 0.5 * normal(s + 2, (shape[-1],))
    dy = normal(s + 3, shape)
    g = normal(s + 4, (2, shape[-1]))
    return x.astype(np.float32), mask, scale, bias, (dy, g[0], g[1])


def f64(tree):
    return jax.tree.map(lambda v: jnp.asarray(np.asarray(v, np.float64)), tree)


def vjp(op, x, scale, bias, cts, **kwargs):
    out, pull = jax.vjp(functools.partial(op, **kwargs), x, scale, bias)
    return out, pull(tuple(jnp.asarray(c, out[0].dtype) for c in cts))


def assert_accurate(got, truth):
    (y, mean, var), grads = got
    (y_t, mean_t, var_t), grads_t = truth
    # The mean to within float32's spacing at its magnitude; the variance to 1e-5.
    spacing = np.spacing(np.abs(mean_t).astype(np.float32)).astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean, np.float64), mean_t, rtol=0, atol=spacing.max())
    np.testing.assert_allclose(np.asarray(var, np.float64), var_t, rtol=VAR_RTOL)
    np.testing.assert_allclose(np.asarray(y, np.float64), y_t, rtol=0, atol=Y_ATOL)
    for g, g_t in zip(grads, grads_t, strict=True):
        bound = GRAD_RTOL * np.abs(g_t).max()
        np.testing.assert_allclose(np.asarray(g, np.float64), g_t, rtol=0, atol=bound)


def fused_reference(x, scale, bias, **kwargs):
    y, mean, var = reference.batch_norm(x, jnp.abs(scale) + 1e-5, bias, **kwargs)
    return jax.nn.leaky_relu(y, 0.01), mean, var


def truth_of(op, x, scale, bias, cts, **kwargs):
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, vjp(op, *f64((x, scale, bias, cts)), **kwargs))


PATHS = {
    "plain": (jaxbn.batch_norm, reference.batch_norm, False),
    "mask": (jaxbn.batch_norm, reference.batch_norm, True),
    "fused": (jaxbn.batch_norm_act, fused_reference, False),
    "fused-mask": (jaxbn.batch_norm_act, fused_reference, True),
}


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("path", list(PATHS))
def test_one_device(path, offset):
    op, ref, masked = PATHS[path]
    x, mask, scale, bias, cts = data(offset)
    if not masked:
        x, mask, cts = x[:1000], None, (cts[0][:1000], *cts[1:])
    got = jax.jit(functools.partial(vjp, op, mask=mask))(x, scale, bias, cts)
    truth = truth_of(ref, x, scale, bias, cts, mask=mask)
    if masked:  # padding: y is computed there but means nothing
        got = ((got[0][0][mask[:, 0]], *got[0][1:]), got[1])
        truth = ((truth[0][0][mask[:, 0]], *truth[0][1:]), truth[1])
    assert_accurate(got, truth)


def devices_data(offset):
    """Four devices of 256 rows: unequal counts, one 40 units away, one that keeps nothing."""
    x, _, scale, bias, (dy, g_mean, g_var) = data(offset)
    x, dy = x.reshape(4, 256, C), dy.reshape(4, 256, C)
    x[1] += 40.0
    mask = np.zeros((4, 256, 1), bool)
    for d, kept in enumerate([256, 100, 7, 0]):
        mask[d, :kept] = True
    x = np.where(mask, x, np.float32(-7e9))
    g = np.broadcast_to(np.stack([g_mean, g_var]), (4, 2, C)) / 4
    return x, mask, scale, bias, (dy, g[:, 0], g[:, 1])


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("path", ["op", "fused"])
def test_several_devices_with_unequal_counts(path, offset):
    op, ref = PATHS["mask" if path == "op" else "fused-mask"][:2]
    x, mask, scale, bias, cts = devices_data(offset)

    def per_device(op, x, mask, dy, g_mean, g_var):
        return vjp(op, x, scale, bias, (dy, g_mean, g_var), mask=mask, axis_name="d")

    got = jax.jit(jax.vmap(functools.partial(per_device, op), axis_name="d"))(x, mask, *cts)
    # The truth: the whole batch on one device, in float64.
    flat = (x.reshape(-1, C), scale, bias, (cts[0].reshape(-1, C), cts[1][0] * 4, cts[2][0] * 4))
    truth = truth_of(ref, *flat, mask=mask.reshape(-1, 1))
    kept = mask.reshape(-1)
    y = np.asarray(got[0][0]).reshape(-1, C)[kept]
    dx = np.asarray(got[1][0]).reshape(-1, C)[kept]
    # Per-device parameter gradients add up to the whole batch's.
    dscale, dbias = (np.asarray(g).sum(0) for g in got[1][1:])
    got = ((y, got[0][1][0], got[0][2][0]), (dx, dscale, dbias))
    truth = ((truth[0][0][kept], *truth[0][1:]), (truth[1][0][kept], *truth[1][1:]))
    assert_accurate(got, truth)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("fused", [False, True], ids=["op", "fused"])
def test_ghost_batches(offset, fused):
    x, _, scale, bias, (dy, _, _) = data(offset)
    bn = jaxbn.BatchNorm(C, virtual_batch_size=256, activation="leaky_relu" if fused else None)
    _, state = bn.init()

    def layer(x, scale, bias):
        return bn.apply({"scale": scale, "bias": bias}, state, x, training=True)[0]

    y, pull = jax.vjp(jax.jit(layer), x, scale, bias)
    grads = pull(jnp.asarray(dy, jnp.float32))
    with jax.enable_x64(True):
        x64, s64, b64, dy64 = f64((x, scale, bias, dy))
        op = fused_reference if fused else reference.batch_norm

        def groups(x, scale, bias):
            scale, bias = (jnp.broadcast_to(v, (4, C)) for v in (scale, bias))
            return op(x.reshape(4, 256, C), scale, bias, axis=(0, 2))[0].reshape(N, C)

        y_t, pull_t = jax.vjp(groups, x64, s64, b64)
        truth = jax.tree.map(np.asarray, (y_t, pull_t(dy64)))
    np.testing.assert_allclose(np.asarray(y, np.float64), truth[0], rtol=0, atol=Y_ATOL)
    for g, g_t in zip(grads, truth[1], strict=True):
        bound = GRAD_RTOL * np.abs(g_t).max()
        np.testing.assert_allclose(np.asarray(g, np.float64), g_t, rtol=0, atol=bound)


def test_an_unshifted_sum_fails_these_bounds():
    """The negative control: the masked mean summed without a shift, in float32, at 1e6."""
    x, mask, *_ = data(1e6)
    kept = np.broadcast_to(mask, x.shape)
    x32 = jnp.asarray(x)
    n = kept.sum(0)
    mean = jnp.sum(jnp.where(kept, x32, 0), axis=0) / n
    var = jnp.sum(jnp.where(kept, (x32 - mean) ** 2, 0), axis=0) / n
    truth = np.var(x.astype(np.float64)[kept[:, 0]], axis=0)
    assert np.abs(np.asarray(var, np.float64) / truth - 1).max() > 10 * VAR_RTOL
    _, _, var_op = jaxbn.batch_norm(x32, None, None, mask=mask)
    np.testing.assert_allclose(np.asarray(var_op, np.float64), truth, rtol=VAR_RTOL)


OPS = {
    "batch_norm": jaxbn.batch_norm,
    "batch_norm_act": jaxbn.batch_norm_act,
    "reference": reference.batch_norm,
}


def _traces(fn, *args):
    """How many programs JAX traces for compilation in the call ``fn(*args)``."""
    events = []

    def listen(name, secs, **kwargs):
        events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        jax.block_until_ready(fn(*args))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return events.count("/jax/core/compile/jaxpr_trace_duration")


@pytest.mark.parametrize("name", list(OPS))
def test_a_call_on_concrete_arrays_is_one_compiled_program(name):
    """Not one program per primitive (some fifty for the op) outside any transformation."""
    # A batch size of its own: nothing of this call is in JAX's caches yet.
    x = normal(31, (41 + list(OPS).index(name), 5))
    # The op's program, and one converting x to a device array (jnp.asarray).
    assert _traces(OPS[name], x, None, None) <= 2


@pytest.mark.parametrize("name", list(OPS))
def test_inside_jit_the_op_is_traced_into_the_callers_program(name):
    """No nested jit: the caller's compiled program is what it is without the wrapper."""
    jaxpr = jax.make_jaxpr(lambda x: OPS[name](x, None, None))(normal(32, (8, 5)))
    assert not any(eqn.primitive.name in ("jit", "pjit") for eqn in jaxpr.jaxpr.eqns), jaxpr

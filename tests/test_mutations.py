"""The gradient check of the op catches the classic mistakes of a hand-written backward.

Each mistake is applied to a copy of the op's own rule (``ops._fwd`` and
``ops._bwd``, with one quantity changed) registered as a custom VJP of its own.
The check that ``test_ops.py`` makes of :func:`jaxbn.batch_norm` (values and the
VJP against autodiff of the reference, random cotangents on every output) must
pass for the unchanged copy and fail for every mistake: a check that a mistake
survives would prove nothing about it.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbn import _core, ops, reference
from tests._op_cases import normal

CASES = [((16, 5), (1,)), ((4, 3, 5, 6), (1,))]


def _output(res, inv_std, bias):
    """``y`` recomputed from the residuals with another ``inv_std`` (a mutated forward)."""
    x, feat = res.x, res.axes
    a = inv_std if res.scale is None else inv_std * res.scale
    centred = x - _core.expand(res.mean + res.mean_residue, x.ndim, feat)
    y = centred * _core.expand(a, x.ndim, feat)
    return y if bias is None else y + _core.expand(bias, x.ndim, feat)


def mutated(mistake):
    """``batch_norm(x, scale, bias)`` (feature axes ``feat``) with ``mistake`` in its rule."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
    def op(x, scale, bias, feat):
        return fwd(x, scale, bias, feat)[0]

    def fwd(x, scale, bias, feat):
        (y, mean, var), res = ops._fwd(x, scale, bias, None, feat, 1e-5, ())
        if mistake == "scalar-variance":  # the seed notebook's single variance
            var = jnp.broadcast_to(jnp.mean(var), var.shape)
        if mistake in ("scalar-variance", "unbiased-in-normalization"):
            v = var * res.count / (res.count - 1) if mistake == "unbiased-in-normalization" else var
            inv_std = jax.lax.rsqrt(v + 1e-5)
            res = dataclasses.replace(res, inv_std=inv_std)
            y = _output(res, inv_std, bias)
        return (y, mean, var), (res, y)

    def bwd(feat, saved, cts):
        res, y = saved
        dy, g_mean, g_var = cts
        if mistake == "drop-mean-cotangent":
            g_mean = jnp.zeros_like(g_mean)
        elif mistake == "drop-var-cotangent":
            g_var = jnp.zeros_like(g_var)
        elif mistake == "output-for-dy":  # the seed notebook multiplies Z_out here
            dy = y
        return ops._bwd(res, (dy, g_mean, g_var))

    op.defvjp(fwd, bwd)
    return op


@functools.partial(jax.jit, static_argnums=0)
def _values_and_vjp(fn, x, scale, bias, cts):
    out, pull = jax.vjp(fn, x, scale, bias)
    return out, pull(cts)


def agrees_with_reference(op):
    """The op's values and VJP against the reference's (float32 tolerances of test_ops)."""
    for case, (shape, feat) in enumerate(CASES):
        s = 6 * case  # seeds s to s + 5: six independent draws per case
        fs = tuple(shape[a] for a in feat)
        spread = np.linspace(0.5, 3.0, fs[0], dtype=np.float32)
        x = (2.0 * normal(s, shape) + 0.5) * spread.reshape(
            [-1 if a in feat else 1 for a in range(len(shape))]
        )
        scale, bias = 1.0 + 0.5 * normal(s + 1, fs), normal(s + 2, fs)
        cts = (normal(s + 3, shape), normal(s + 4, fs), normal(s + 5, fs))
        got = _values_and_vjp(functools.partial(op, feat=feat), x, scale, bias, cts)
        want = _values_and_vjp(
            functools.partial(reference.batch_norm, axis=feat), x, scale, bias, cts
        )
        pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        if not all(np.allclose(u, v, rtol=2e-5, atol=2e-5) for u, v in pairs):
            return False
    return True


def test_unchanged_rule_agrees_with_the_reference():
    assert agrees_with_reference(mutated(None))


@pytest.mark.parametrize(
    "mistake",
    [
        "drop-mean-cotangent",
        "drop-var-cotangent",
        "output-for-dy",
        "scalar-variance",
        "unbiased-in-normalization",
    ],
)
def test_each_mistake_is_caught(mistake):
    assert not agrees_with_reference(mutated(mistake))

"""Cases, inputs and comparisons shared by the tests (of the op and the fused op above all).

``tests/test_ops.py`` and ``tests/test_act.py`` check :func:`jaxbn.batch_norm` and
:func:`jaxbn.batch_norm_act` against autodiff of the reference on the same shapes,
with the same inputs and the same tolerances, all defined here once.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# One place for tolerances: (rtol, atol) per dtype.
TOL = {
    jnp.float64: (1e-10, 1e-10),
    jnp.float32: (2e-5, 2e-5),
    jnp.float16: (2e-2, 2e-2),
    jnp.bfloat16: (5e-2, 5e-2),
}

# (shape, axis): (N, C), (N, L, C), NHWC, NCHW, two feature axes, a negative tuple.
CASES = [
    ((16, 5), -1),
    ((7, 4, 3), -1),
    ((4, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((4, 3, 5, 2), (1, 3)),
    ((6, 2, 5), (-3,)),
]


def case_id(shape, axis):
    return f"{'x'.join(map(str, shape))}-axis{axis}"


IDS = [case_id(s, a) for s, a in CASES]


def feature_shape(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def normal(seed, shape, dtype=np.float32):
    """Standard normal values of ``shape``, drawn with NumPy, as a NumPy array of ``dtype``.

    Test inputs come from NumPy, not ``jax.random``: a JAX draw compiles a program per
    shape and dtype (and so does eager arithmetic on JAX arrays), which was a third of
    the op tests' time. NumPy arrays go into any JAX function as they are.
    """
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def bernoulli(seed, p, shape):
    """A boolean NumPy array of ``shape``, each entry ``True`` with probability ``p``."""
    return np.random.default_rng(seed).random(shape) < p


def ones(shape, dtype=np.float32):
    """``np.ones``, float32 by default as ``jnp.ones`` (which compiles a program per shape)."""
    return np.ones(shape, dtype)


def make_inputs(shape, axis, dtype=jnp.float32, seed=0, offset=0.0):
    """``(x, scale, bias, (dy, dmean, dvar))``, each random.

    ``x ~ N(offset + 0.5, 2^2)``; ``|scale|`` in ``[1, 1.5]``, negative on
    every third feature; ``bias ~ N(0, 0.5^2)``; the cotangents standard
    normal. ``x`` and ``dy`` have ``dtype``; the rest float32, or float64 where
    ``dtype`` is float64. Drawn with NumPy: a JAX draw would compile a program
    per shape and dtype, a sizeable share of these tests' time.
    """
    rng = np.random.default_rng(seed)
    fs = feature_shape(shape, axis)
    vdt = np.float64 if dtype == jnp.float64 else np.float32
    x = 2.0 * rng.standard_normal(shape) + offset + 0.5
    sign = np.where(np.arange(np.prod(fs)).reshape(fs) % 3 == 2, -1.0, 1.0)
    scale = sign * (1.0 + 0.5 * rng.uniform(size=fs))
    bias = 0.5 * rng.standard_normal(fs)
    dy, dmean, dvar = (rng.standard_normal(s) for s in (shape, fs, fs))
    cts = (jnp.asarray(dy.astype(vdt), dtype), jnp.asarray(dmean, vdt), jnp.asarray(dvar, vdt))
    return jnp.asarray(x.astype(vdt), dtype), jnp.asarray(scale, vdt), jnp.asarray(bias, vdt), cts


def numpy_batch_norm(x, scale, bias, axis, eps=1e-5):
    """``(y, mean, var)`` in float64 from the definition (``scale``, ``bias`` given)."""
    xn = np.asarray(x, np.float64)
    feat = {a % xn.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    red = tuple(a for a in range(xn.ndim) if a not in feat)
    shp = [1 if a in red else xn.shape[a] for a in range(xn.ndim)]
    mean, var = xn.mean(axis=red, keepdims=True), xn.var(axis=red, keepdims=True)
    y = (xn - mean) / np.sqrt(var + eps) * np.reshape(scale, shp) + np.reshape(bias, shp)
    fs = feature_shape(xn.shape, axis)
    return y, mean.reshape(fs), var.reshape(fs)


def vjp_of(fn, x, scale, bias, cts):
    """``(outputs, (dx, dscale, dbias))`` of ``fn(x, scale, bias)`` with cotangents ``cts``."""
    out, pull = jax.vjp(fn, x, scale, bias)
    return out, pull(cts)


def jit_vjp_of(fn, x, scale, bias, cts):
    """``vjp_of`` compiled as one program: one compile per case, not op by op."""
    return jax.jit(functools.partial(vjp_of, fn))(x, scale, bias, cts)


def assert_trees_close(a, b, dtype, factor=1.0):
    """Leaf by leaf within ``factor`` times the tolerances of ``dtype``, in float64."""
    rtol, atol = (factor * t for t in TOL[dtype])
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


def traced(fn, *args, **kwargs):
    """Runs ``fn`` under ``jax.eval_shape``: errors must come at trace time."""
    return jax.eval_shape(functools.partial(fn, **kwargs), *args)

"""The oracle: batch normalization in plain ``jax.numpy``, differentiated by JAX.

Same signature and results as :func:`jaxbn.batch_norm`, written independently of
:mod:`jaxbn.ops` (it shares only the argument checks, and the compilation of a call
into one program): two-pass statistics and a division by the standard deviation, no
custom derivative. The tests compare the hand-written backward against ``jax.vjp`` of
this function. It is also what to use where forward-mode AD (``jax.jvp``,
``jax.jacfwd``) is needed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core
from jaxbn._checks import AxisArg, AxisName

__all__ = ["batch_norm"]


def batch_norm(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    axis: AxisArg = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Training-mode batch normalization, plain ``jnp``; JAX derives its gradients.

    Args:
        x: ``[..., features]`` input.
        scale: ``[features]`` or ``None``.
        bias: ``[features]`` or ``None``.
        axis: feature axis or axes.
        eps: positive constant added to the variance.
        axis_name: named axis (or tuple) to average the statistics over.
        mask: boolean, as in :func:`jaxbn.batch_norm` (``x``'s rank and
            broadcastable to ``x``, or one axis per reduction axis).

    Returns:
        ``(y, mean, var)`` exactly as :func:`jaxbn.batch_norm` defines them.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxbn import reference
        >>> x = jnp.array([[1.0], [3.0]])
        >>> reference.batch_norm(x, None, None)[0].ravel().round(4)
        Array([-1.,  1.], dtype=float32)
    """
    return _compiled(
        *_checks.op_args(x, scale, bias, axis=axis, eps=eps, axis_name=axis_name, mask=mask)
    )


def _batch_norm(x, scale, bias, mask, feat, eps, axis_name):
    red = tuple(a for a in range(x.ndim) if a not in feat)
    keep = [1 if a in red else x.shape[a] for a in range(x.ndim)]
    xf = x.astype(_checks.compute_dtype(x.dtype))

    def total(v):
        s = jnp.sum(v, axis=red, keepdims=True)
        return lax.psum(s, axis_name) if axis_name else s

    # The checked mask has x's rank: broadcast, it gives a count per feature.
    w = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, x.shape).astype(xf.dtype)
    n = jnp.maximum(total(w), 1.0)  # an all-masked batch: 0 / 1, not 0 / 0
    mean = total(w * xf) / n
    var = total(w * (xf - mean) ** 2) / n
    y = (xf - mean) / jnp.sqrt(var + eps)
    if scale is not None:
        y = y * jnp.reshape(scale, keep)
    if bias is not None:
        y = y + jnp.reshape(bias, keep)
    fshape = [x.shape[a] for a in feat]
    return y.astype(x.dtype), mean.reshape(fshape), var.reshape(fshape)


# One compiled program per shape outside jit; JAX differentiates it all the same.
_compiled = _core.compiled(_batch_norm, static_argnums=(4, 5, 6))

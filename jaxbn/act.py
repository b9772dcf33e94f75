r"""Batch normalization fused with an invertible activation (In-Place ABN).

Rota Bulò, Porzi and Kontschieder, *In-Place Activated BatchNorm for
Memory-Optimized Training of DNNs* (CVPR 2018): batch norm followed by an
invertible activation needs to keep only the activated output ``z`` for the
backward pass. The backward inverts the activation to recover ``y`` and
``f'(y)``, then the affine map to recover ``x_hat``; the batch-norm input ``x``
and its normalized copy are never kept, so a network whose hidden layers are
``z = f(BN(x @ W))`` keeps one activation per layer instead of two or three.

.. math::

    \hat x = \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}, \qquad
    y = (|\gamma| + \epsilon) \hat x + \beta, \qquad z = f(y)

``f`` is one of :data:`INVERTIBLE_ACTIVATIONS`: ``"leaky_relu"`` (slope
``negative_slope`` below 0), ``"elu"`` (alpha 1, as :func:`jax.nn.elu`) or
``"identity"``. ReLU is refused: it maps every negative ``y`` to 0, so ``y``
cannot be recovered from ``z``.

The scale is the paper's ``|gamma| + eps`` (``eps`` is batch norm's own): the
backward divides by it to recover ``x_hat = (y - beta) / scale``, and a scale
at or near zero would make that division blow up (at ``gamma = 0``, ``y = beta``
holds no trace of ``x`` at all). The parameter ``gamma`` itself may take any
value, including 0 (the gradient of ``|gamma|`` at 0 is taken as +1, so a
zero-initialized ``gamma`` trains, within the precision rule below). A layer
that uses this op uses the same effective scale in evaluation mode and when
folded (:func:`effective_scale`).

Precision: ``x_hat`` is recovered from ``z`` stored in the input dtype, with an
error of about ``ulp(y) / s`` (``s = |gamma| + eps``), which no per-feature
residual can restore. The rule, measured by the tests: each gradient is within

.. math::

    4 \, \epsilon_{\text{dtype}} \, \frac{|\beta| + 3 s}{s}

of the exact ones, relative to the largest entry (``epsilon`` of ``x``'s dtype:
``2^-7`` in bfloat16, ``2^-23`` in float32). In float32 that is 1e-5 at
``|beta| / s = 18`` and 1e-3 at 2000. In bfloat16 the measured errors are 0.3%
at ``gamma = 1``, ``beta = 0``, 3% at ``gamma = 0.1``, ``beta = 1``, 32% at
``gamma = 0.01``, ``beta = 1``; at ``gamma = 0``, ``beta = 0.5`` the gradient of
``gamma`` is lost entirely (``y`` rounds to ``beta``). So a zero-initialized
``gamma`` trains in float32 and wider, and in bfloat16 only while ``beta`` is
near 0: train such layers in float32 or unfused. A ``negative_slope`` whose
``z = slope * y`` underflows in ``x``'s dtype is refused. ELU loses ``y`` where
it saturates (``z`` rounds to -1: in float32 below about ``y = -16``, in
bfloat16 below about ``y = -5``); the recovered ``y`` is clamped there. Those
elements have ``f'(y)`` of ``exp(y)``: their share of every sum is negligible,
but their own ``dx`` is not recovered, so a feature whose values all saturate
gets a wrong ``dx`` for cotangents on ``mean`` and ``var``. Prefer
``"leaky_relu"``, whose inverse is exact to
rounding.

Forward-mode AD is not defined (a ``custom_vjp``); reverse mode of any order is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core
from jaxbn._checks import AxisArg, AxisName

__all__ = [
    "ACTIVATIONS",
    "INVERTIBLE_ACTIVATIONS",
    "BatchNormActResiduals",
    "activate",
    "batch_norm_act",
    "batch_norm_act_bwd",
    "batch_norm_act_fwd",
    "check_activation",
    "effective_scale",
    "invert_activation",
]

#: Every activation name the layers accept (``"leaky_relu"`` with slope 0.01 here;
#: :func:`activate` takes the slope).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
    "identity": lambda x: x,
}

#: The activations :func:`batch_norm_act` can fuse: invertible, with a derivative
#: that can be read off the output.
INVERTIBLE_ACTIVATIONS = ("elu", "identity", "leaky_relu")

_NOT_INVERTIBLE = {
    "relu": "it maps every negative input to 0, so its input cannot be recovered "
    "from its output; use 'leaky_relu'",
}


def check_activation(activation, negative_slope, *, name: str = "activation") -> None:
    """Refuses an activation that cannot be fused and a bad ``negative_slope``.

    Args:
        activation: the activation's name.
        negative_slope: leaky ReLU's slope below zero (a Python number).
        name: how the caller calls the ``activation`` argument (for the message).

    Raises:
        ValueError: ``activation`` not in :data:`INVERTIBLE_ACTIVATIONS` (with the
            reason for a known non-invertible one), or ``negative_slope`` not a
            finite number > 0.
        TypeError: ``negative_slope`` not a real Python number.
    """
    if activation not in INVERTIBLE_ACTIVATIONS:
        why = _NOT_INVERTIBLE.get(activation)
        if why is None and activation in ACTIVATIONS:
            why = "fusing needs an activation whose input is recovered exactly from its output"
        why = f" ({activation!r} is not invertible: {why})" if why else ""
        raise ValueError(
            f"{name} must be one of {list(INVERTIBLE_ACTIVATIONS)} to be fused with batch "
            f"norm, got {activation!r}{why}"
        )
    _checks.check_python_float("negative_slope", negative_slope)
    if not (math.isfinite(negative_slope) and negative_slope > 0):
        raise ValueError(
            f"negative_slope must be a finite number > 0 (leaky ReLU must be invertible), "
            f"got {negative_slope!r}"
        )


def activate(y: ArrayLike, activation: str, *, negative_slope: float = 0.01) -> jax.Array:
    """Applies the activation named ``activation`` (a key of :data:`ACTIVATIONS`).

    Args:
        y: any array.
        activation: the name.
        negative_slope: leaky ReLU's slope below zero (ignored by the others).

    Returns:
        ``f(y)``, like ``y``.
    """
    if activation == "leaky_relu":
        return jax.nn.leaky_relu(y, negative_slope)
    return ACTIVATIONS[activation](y)


def invert_activation(z: jax.Array, activation: str, negative_slope: float = 0.01):
    """``(y, f'(y))`` from ``z = f(y)``, for an invertible ``f``, in ``z``'s dtype.

    leaky ReLU: ``y = z`` where ``z >= 0``, else ``z / slope``; ``f' = 1`` or ``slope``.
    ELU: ``y = z`` where ``z > 0``, else ``log1p(z)``; ``f' = 1`` or ``exp(y) = z + 1``.
    ``z`` of ELU is at least -1; where it has rounded to -1, ``log1p`` is taken
    one unit above (``y`` stays finite; ``f'`` is ``z + 1``, 0 or nearly).
    The signs of ``z`` and ``y`` agree, so each branch is picked as the forward's
    (``jax.nn.leaky_relu`` takes ``y >= 0``, ``jax.nn.elu`` ``y > 0``).

    Args:
        z: the activation's output.
        activation: one of :data:`INVERTIBLE_ACTIVATIONS`.
        negative_slope: leaky ReLU's slope below zero.

    Returns:
        ``(y, fprime)``: the activation's input and its derivative there.
    """
    return _invert(z, activation, _constants(activation, negative_slope, z.dtype))


def _constants(activation, negative_slope, dtype) -> tuple[jax.Array, ...]:
    """The scalars :func:`_invert` uses, as arrays (see ``_bwd`` for why)."""
    if activation == "leaky_relu":
        values = (0.0, 1.0, 1.0 / negative_slope, 1.0 - negative_slope)
    else:
        values = (0.0, 1.0, -1.0 + float(jnp.finfo(dtype).epsneg))
    return tuple(jnp.asarray(v, dtype) for v in values)


def _invert(z, activation, c, z_fprime=None):
    """:func:`invert_activation` with its constants ``c`` from :func:`_constants`.

    ``f'`` is read off ``z_fprime`` (``z`` itself by default): the backward
    passes ``z`` tied to the cotangent for ``y`` and the plain ``z`` for ``f'``
    (``sign`` of the tied value takes a slow path in XLA:CPU's reductions).
    Written with ``max``, ``min`` and ``sign`` rather than ``where``: XLA on CPU
    fuses those into a reduction over ``z``, and a ``where`` it does not.
    """
    zf = z if z_fprime is None else z_fprime
    if activation == "identity":
        return z, c[1]
    zero, one = c[0], c[1]
    pos, neg = jnp.maximum(z, zero), jnp.minimum(z, zero)
    if activation == "leaky_relu":
        inv_slope, one_minus_slope = c[2], c[3]
        below = jnp.maximum(-jnp.sign(zf), zero)  # 1 where z < 0, else 0 (also at -0.0)
        return pos + neg * inv_slope, one - one_minus_slope * below
    floor = c[2]
    return pos + jnp.log1p(jnp.maximum(neg, floor)), one + jnp.minimum(zf, zero)


def effective_scale(scale: ArrayLike | None, *, eps: float) -> jax.Array | None:
    """The scale :func:`batch_norm_act` multiplies by: ``|scale| + eps``.

    Use it for the same layer in evaluation mode or when folding it, e.g.
    ``batch_norm_inference(x, effective_scale(scale, eps=eps), bias, mean, var)``.

    Args:
        scale: ``[features]`` parameter ``gamma``, or ``None`` (a scale of 1).
        eps: batch norm's ``eps``.

    Returns:
        ``|scale| + eps`` in ``scale``'s dtype promoted to at least float32 (as the
        training op computes it: in bfloat16 the ``eps`` would be lost to
        rounding), or ``None``.
    """
    if scale is None:
        return None
    scale = jnp.asarray(scale)
    scale = scale.astype(_checks.compute_dtype(scale.dtype))
    return _abs(scale) + jnp.asarray(eps, scale.dtype)


@jax.custom_jvp
def _abs(v):
    """``|v|`` with the derivative ``+1`` at 0 (a subgradient), so ``gamma = 0`` trains."""
    return jnp.abs(v)


@_abs.defjvp
def _abs_jvp(primals, tangents):
    (v,), (t,) = primals, tangents
    return jnp.abs(v), jnp.where(v >= 0, t, -t)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchNormActResiduals:
    """What the forward keeps for the backward: ``z`` and per-feature vectors.

    Attributes:
        z: the output, ``[..., features]`` in ``x``'s dtype. The next layer keeps
            it anyway (it is its input), so holding it costs no memory; ``x``,
            ``y`` and ``x_hat`` are recovered from it and are never kept.
        inv_std: ``[features]`` ``1 / sqrt(var + eps)``, in the compute dtype.
        scale: ``[features]`` ``|gamma| + eps`` in the compute dtype, or ``None``
            (a scale of 1): the divisor that recovers ``x_hat``.
        gamma: ``[features]`` the ``scale`` argument, or ``None``; its sign
            and dtype give ``dscale``.
        bias: ``[features]`` ``beta``, or ``None``; needed to recover ``x_hat``.
        mask: the boolean mask of kept entries, of ``x``'s rank, or ``None``.
        count: the number of values that each statistic averages (summed over
            ``axis_name``): a scalar, or ``[features]`` when the mask varies along
            the feature axes.
        axes: the forward's feature axes (sorted, non-negative): static.
        axis_name: the forward's named axes, a tuple (``()`` for none): static.
        activation: the forward's activation: static.
        negative_slope: the forward's slope of leaky ReLU: static.
    """

    z: jax.Array
    inv_std: jax.Array
    scale: jax.Array | None
    gamma: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    count: jax.Array
    axes: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    axis_name: Any = dataclasses.field(default=None, metadata={"static": True})
    activation: str = dataclasses.field(default="leaky_relu", metadata={"static": True})
    negative_slope: float = dataclasses.field(default=0.01, metadata={"static": True})


def _check_slope_recoverable(negative_slope, dtype):
    """Refuses a slope so small that ``z = slope * y`` in ``x``'s dtype loses ``y``.

    Values of ``z`` below the dtype's smallest normal number are flushed to zero
    (or lose their digits), so every ``y`` smaller than ``tiny / slope`` would be
    recovered as 0: the slope must keep that below 1% of ``y``'s unit scale.
    """
    tiny = float(jnp.finfo(dtype).tiny)
    if tiny / negative_slope > 1e-2:
        raise ValueError(
            f"negative_slope={negative_slope!r} is too small to be inverted in x's dtype "
            f"{jnp.dtype(dtype)}: z = slope * y underflows for |y| < {tiny / negative_slope:.3g}, "
            f"so y cannot be recovered from z; use negative_slope >= {100 * tiny:.3g}"
        )


def _op_args(x, scale, bias, activation, negative_slope, axis, eps, axis_name, mask):
    """Checks the public arguments; returns those of ``_fwd`` / ``_batch_norm_act``."""
    check_activation(activation, negative_slope)
    args = _checks.op_args(x, scale, bias, axis=axis, eps=eps, axis_name=axis_name, mask=mask)
    if activation == "leaky_relu":
        _check_slope_recoverable(negative_slope, args.x.dtype)
    return (*args, activation, float(negative_slope))


def _fwd(x, scale, bias, mask, feat, eps, axis_name, activation, negative_slope):
    count, mean, var, resid = _core.statistics(x, feat, mask, axis_name)
    inv_std = lax.rsqrt(var + eps)
    s = None if scale is None else effective_scale(scale.astype(mean.dtype), eps=eps)
    # z = f(y), y computed as by batch_norm with the scale s: one pass over x,
    # y never written.
    y = _core.normalize(x, mean, resid, inv_std, s, bias, feat)
    z = activate(y, activation, negative_slope=negative_slope).astype(x.dtype)
    res = BatchNormActResiduals(
        z, inv_std, s, scale, bias, mask, count, feat, axis_name, activation, negative_slope
    )
    return (z, mean, var), res


def _bwd(res, cotangents):
    # Chain rule, per feature, with x_hat = (x - mean) * inv_std, s = |gamma| + eps,
    # y = s * x_hat + bias, z = f(y) and the cotangents (dz, g_mean, g_var).
    #
    # First the activation and the affine map, inverted (x is not kept):
    #   y     = f^-1(z),   dy = dz * f'(y)   (f' read off z: see invert_activation)
    #   x_hat = (y - bias) / s
    # then batch norm's backward (jaxbn/ops.py, _bwd) with x - mean = x_hat / inv_std:
    #   dbias  = sum_i dy_i
    #   ds     = sum_i dy_i * x_hat_i,        dgamma = sign(gamma) * ds
    #   dx_i   = s * inv_std * dy_i
    #          + m_i / n * [g_mean - s * inv_std * dbias]                   (through mean)
    #          + m_i / n * 2 x_hat_i / inv_std * [g_var - s * inv_std^2 / 2 * ds]  (through var)
    # where m_i is the mask (1 without one) and n = sum_i m_i. Collecting:
    #
    #   dx = A * dy + m * (P * x_hat + Q)
    #   A  = s * inv_std
    #   P  = (2 g_var / inv_std - inv_std * sum_i s * dy_i x_hat_i) / n
    #   Q  = (g_mean - inv_std * sum_i s * dy_i) / n
    #
    # so the backward is two fused reductions over (z, dz) for the sums and one
    # pass for dx, each recomputing what it needs from z in registers. In dx,
    # x_hat is kept as (y - bias) / s rather than expanded into y / s - bias / s.
    z, inv_std, s, gamma, bias = res.z, res.inv_std, res.scale, res.gamma, res.bias
    mask, feat, activation = res.mask, res.axes, res.activation
    dz, g_mean, g_var = cotangents
    ndim = z.ndim
    red = tuple(a for a in range(ndim) if a not in feat)
    cdt = inv_std.dtype
    # Nothing derived from z may be computed before dz arrives: XLA is otherwise
    # free to compute y, f'(y) or x_hat right after the forward and keep them
    # (x-sized) alive until the backward reaches this layer, undoing the saving.
    # An optimization_barrier does not order anything on every backend (XLA:CPU
    # removes it once CSE has run), so the tie is arithmetic: each pass recovers
    # y from z + 0 * dz, exact for finite dz and fused into the pass that reads both.
    #
    # Each of the three passes (the two sums, then dx) gets its own handles
    # (_core.handles) on z, dz, the per-feature vectors and even the scalar
    # constants: XLA on CPU fuses a broadcast or an elementwise producer into a
    # reduction only when the reduction is its single user; a shared one is
    # written out as an x-sized temporary.
    inv_s = None if s is None else _core.expand(1.0 / s, ndim, feat)
    b = None if bias is None else _core.expand(bias.astype(cdt), ndim, feat)
    consts = _constants(activation, res.negative_slope, cdt)
    passes = _core.handles((z, jnp.asarray(dz), inv_s, b, consts), 3)

    def recover(k):
        """``(dy, x_hat)`` in the compute dtype, from the ``k``-th pass's handles."""
        z_k, dz_k, inv_s, b, consts = passes[k]
        dz_k = dz_k.astype(cdt)
        z_k = z_k.astype(cdt)
        y, fprime = _invert(z_k + consts[0] * dz_k, activation, consts, z_k)
        x_hat = y if b is None else y - b
        return dz_k * fprime, (x_hat if inv_s is None else x_hat * inv_s)

    sum_dy = jnp.sum(recover(0)[0], axis=red)
    if activation == "elu":
        dy1, x_hat1 = recover(1)
        sum_dy_xh = jnp.sum(dy1 * x_hat1, axis=red)
    else:
        # Piecewise linear through 0: dy * y = dz * f'(y) * y = dz * z exactly, so
        # sum dy * x_hat = (sum dz * z - bias * sum dy) / s, from a plain product.
        # Its rounding, eps * |bias| / s relative, is that of x_hat itself.
        z1, dz1 = passes[1][:2]
        sum_dyy = jnp.sum(dz1.astype(cdt) * z1.astype(cdt), axis=red)
        sum_dy_xh = sum_dyy if bias is None else sum_dyy - bias.astype(cdt) * sum_dy
        if s is not None:
            sum_dy_xh = sum_dy_xh / s
    # Over several devices, as in ops._bwd (_core.reduce_sums).
    mean_term, var_term, dscale, dbias = _core.reduce_sums(
        res, (sum_dy, sum_dy_xh), (g_mean, g_var), s, gamma, bias, (z, dz)
    )
    dy2, x_hat2 = recover(2)
    corr = _core.expand(var_term / inv_std, ndim, feat) * x_hat2 + _core.expand(
        mean_term, ndim, feat
    )
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    a = inv_std if s is None else s * inv_std
    dx = _core.expand(a, ndim, feat) * dy2 + corr
    if gamma is not None:
        dscale = jnp.where(gamma >= 0, dscale, -dscale)
    return dx.astype(z.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _batch_norm_act(x, scale, bias, mask, feat, eps, axis_name, activation, negative_slope):
    return _fwd(x, scale, bias, mask, feat, eps, axis_name, activation, negative_slope)[0]


def _bwd_rule(feat, eps, axis_name, activation, negative_slope, res, cotangents):
    return (*_bwd(res, cotangents), None)  # the mask has no cotangent


_batch_norm_act.defvjp(_fwd, _bwd_rule)
_compiled_batch_norm_act = _core.compiled(_batch_norm_act, static_argnums=(4, 5, 6, 7, 8))


def batch_norm_act(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    axis: AxisArg = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Training-mode batch norm fused with an invertible activation (In-Place ABN).

    .. math::

        z = f\left((|\gamma| + \epsilon)
            \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta\right)

    The backward keeps only ``z`` and per-feature vectors (see the module
    docstring), and gives the gradients of
    ``f(batch_norm(x, |scale| + eps, bias))``. Statistics, masks, named axes,
    dtypes and composition (jit, vmap, scan, checkpoint, grad of grad) are those
    of :func:`jaxbn.batch_norm`.

    Args:
        x: ``[..., features]`` input.
        scale: ``[features]`` ``gamma`` (the layer multiplies by
            ``|gamma| + eps``: see :func:`effective_scale`), or ``None`` for 1.
        bias: ``[features]`` ``beta``, or ``None`` for 0.
        activation: ``"leaky_relu"``, ``"elu"`` (alpha 1) or ``"identity"``.
        negative_slope: leaky ReLU's slope below zero, a finite number > 0.
        axis: feature axis or tuple of axes (negative allowed).
        eps: positive constant added to the variance, and to ``|gamma|``.
        axis_name: a named mapped axis (or tuple): statistics over the global batch.
        mask: boolean, broadcastable to ``x`` without its feature axes; only
            ``True`` entries count in the statistics.

    Returns:
        ``(z, mean, var)``: ``z`` like ``x`` (its dtype); the batch ``mean``
        and biased ``var`` shaped like the feature axes (float32 or wider).

    Raises:
        ValueError: a non-invertible ``activation`` (ReLU: say ``"leaky_relu"``),
            ``negative_slope`` <= 0 or not finite, or any bad argument
            :func:`jaxbn.batch_norm` refuses; raised while tracing.
        TypeError: as :func:`jaxbn.batch_norm`; ``negative_slope`` not a number.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbn
        >>> x = jnp.array([[1.0], [3.0]])
        >>> z, mean, var = jaxbn.batch_norm_act(x, None, None, negative_slope=0.5)
        >>> z.ravel().round(4)  # x_hat = [-1, 1] (to eps), leaky ReLU with slope 0.5
        Array([-0.5,  1. ], dtype=float32)
    """
    return _compiled_batch_norm_act(
        *_op_args(x, scale, bias, activation, negative_slope, axis, eps, axis_name, mask)
    )


def batch_norm_act_fwd(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    activation: str = "leaky_relu",
    negative_slope: float = 0.01,
    axis: AxisArg = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], BatchNormActResiduals]:
    """The forward pass of :func:`batch_norm_act`: outputs and the residuals.

    Args:
        x: ``[..., features]`` input, as in :func:`batch_norm_act`.
        scale: ``[features]`` or ``None``, as in :func:`batch_norm_act`.
        bias: ``[features]`` or ``None``, as in :func:`batch_norm_act`.
        activation: the invertible activation, as in :func:`batch_norm_act`.
        negative_slope: leaky ReLU's slope below zero, as in :func:`batch_norm_act`.
        axis: the feature axis or axes, as in :func:`batch_norm_act`.
        eps: added to the variance, as in :func:`batch_norm_act`.
        axis_name: named axes to synchronize over, as in :func:`batch_norm_act`.
        mask: which entries count, as in :func:`batch_norm_act`.

    Returns:
        ``((z, mean, var), residuals)``; pass ``residuals`` to
        :func:`batch_norm_act_bwd`.
    """
    return _fwd(*_op_args(x, scale, bias, activation, negative_slope, axis, eps, axis_name, mask))


def batch_norm_act_bwd(
    res: BatchNormActResiduals,
    cotangents: tuple[ArrayLike, ArrayLike, ArrayLike],
    *,
    activation: str | None = None,
    negative_slope: float | None = None,
    axis: AxisArg | None = None,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The hand-derived backward pass of :func:`batch_norm_act`.

    The residuals record the forward's activation, slope, feature axes and named
    axis; the keyword arguments may repeat them (``None``: the forward's), and any
    other value is refused rather than silently giving other gradients.

    Args:
        res: the residuals from :func:`batch_norm_act_fwd`.
        cotangents: ``(dz, dmean, dvar)``, the upstream gradients of the outputs
            (``dz`` with ``z``'s shape; ``dmean``, ``dvar`` with the feature shape).
        activation: ``None`` or the forward's activation.
        negative_slope: ``None`` or the forward's slope.
        axis: ``None`` or the forward's feature axis or axes.
        axis_name: ``None`` or the forward's named axis.

    Returns:
        ``(dx, dscale, dbias)``; ``dscale``/``dbias`` are ``None`` where the
        forward had no ``scale``/``bias``.

    Raises:
        TypeError: if ``res`` is not a :class:`BatchNormActResiduals` or a
            cotangent is not a floating-point array of the right kind.
        ValueError: if an argument differs from the forward's, or a cotangent has
            the wrong shape (each message names the argument).
    """
    cotangents = _checks.check_backward(
        res,
        BatchNormActResiduals,
        "batch_norm_act_fwd",
        cotangents,
        out="z",
        names=("dz", "dmean", "dvar"),
        axis=axis,
        activation=activation,
        negative_slope=negative_slope,
        axis_name=axis_name,
    )
    return _bwd(res, cotangents)

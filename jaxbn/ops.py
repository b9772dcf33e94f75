r"""Batch normalization as a ``jax.custom_vjp`` with a hand-derived backward pass.

The training-mode op normalizes every feature with the statistics of the batch:

.. math::

    \mu = \frac{1}{n} \sum_i x_i, \qquad
    \sigma^2 = \frac{1}{n} \sum_i (x_i - \mu)^2, \qquad
    y_i = \gamma \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

where the sums run over every axis of ``x`` except the feature axes. The forward
(``batch_norm_fwd``) and the backward (``batch_norm_bwd``) are public functions:
``batch_norm`` is nothing but the two registered with ``defvjp``.

Memory traffic is what batch norm costs, so the only x-sized arrays written are
``y`` and ``dx``: the forward computes both moments in two fused reductions over
``x`` (no shifted or centred copy is written) and then ``y`` in one pass; the
backward computes its two sums in fused reductions over ``x`` and ``dy`` and then
``dx`` in one pass (10 passes over x-sized data in all, against a floor of 8).
The residuals are ``x`` (which the caller keeps alive anyway) and per-feature
vectors; no normalized copy of ``x`` is stored.

Forward-mode differentiation (``jax.jvp``, ``jax.jacfwd``) is not defined for a
``custom_vjp`` function. Use :func:`jaxbn.reference.batch_norm`, which has the
same signature and results and is differentiated by JAX itself, when you need it.
Reverse mode of any order works: the backward is written in differentiable JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core
from jaxbn._checks import AxisArg, AxisName

__all__ = [
    "BatchNormResiduals",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_inference",
    "batch_stats",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BatchNormResiduals:
    """What the forward keeps for the backward: ``x`` and per-feature vectors.

    Attributes:
        x: the input, ``[..., features]`` in its own dtype. The caller keeps it
            alive anyway (it is the previous layer's output), so holding it costs
            no extra memory; a normalized copy would cost one more activation.
        mean: ``[features]`` batch mean, in the compute dtype (float32 or wider).
        mean_residue: ``[features]`` what ``mean`` lost to rounding: the exact
            mean is ``mean + mean_residue`` to within the summation's error. At
            ``|mean| >> std`` it is a sizeable fraction of ``std``, and the
            backward needs ``sum(x - exact mean) = 0``, not ``sum(x - mean)``.
        inv_std: ``[features]`` ``1 / sqrt(var + eps)``, in the compute dtype.
        scale: ``[features]`` or ``None``; needed for ``dx`` (and kept in its own
            dtype so ``dscale`` can be returned in it).
        bias: a zero-size placeholder in ``bias``'s dtype or ``None``; only
            its dtype is used, to return ``dbias`` in it.
        mask: the boolean mask of kept values (``x``'s rank), or ``None``.
        count: the number of values that each statistic averages (summed over
            ``axis_name``): a scalar, or ``[features]`` when the mask varies
            along the feature axes.
        axes: the forward's feature axes (sorted, non-negative): static.
        axis_name: the forward's named axes, a tuple (``()`` for none): static.
    """

    x: jax.Array
    mean: jax.Array
    mean_residue: jax.Array
    inv_std: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    count: jax.Array
    axes: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    axis_name: Any = dataclasses.field(default=None, metadata={"static": True})


def batch_norm_fwd(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    *,
    axis: AxisArg = -1,
    eps: float = 1e-5,
    axis_name: AxisName = None,
    mask: ArrayLike | None = None,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], BatchNormResiduals]:
    """The forward pass of :func:`batch_norm`: outputs and the residuals.

    Args:
        x: ``[..., features]`` input (any floating dtype).
        scale: ``[features]`` multiplier ``gamma``, or ``None`` for 1.
        bias: ``[features]`` offset ``beta``, or ``None`` for 0.
        axis: feature axis or axes of ``x`` (kept); the others are reduced.
        eps: added to the variance before the square root.
        axis_name: named mapped axis (or tuple of them) over which the
            statistics are also averaged (``shard_map``/``pmap``).
        mask: boolean; ``False`` entries are left out of the statistics. Either
            of ``x``'s rank and broadcastable to ``x`` (Flax's convention; a
            mask varying along the feature axes gives each feature its own
            count), or with one axis per reduction axis (``[N]`` for ``[N, C]``).

    Returns:
        ``((y, mean, var), residuals)`` where ``residuals`` is a
        :class:`BatchNormResiduals` to pass to :func:`batch_norm_bwd`.
    """
    return _fwd(
        *_checks.op_args(x, scale, bias, axis=axis, eps=eps, axis_name=axis_name, mask=mask)
    )


def _fwd(x, scale, bias, mask, feat, eps, axis_name):
    count, mean, var, resid = _core.statistics(x, feat, mask, axis_name)
    inv_std = lax.rsqrt(var + eps)
    y = _core.normalize(x, mean, resid, inv_std, scale, bias, feat)
    # A zero-size slice of bias: its dtype and (under shard_map) its type.
    bias_tag = None if bias is None else jnp.ravel(bias)[:0]
    res = BatchNormResiduals(x, mean, resid, inv_std, scale, bias_tag, mask, count, feat, axis_name)
    return (y.astype(x.dtype), mean, var), res


def batch_norm_bwd(
    res: BatchNormResiduals,
    cotangents: tuple[ArrayLike, ArrayLike, ArrayLike],
    *,
    axis: AxisArg | None = None,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The hand-derived backward pass of :func:`batch_norm`.

    Args:
        res: the residuals returned by :func:`batch_norm_fwd`; they record the
            forward's feature axes and named axis.
        cotangents: ``(dy, dmean, dvar)``: the upstream gradients of the three
            outputs (``dy`` with ``x``'s shape; ``dmean``, ``dvar`` with the
            feature shape).
        axis: ``None`` (the forward's), or the same feature axis or axes as in
            the forward; any other is refused.
        axis_name: the same named axis as in the forward (``None`` is taken as
            the forward's too).

    Returns:
        ``(dx, dscale, dbias)``; ``dscale``/``dbias`` are ``None`` where the
        forward had no ``scale``/``bias``.

    Raises:
        TypeError: if ``res`` is not a :class:`BatchNormResiduals` or
            ``cotangents`` is not a triple.
        ValueError: if ``axis`` or ``axis_name`` differ from the forward's, or a
            cotangent has the wrong shape (each message names the argument).
    """
    cotangents = _checks.check_backward(
        res,
        BatchNormResiduals,
        "batch_norm_fwd",
        cotangents,
        out="x",
        names=("dy", "dmean", "dvar"),
        axis=axis,
        axis_name=axis_name,
    )
    return _bwd(res, cotangents)


def _bwd(res, cotangents):
    # Chain rule, per feature, with mu the exact mean, x_hat = (x - mu) * inv_std,
    # y = scale * x_hat + bias, and the cotangents (dy, g_mean, g_var):
    #
    #   dbias  = sum_i dy_i
    #   dscale = sum_i dy_i * x_hat_i = inv_std * sum_i dy_i (x_i - mu)
    #   dx_i   = scale * inv_std * dy_i                        (through y directly)
    #          + m_i / n * [g_mean - scale * inv_std * dbias]  (through mean)
    #          + m_i / n * 2 (x_i - mu)
    #                * [g_var - scale * inv_std^3 / 2 * sum_j dy_j (x_j - mu)]  (through var)
    # where m_i is the mask (1 without one) and n = sum_i m_i (per feature). The
    # derivative of var through the mean, -2 / n * sum_j m_j (x_j - mu) / n, is
    # zero because mu is the exact mean. Collecting:
    #
    #   dx = A * dy + m * (B * (x - mu) + C)
    #   A  = scale * inv_std
    #   B  = (2 g_var - A * inv_std * dscale) / n
    #      = (2 g_var - inv_std^2 * sum_i scale * dy_i x_hat_i) / n
    #   C  = (g_mean - A * dbias) / n = (g_mean - inv_std * sum_i scale * dy_i) / n
    #
    # so the backward is one fused pass for the sums of dy and dy * (x - mean)
    # and one pass for dx. Keeping (x - mean) instead of expanding B * x - B * mean
    # avoids cancellation when |mean| >> std. Over several devices the sums run
    # over the global batch, each device's term weighted by its own scale
    # (_core.reduce_sums, which also returns B and C's numerators divided by n).
    #
    # In floating point the stored mean is mu rounded: mu = mean + r, with the
    # residue r kept by the forward. At |mean| >> std, r is a sizeable fraction
    # of std (at 1e5 in float32 the spacing of the numbers is 0.008), and using
    # x - mean for x - mu would put a term 2 g_var r / n into every dx_i, the
    # term that the exact derivation cancels. So, with r per feature:
    #
    #   sum_i dy_i (x_i - mu) = sum_i dy_i (x_i - mean) - r * sum_i dy_i
    #   B * (x - mu) + C      = B * (x - mean) + (C - B * r)
    #
    # per-feature corrections after the sums: no extra pass.
    x, mean, resid, inv_std = res.x, res.mean, res.mean_residue, res.inv_std
    scale, mask, feat = res.scale, res.mask, res.axes
    dy, g_mean, g_var = cotangents
    ndim = x.ndim
    red = tuple(a for a in range(ndim) if a not in feat)
    cdt = mean.dtype
    # Separate handles (_core.handles) on x, dy and mean for each of the passes:
    # the two sums, then dx. Three handles on x where two are used: a barrier on
    # (x, x) would be identical to the forward's, XLA would merge the two, and
    # one handle would then feed a forward and a backward pass (bfloat16 x would
    # be converted to float32 once and written out: 17 x-sizes of traffic, not 10).
    x_sum, x_dx, _ = (v.astype(cdt) for v in _core.handles(x, 3))
    dy_sum, dy_sum_xc, dyc = (v.astype(cdt) for v in _core.handles(jnp.asarray(dy), 3))
    mean_sum, mean_dx = _core.handles(mean, 2)
    sum_dy = jnp.sum(dy_sum, axis=red)
    sum_dy_xc = jnp.sum(dy_sum_xc * (x_sum - _core.expand(mean_sum, ndim, feat)), axis=red)
    centred = x_dx - _core.expand(mean_dx, ndim, feat)
    # sum_i dy_i x_hat_i, with the residue's correction (the residue is the same
    # on every device, so the correction commutes with the sums over devices).
    sum_dy_xhat = inv_std * (sum_dy_xc - resid * sum_dy)
    s = None if scale is None else scale.astype(cdt)
    mean_term, var_term, dscale, dbias = _core.reduce_sums(
        res, (sum_dy, sum_dy_xhat), (g_mean, g_var), s, scale, res.bias, (x, dy)
    )
    c = mean_term - var_term * resid
    # dx = a * dy + m * (b * (x - mean) + c), its vectors computed once.
    a, b, c = _core.computed_once((inv_std if s is None else s * inv_std, var_term, c))
    corr = _core.expand(b, ndim, feat) * centred + _core.expand(c, ndim, feat)
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = _core.expand(a, ndim, feat) * dyc + corr
    return dx.astype(x.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _batch_norm(x, scale, bias, mask, feat, eps, axis_name):
    return _fwd(x, scale, bias, mask, feat, eps, axis_name)[0]


def _bwd_rule(feat, eps, axis_name, res, cotangents):
    return (*_bwd(res, cotangents), None)  # the mask has no cotangent


_batch_norm.defvjp(_fwd, _bwd_rule)
_compiled_batch_norm = _core.compiled(_batch_norm, static_argnums=(4, 5, 6))


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
    r"""Training-mode batch normalization with a hand-written backward pass.

    .. math::

        y = \gamma \frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}} + \beta

    with the per-feature mean ``mu_B`` and biased variance ``sigma_B^2`` over
    every axis of ``x`` but ``axis``. Inputs in bfloat16 or float16 are reduced
    in float32; ``y`` has ``x``'s dtype, the statistics float32 (or float64 for
    float64 input). NaN or infinity in ``x`` propagates to the outputs of its
    features, as in every other implementation.

    Args:
        x: ``[..., features]`` input (``[N, C]``, ``[N, L, C]``, NHWC with
            ``axis=-1``, NCHW with ``axis=1``).
        scale: ``[features]`` ``gamma``, or ``None`` for no scale.
        bias: ``[features]`` ``beta``, or ``None`` for no offset.
        axis: feature axis or tuple of axes (negative allowed).
        eps: positive constant added to the variance.
        axis_name: a named mapped axis (``shard_map``, ``pmap``) or tuple of
            them: statistics are taken over the whole global batch.
        mask: boolean; only ``True`` entries count in the statistics (``y`` is
            computed everywhere and stays finite). Either of ``x``'s rank and
            broadcastable to ``x``, as in Flax (``[N, 1]`` or ``[N, C]`` for
            ``[N, C]``); where it varies along the feature axes each feature
            has its own count. Or with one axis per reduction axis, in order
            (``[N]`` for ``[N, C]``, ``[N, H, W]`` for NHWC), the same for every
            feature. Any other rank is refused (aligned from the right, ``[N]``
            on NCHW would mask along ``W``). A mask keeping nothing gives
            statistics of zero, not NaN; one keeping a single value of a
            feature is refused where it is concrete, like a batch of one.

    Returns:
        ``(y, mean, var)``: ``y`` like ``x``; ``mean`` and ``var`` shaped like
        the feature axes (``(C,)``, never ``(1, 1, 1, C)``).

    Raises:
        TypeError, ValueError: on a bad argument, while tracing (the message
            names it).

    Forward-mode AD is not available (this is a ``custom_vjp``); use
    :func:`jaxbn.reference.batch_norm` for ``jax.jvp``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbn
        >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> y, mean, var = jaxbn.batch_norm(x, jnp.ones(2), jnp.zeros(2))
        >>> mean, var
        (Array([ 2., 20.], dtype=float32), Array([  1., 100.], dtype=float32))
    """
    return _compiled_batch_norm(
        *_checks.op_args(x, scale, bias, axis=axis, eps=eps, axis_name=axis_name, mask=mask)
    )


def batch_stats(
    x: ArrayLike,
    *,
    axis: AxisArg = -1,
    axis_name: AxisName = None,
    mask: ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The statistics :func:`batch_norm` normalizes with, on their own.

    The same computation as inside the op (under ``jit`` XLA computes it once
    when both are used on the same ``x``), differentiated by JAX itself. The
    layer uses it where the statistics are needed before the op runs (batch
    renormalization computes its correction from them).

    Args:
        x: ``[..., features]`` input.
        axis: feature axis or axes.
        axis_name: named axis (or tuple) to reduce over as well.
        mask: boolean, as in :func:`batch_norm`.

    Returns:
        ``(count, mean, var)``: the number of values per feature (over the named
        axes too; a scalar, or shaped like the features when the mask varies
        along the feature axes), and the biased statistics shaped like the
        features.
    """
    args = _checks.op_args(
        x, None, None, axis=axis, eps=None, axis_name=axis_name, mask=mask, training=False
    )
    count, mean, var, _ = _core.statistics(args.x, args.feat, args.mask, args.axis_name)
    return count, mean, var


def batch_norm_inference(
    x: ArrayLike,
    scale: ArrayLike | None,
    bias: ArrayLike | None,
    mean: ArrayLike,
    var: ArrayLike,
    *,
    axis: AxisArg = -1,
    eps: float = 1e-5,
) -> jax.Array:
    r"""Evaluation-mode batch normalization with given (running) statistics.

    .. math::

        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    A per-feature affine map, differentiated by JAX itself (no custom rule is
    needed: nothing is reduced over the batch).

    Args:
        x: ``[..., features]`` input.
        scale: ``[features]`` or ``None``.
        bias: ``[features]`` or ``None``.
        mean: ``[features]`` statistics to normalize with.
        var: ``[features]`` statistics to normalize with.
        axis: feature axis or axes.
        eps: positive constant added to ``var``.

    Returns:
        ``y`` with the shape and dtype of ``x``.
    """
    args = _checks.op_args(x, scale, bias, axis=axis, eps=eps, training=False)
    fshape = tuple(args.x.shape[a] for a in args.feat)
    for name, v in (("mean", mean), ("var", var)):
        if v is None:
            raise TypeError(f"{name} must be a {list(fshape)} array of statistics, got None")
        _checks.check_feature_vector(name, v, fshape)
    cdt = _checks.compute_dtype(args.x.dtype)
    mean, var = (jnp.asarray(v).astype(cdt) for v in (mean, var))
    inv_std = lax.rsqrt(var + eps)
    y = _core.normalize(
        args.x, mean, jnp.zeros_like(mean), inv_std, args.scale, args.bias, args.feat
    )
    return y.astype(args.x.dtype)

"""Batch normalization as a ``jax.custom_vjp`` with a hand-derived backward pass.

The training-mode op normalizes every feature with the statistics of the batch:

.. math::

    \\mu = \\frac{1}{n} \\sum_i x_i, \\qquad
    \\sigma^2 = \\frac{1}{n} \\sum_i (x_i - \\mu)^2, \\qquad
    y_i = \\gamma \\frac{x_i - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

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

from jaxbn import _checks
from jaxbn._checks import AxisArg, AxisName

__all__ = [
    "BatchNormResiduals",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_inference",
    "batch_stats",
]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x", "mean", "mean_residue", "inv_std", "scale", "bias", "mask", "count"],
    meta_fields=["axes", "axis_name"],
)
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
        axis_name: the forward's named axis or axes: static.
    """

    x: jax.Array
    mean: jax.Array
    mean_residue: jax.Array
    inv_std: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    count: jax.Array
    axes: tuple[int, ...] = ()
    axis_name: Any = None


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision inputs, the input's own dtype when wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _expand(v: jax.Array, ndim: int, feat: tuple[int, ...]) -> jax.Array:
    """Reshapes a ``[features]`` vector so that it broadcasts against ``x``."""
    return jnp.expand_dims(v, tuple(a for a in range(ndim) if a not in feat))


def _expand_mask(mask: jax.Array, ndim: int, feat: tuple[int, ...]) -> jax.Array:
    """A mask with ``x``'s rank, broadcastable to ``x``.

    A mask over the reduction axes gets the feature axes inserted (size 1); a
    mask that already has ``x``'s rank (as :func:`jaxbn._checks.check_mask`
    returns it) is returned as is.
    """
    if mask.ndim == ndim:
        return mask
    red_ndim = ndim - len(feat)
    mask = jnp.reshape(mask, (1,) * (red_ndim - mask.ndim) + mask.shape)
    return jnp.expand_dims(mask, feat)


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _handles(v, n: int) -> tuple:
    """``n`` separate handles on the same value, one for each consumer (on the CPU).

    XLA on CPU fuses an elementwise producer (a broadcast subtraction such as
    ``x - mean``, a conversion such as ``x.astype(float32)``) into its consumer
    only when the consumer is its single user; a producer shared by two passes
    is written out as an x-sized temporary and read back. Behind an
    ``optimization_barrier`` each consumer recomputes its own copy inside its
    fusion and streams ``x`` itself: fewer passes, no temporaries.

    This is a workaround for XLA:CPU's fusion rule, applied only where the
    computation is lowered for the CPU: on GPU and TPU, XLA fuses sibling
    reductions into one multi-output kernel that reads ``x`` once, which the
    barrier could prevent, so there the handles are the value itself
    (:func:`_plain_handles`). Both give the same numbers.
    """
    return lax.platform_dependent(
        v,
        cpu=functools.partial(_barrier_handles, n=n),
        default=functools.partial(_plain_handles, n=n),
    )


def _computed_once(vectors: tuple) -> tuple:
    """Per-feature vectors computed once, not once per element of ``x`` (on the CPU).

    XLA on CPU fuses the small computation of a per-feature vector into the
    x-sized loop that broadcasts it, and the loop then redoes it for every
    element of ``x``: the two-sum of the mean's residue and the backward's
    coefficients, some twenty operations per element where five are needed
    (at bfloat16, where the loop moves half the bytes, that makes ``dx`` take
    twice as long). An ``optimization_barrier`` does not stop it (XLA:CPU
    drops barriers before fusing); a reduction does, as XLA:CPU never fuses
    one into an elementwise consumer. So on the CPU the vectors (all of the
    feature shape) are stacked and summed with a row of zeros, which
    returns them unchanged (``v + 0 == v``; only ``-0.0`` becomes ``0.0``),
    computed once, in a small fusion of their own, that the loop only reads.
    Elsewhere they are the values themselves.
    """
    return lax.platform_dependent(*vectors, cpu=_reduced_vectors, default=_plain_vectors)


def _reduced_vectors(*vectors) -> tuple:
    # One reduction per group of vectors of the same shape, dtype and (inside
    # shard_map) varying axes, so that each comes back with its own type.
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(vectors):
        groups.setdefault((v.shape, v.dtype, _varying(v)), []).append(i)
    out = list(vectors)
    for idx in groups.values():
        stacked = jnp.stack([vectors[i] for i in idx])
        summed = jnp.sum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)
        for k, i in enumerate(idx):
            out[i] = summed[k]
    return tuple(out)


def _plain_vectors(*vectors) -> tuple:
    return vectors


def _barrier_handles(v, n: int) -> tuple:
    # One barrier per group of leaves with the same varying axes (inside
    # shard_map): a barrier gives all its outputs the union of its operands'
    # types, and each handle must keep the type of its value.
    leaves, tree = jax.tree.flatten((v,) * n)
    groups: dict[frozenset, list[int]] = {}
    for i, leaf in enumerate(leaves):
        groups.setdefault(_varying(leaf), []).append(i)
    out = list(leaves)
    for idx in groups.values():
        for i, h in zip(idx, lax.optimization_barrier([leaves[i] for i in idx]), strict=True):
            out[i] = h
    return jax.tree.unflatten(tree, out)


def _plain_handles(v, n: int) -> tuple:
    return (v,) * n


def _psum_over(v, axes: tuple[str, ...]):
    return lax.psum(v, axes) if axes else v


def _replicated_axes(p, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The named axes over which ``p`` is replicated (the same on every device).

    Inside ``shard_map`` JAX types each value as varying or replicated over each
    mesh axis; a replicated parameter needs a replicated (all-reduced) cotangent.
    ``None`` (no parameter) counts as replicated.
    """
    if p is None or not axes:
        return axes
    varying = _varying(p)
    return tuple(n for n in axes if n not in varying)


def _varying(v) -> frozenset:
    """The mesh axes over which ``v`` differs between devices (inside ``shard_map``)."""
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def _sharded_along(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether ``x``'s type says it is sharded along any of ``axes`` (explicit mesh)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


def _moments(x, red, mask, axis_name, cdt):
    """Returns ``(count, mean, var)`` over the axes ``red``, in the compute dtype ``cdt``.

    ``mean`` and ``var`` keep ``x``'s rank (size 1 on ``red``); ``count`` is a
    scalar, or has size 1 on ``red`` where the mask varies along the features.
    See :func:`_stats`, which also returns what the mean lost to rounding.
    """
    count, mean, var, _ = _stats(x, red, mask, axis_name, cdt)
    return count, mean, var


def _stats(x, red, mask, axis_name, cdt):
    """Returns ``(count, mean, var, mean_residue)``, the last three with ``x``'s rank.

    Two passes over ``x``, each a single fused reduction:

    1. the mean, shifted by ``s``, the median of three of the batch's own
       samples (per feature): ``mean = s + sum(x - s) / n``. Summing ``x - s``
       rather than ``x`` keeps the sum accurate when ``|mean| >> std`` (summing
       values of 1e6 in float32 loses the digits of a unit spread), and no
       single outlier can be the shift (a shift far out would make ``x - s``
       large and the mean's error with it). With a mask (padding may
       hold anything), a named axis (each device would have its own shift) or a
       batch sharded over an explicit mesh (a one-element slice of a sharded
       axis has no sharding) the shift is 0.
    2. the centred squares: ``var = sum((x - mean)^2) / n - residue^2``, where
       ``residue`` is what rounding ``s + sum(x - s) / n`` to ``mean`` lost
       (computed exactly, per feature, by the two-sum trick). Even with a
       shift far out (two outliers among the three samples) the mean's error
       stays a small fraction of ``std`` and the centred pass removes its
       effect from the variance; the naive ``E[x^2] - E[x]^2``, or the one-pass
       ``E[(x - s)^2] - E[x - s]^2`` with a far-out ``s``, would lose every
       digit.

    Each sum is all-reduced once over ``axis_name``.
    """
    # Each of the two passes gets its own handle on x (_handles).
    xa, xb = (v.astype(cdt) for v in _handles(x, 2))
    axes = _axis_tuple(axis_name)
    shifted = mask is None and axis_name is None and not _sharded_along(x, red)
    feat = tuple(a for a in range(x.ndim) if a not in red)
    # A count per feature where the mask varies along the feature axes.
    count = _checks.feature_counts(mask, x.shape, feat, dtype=cdt, keepdims=True)
    if mask is not None and all(mask.shape[a] == 1 for a in feat):
        count = jnp.reshape(count, ())
    count = _psum_over(count, axes)
    safe = jnp.maximum(count, 1.0)  # an all-masked batch: statistics of zero, not 0 / 0
    if shifted:
        shift = _median_of_three_samples(x, red).astype(cdt)
        mean_s = jnp.sum(xa - shift, axis=red, keepdims=True) / count
        # Two-sum: mean + residue == shift + mean_s exactly.
        mean = shift + mean_s
        back = mean - shift
        residue = (shift - (mean - back)) + (mean_s - back)
    else:
        kept = xa if mask is None else jnp.where(mask, xa, 0)
        mean = _psum_over(jnp.sum(kept, axis=red, keepdims=True), axes) / safe
        residue = jnp.zeros_like(mean)
    # Its own handle on the mean too: a broadcast shared with other users would
    # be written out as an x-sized array.
    (mean_d,) = _handles(mean, 1)
    d = xb - mean_d if mask is None else jnp.where(mask, xb - mean_d, 0)
    sq = _psum_over(jnp.sum(d * d, axis=red, keepdims=True), axes) / safe
    var = jnp.maximum(sq - residue * residue, 0.0)
    return count, mean, var, residue


def _median_of_three_samples(x, red):
    """Per feature, the median of three of the batch's samples (``x``'s rank, size 1 on ``red``).

    The first, middle and last along the longest reduction axis (index 0 on the
    others): no single sample, however far out, can be the median, so the
    shift stays within the spread of the data.
    """
    axis = max(red, key=lambda a: x.shape[a])
    n = x.shape[axis]
    a, b, c = (lax.slice_in_dim(x, i, i + 1, axis=axis) for i in (0, n // 2, n - 1))
    median = jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))
    for r in red:
        if r != axis:
            median = lax.slice_in_dim(median, 0, 1, axis=r)
    return lax.stop_gradient(median)


def _op_args(x, scale, bias, axis, eps, axis_name, mask):
    """Checks the public arguments; returns those of ``_fwd`` / ``_batch_norm``."""
    feat, mask = _checks.check_op_args(x, scale, bias, axis, eps, mask, axis_name=axis_name)
    scale, bias = (None if v is None else jnp.asarray(v) for v in (scale, bias))
    return jnp.asarray(x), scale, bias, mask, feat, float(eps), axis_name


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
    return _fwd(*_op_args(x, scale, bias, axis, eps, axis_name, mask))


def _fwd(x, scale, bias, mask, feat, eps, axis_name):
    ndim = x.ndim
    red = tuple(a for a in range(ndim) if a not in feat)
    cdt = _compute_dtype(x.dtype)
    emask = None if mask is None else _expand_mask(mask, ndim, feat)
    count, mean_k, var_k, resid_k = _stats(x, red, emask, axis_name, cdt)
    mean, var, resid = (jnp.squeeze(v, red) for v in (mean_k, var_k, resid_k))
    if jnp.ndim(count):
        count = jnp.squeeze(count, red)
    inv_std = lax.rsqrt(var + eps)
    # y = (x - mean - residue) * (scale * inv_std) + bias: one pass over x.
    # Subtracting the mean first (rather than y = x * a + b) keeps y accurate
    # when |mean| >> std; the residue (what the mean lost to rounding) folds
    # into the per-feature offset.
    a = inv_std if scale is None else inv_std * scale.astype(cdt)
    offset = -resid * a
    if bias is not None:
        offset = offset + bias.astype(cdt)
    # The per-feature vectors of the pass, computed once (_computed_once).
    mean_y, a, offset = _computed_once((mean, a, offset))
    mean_y = _expand(mean_y, ndim, feat)
    y = (x.astype(cdt) - mean_y) * _expand(a, ndim, feat) + _expand(offset, ndim, feat)
    # A zero-size slice of bias: its dtype and (under shard_map) its type.
    bias_tag = None if bias is None else jnp.ravel(bias)[:0]
    names = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    res = BatchNormResiduals(
        x, mean, resid, inv_std, scale, bias_tag, emask, count, axes=feat, axis_name=names
    )
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
    if not isinstance(res, BatchNormResiduals):
        raise TypeError(
            f"res must be the BatchNormResiduals returned by batch_norm_fwd, got "
            f"{type(res).__name__}"
        )
    x_shape, feat = res.x.shape, res.axes
    if axis is not None and _checks.feature_axes(len(x_shape), axis) != feat:
        raise ValueError(
            f"axis={axis!r} differs from the forward's feature axes {feat} (x of shape "
            f"{x_shape}): pass the forward's axis, or None"
        )
    names = tuple(axis_name) if isinstance(axis_name, list) else axis_name
    if axis_name is not None and names != res.axis_name:
        raise ValueError(
            f"axis_name={axis_name!r} differs from the forward's axis_name={res.axis_name!r}"
        )
    cotangents = _checks.check_cotangents(
        cotangents, x_shape, feat, ("dy", "dmean", "dvar"), shape_name="x's shape"
    )
    return _bwd(feat, res.axis_name, res, cotangents)


def _bwd(feat, axis_name, res, cotangents):
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
    #      = (2 g_var - inv_std^3 * sum_i scale * dy_i (x_i - mu)) / n
    #   C  = (g_mean - A * dbias) / n = (g_mean - inv_std * sum_i scale * dy_i) / n
    #
    # so the backward is one fused pass for the sums of dy and dy * (x - mean)
    # and one pass for dx. Keeping (x - mean) instead of expanding B * x - B * mean
    # avoids cancellation when |mean| >> std.
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
    scale, bias_tag, mask, count = res.scale, res.bias, res.mask, res.count
    dy, g_mean, g_var = cotangents
    ndim = x.ndim
    red = tuple(a for a in range(ndim) if a not in feat)
    cdt = mean.dtype
    # Separate handles (_handles) on x, dy and mean for each of the passes: the
    # two sums, then dx. Three handles on x where two are used: a barrier on
    # (x, x) would be identical to the forward's, XLA would merge the two, and
    # one handle would then feed a forward and a backward pass (bfloat16 x would
    # be converted to float32 once and written out: 17 x-sizes of traffic, not 10).
    x_sum, x_dx, _ = (v.astype(cdt) for v in _handles(x, 3))
    dy_sum, dy_sum_xc, dyc = (v.astype(cdt) for v in _handles(jnp.asarray(dy), 3))
    mean_sum, mean_dx = _handles(mean, 2)
    sum_dy = jnp.sum(dy_sum, axis=red)
    sum_dy_xc = jnp.sum(dy_sum_xc * (x_sum - _expand(mean_sum, ndim, feat)), axis=red)
    centred = x_dx - _expand(mean_dx, ndim, feat)
    # The sums run over the global batch. With a named axis, the sums for dx are
    # sum_devices scale_d * (sum_dy_d, sum_dy_xc_d): reduce over the axes where
    # scale is replicated first, scale, then reduce over the axes where it varies
    # per device (none, usually). dscale and dbias are the sums reduced over the
    # axes where scale and bias are replicated (a replicated parameter gets the
    # all-reduced gradient; a per-device one its own contribution). Each sum is
    # all-reduced exactly once. The residue is the same on every device.
    axes = _axis_tuple(axis_name)
    s_rep = _replicated_axes(scale, axes)
    b_rep = _replicated_axes(bias_tag, axes)
    r_sum_dy, r_sum_dy_xc = _psum_over((sum_dy, sum_dy_xc), s_rep)
    r_sum_dy_xc = r_sum_dy_xc - resid * r_sum_dy
    s = 1.0 if scale is None else scale.astype(cdt)
    t_sum_dy, t_sum_dy_xc = _psum_over(
        (s * r_sum_dy, s * r_sum_dy_xc), tuple(n for n in axes if n not in s_rep)
    )
    # A feature with nothing kept (count 0) has its correction masked out below;
    # dividing by max(count, 1) keeps the division finite there, so that the
    # derivatives of this backward (grad of grad) stay finite too.
    n = jnp.maximum(count, 1.0)
    b = (2.0 * g_var - inv_std**3 * t_sum_dy_xc) / n
    c = (g_mean - inv_std * t_sum_dy) / n - b * resid
    # dx = a * dy + m * (b * (x - mean) + c), its vectors computed once (_computed_once).
    a, b, c = _computed_once((s * inv_std, b, c))
    corr = _expand(b, ndim, feat) * centred + _expand(c, ndim, feat)
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = _expand(a, ndim, feat) * dyc + corr
    # Devices that each normalize with their own statistics (x varies over a
    # mesh axis not in axis_name) add their contributions to a parameter that is
    # replicated over that axis.
    local = tuple(sorted((_varying(x) | _varying(dy)) - set(axes)))
    dscale = dbias = None
    if scale is not None:
        dscale = _psum_over(inv_std * r_sum_dy_xc, _replicated_axes(scale, local))
        dscale = dscale.astype(scale.dtype)
    if bias_tag is not None:
        dbias = r_sum_dy if b_rep == s_rep else _psum_over(sum_dy, b_rep)
        dbias = _psum_over(dbias, _replicated_axes(bias_tag, local)).astype(bias_tag.dtype)
    return dx.astype(x.dtype), dscale, dbias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _batch_norm(x, scale, bias, mask, feat, eps, axis_name):
    return _fwd(x, scale, bias, mask, feat, eps, axis_name)[0]


def _batch_norm_fwd_rule(x, scale, bias, mask, feat, eps, axis_name):
    return _fwd(x, scale, bias, mask, feat, eps, axis_name)


def _batch_norm_bwd_rule(feat, eps, axis_name, res, cotangents):
    dx, dscale, dbias = _bwd(feat, axis_name, res, cotangents)
    return dx, dscale, dbias, None


_batch_norm.defvjp(_batch_norm_fwd_rule, _batch_norm_bwd_rule)


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
    """Training-mode batch normalization with a hand-written backward pass.

    .. math::

        y = \\gamma \\frac{x - \\mu_B}{\\sqrt{\\sigma_B^2 + \\epsilon}} + \\beta

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
    return _batch_norm(*_op_args(x, scale, bias, axis, eps, axis_name, mask))


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
    feat, mask = _checks.check_op_args(
        x, None, None, axis, 1.0, mask, training=False, axis_name=axis_name
    )
    x = jnp.asarray(x)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    emask = None if mask is None else _expand_mask(mask, x.ndim, feat)
    count, mean, var = _moments(x, red, emask, axis_name, _compute_dtype(x.dtype))
    if jnp.ndim(count):
        count = jnp.squeeze(count, red)
    return count, jnp.squeeze(mean, red), jnp.squeeze(var, red)


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
    """Evaluation-mode batch normalization with given (running) statistics.

    .. math::

        y = \\gamma \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} + \\beta

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
    feat, _ = _checks.check_op_args(x, scale, bias, axis, eps, None, training=False)
    x = jnp.asarray(x)
    fshape = tuple(x.shape[a] for a in feat)
    for name, v in (("mean", mean), ("var", var)):
        if v is None:
            raise TypeError(f"{name} must be a {list(fshape)} array of statistics, got None")
        _checks.check_feature_vector(name, v, fshape)
    cdt = _compute_dtype(x.dtype)
    a = lax.rsqrt(jnp.asarray(var).astype(cdt) + eps)
    if scale is not None:
        a = a * jnp.asarray(scale).astype(cdt)
    y = (x.astype(cdt) - _expand(jnp.asarray(mean).astype(cdt), x.ndim, feat)) * _expand(
        a, x.ndim, feat
    )
    if bias is not None:
        y = y + _expand(jnp.asarray(bias).astype(cdt), x.ndim, feat)
    return y.astype(x.dtype)

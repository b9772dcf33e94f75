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

import functools
import math
from typing import NamedTuple

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


class BatchNormResiduals(NamedTuple):
    """What the forward keeps for the backward: ``x`` and per-feature vectors.

    Attributes:
        x: the input, ``[..., features]`` in its own dtype. The caller keeps it
            alive anyway (it is the previous layer's output), so holding it costs
            no extra memory; a normalized copy would cost one more activation.
        mean: ``[features]`` batch mean, in the compute dtype (float32 or wider).
        inv_std: ``[features]`` ``1 / sqrt(var + eps)``, in the compute dtype.
        scale: ``[features]`` or ``None``; needed for ``dx`` (and kept in its own
            dtype so ``dscale`` can be returned in it).
        bias: a zero-size placeholder in ``bias``'s dtype or ``None``; only
            its dtype is used, to return ``dbias`` in it.
        mask: the boolean mask of kept examples, or ``None``.
        count: scalar, the number of values that each statistic averages
            (summed over ``axis_name``).
    """

    x: jax.Array
    mean: jax.Array
    inv_std: jax.Array
    scale: jax.Array | None
    bias: jax.Array | None
    mask: jax.Array | None
    count: jax.Array


def _compute_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision inputs, the input's own dtype when wider."""
    return jnp.promote_types(dtype, jnp.float32)


def _expand(v: jax.Array, ndim: int, feat: tuple[int, ...]) -> jax.Array:
    """Reshapes a ``[features]`` vector so that it broadcasts against ``x``."""
    return jnp.expand_dims(v, tuple(a for a in range(ndim) if a not in feat))


def _expand_mask(mask: jax.Array, ndim: int, feat: tuple[int, ...]) -> jax.Array:
    """Inserts the feature axes (size 1) into a mask over the reduction axes."""
    red_ndim = ndim - len(feat)
    mask = jnp.reshape(mask, (1,) * (red_ndim - mask.ndim) + mask.shape)
    return jnp.expand_dims(mask, feat)


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    if axis_name is None:
        return ()
    return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (axis_name,)


def _handles(v, n: int) -> tuple:
    """``n`` separate handles on the same value, one for each consumer.

    XLA on CPU fuses an elementwise producer (a broadcast subtraction such as
    ``x - mean``, a conversion such as ``x.astype(float32)``) into its consumer
    only when the consumer is its single user; a producer shared by two passes
    is written out as an x-sized temporary and read back. Behind an
    ``optimization_barrier`` each consumer recomputes its own copy inside its
    fusion and streams ``x`` itself: fewer passes, no temporaries.
    """
    return lax.optimization_barrier((v,) * n)


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

    Without a mask or a named axis the two moments come from a single fused pass
    over ``x`` shifted by one of its own samples ``s`` (per feature):
    ``var = E[(x - s)^2] - E[x - s]^2``. The shift keeps the subtraction
    well-conditioned when ``|mean| >> std`` (the naive ``E[x^2] - E[x]^2`` in
    float32 loses every digit at mean 1e4). Its error grows with
    ``(mean - s)^2 / var``, which is of order 1 for any ordinary sample.

    With a mask (padding may hold anything, so no sample is a safe shift), a
    named axis (each device would have its own shift) or a batch sharded over an
    explicit mesh (a one-element slice of a sharded axis has no sharding), it
    makes two passes: the mean first, then the centred squares; each sum is
    all-reduced once.
    """
    # Each of the two passes gets its own handles on x and the shift (_handles).
    xa, xb = (v.astype(cdt) for v in _handles(x, 2))
    if mask is None and axis_name is None and not _sharded_along(x, red):
        count = math.prod(x.shape[a] for a in red)
        shift = lax.stop_gradient(lax.slice_in_dim(x, 0, 1, axis=red[0]))
        for a in red[1:]:
            shift = lax.slice_in_dim(shift, 0, 1, axis=a)
        shift = shift.astype(cdt)
        s1, s2 = _handles(shift, 2)
        mean_s = jnp.sum(xa - s1, axis=red, keepdims=True) / count
        sq = jnp.sum(jnp.square(xb - s2), axis=red, keepdims=True) / count
        var = jnp.maximum(sq - mean_s * mean_s, 0.0)
        return jnp.asarray(count, cdt), shift + mean_s, var
    axes = _axis_tuple(axis_name)
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[a] for a in red), cdt)
        kept = xa
    else:
        count = jnp.sum(jnp.broadcast_to(mask, _reduced_shape(x.shape, red)), dtype=cdt)
        kept = jnp.where(mask, xa, 0)
    count = _psum_over(count, axes)
    safe = jnp.maximum(count, 1.0)  # an all-masked batch: statistics of zero, not 0 / 0
    mean = _psum_over(jnp.sum(kept, axis=red, keepdims=True), axes) / safe
    d = xb - mean if mask is None else jnp.where(mask, xb - mean, 0)
    var = _psum_over(jnp.sum(d * d, axis=red, keepdims=True), axes) / safe
    return count, mean, var


def _reduced_shape(shape, red):
    return tuple(d if i in red else 1 for i, d in enumerate(shape))


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
        mask: boolean array broadcastable to ``x`` without its feature axes;
            ``False`` entries are left out of the statistics.

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
    count, mean_k, var_k = _moments(x, red, emask, axis_name, cdt)
    mean, var = jnp.squeeze(mean_k, red), jnp.squeeze(var_k, red)
    inv_std = lax.rsqrt(var + eps)
    # y = (x - mean) * (scale * inv_std) + bias: one pass over x. Subtracting the
    # mean first (rather than y = x * a + b) keeps y accurate when |mean| >> std.
    a = inv_std if scale is None else inv_std * scale.astype(cdt)
    y = (x.astype(cdt) - mean_k) * _expand(a, ndim, feat)
    if bias is not None:
        y = y + _expand(bias.astype(cdt), ndim, feat)
    # A zero-size slice of bias: its dtype and (under shard_map) its type.
    bias_tag = None if bias is None else jnp.ravel(bias)[:0]
    res = BatchNormResiduals(x, mean, inv_std, scale, bias_tag, emask, count)
    return (y.astype(x.dtype), mean, var), res


def batch_norm_bwd(
    res: BatchNormResiduals,
    cotangents: tuple[ArrayLike, ArrayLike, ArrayLike],
    *,
    axis: AxisArg = -1,
    axis_name: AxisName = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """The hand-derived backward pass of :func:`batch_norm`.

    Args:
        res: the residuals returned by :func:`batch_norm_fwd`.
        cotangents: ``(dy, dmean, dvar)``: the upstream gradients of the three
            outputs (``dy`` like ``x``; ``dmean``, ``dvar`` like the features).
        axis: the same feature axis or axes as in the forward.
        axis_name: the same named axis as in the forward.

    Returns:
        ``(dx, dscale, dbias)``; ``dscale``/``dbias`` are ``None`` where the
        forward had no ``scale``/``bias``.
    """
    feat = _checks.feature_axes(res.x.ndim, axis)
    fshape = tuple(res.x.shape[a] for a in feat)
    if res.mean.shape != fshape or jnp.shape(cotangents[0]) != res.x.shape:
        raise ValueError(
            f"axis={axis!r} gives features {fshape}, but the residuals hold statistics of "
            f"shape {res.mean.shape}: pass the axis of the forward; dy must have x's shape "
            f"{res.x.shape}, got {jnp.shape(cotangents[0])}"
        )
    return _bwd(feat, axis_name, res, cotangents)


def _bwd(feat, axis_name, res, cotangents):
    # Chain rule, per feature, with x_hat = (x - mean) * inv_std,
    # y = scale * x_hat + bias, and the cotangents (dy, g_mean, g_var):
    #
    #   dbias  = sum_i dy_i
    #   dscale = sum_i dy_i * x_hat_i = inv_std * sum_i dy_i (x_i - mean)
    #   dx_i   = scale * inv_std * dy_i                        (through y directly)
    #          + m_i / n * [g_mean - scale * inv_std * dbias]  (through mean)
    #          + m_i / n * 2 (x_i - mean)
    #                * [g_var - scale * inv_std^3 / 2 * sum_j dy_j (x_j - mean)]  (through var)
    # where m_i is the mask (1 without one), n = sum_i m_i, and the mean term of
    # var's derivative vanishes because sum_i m_i (x_i - mean) = 0. Collecting:
    #
    #   dx = A * dy + m * (B * (x - mean) + C)
    #   A  = scale * inv_std
    #   B  = (2 g_var - A * inv_std * dscale) / n
    #      = (2 g_var - inv_std^3 * sum_i scale * dy_i (x_i - mean)) / n
    #   C  = (g_mean - A * dbias) / n = (g_mean - inv_std * sum_i scale * dy_i) / n
    #
    # so the backward is one fused pass for the sums of dy and dy * (x - mean)
    # and one pass for dx. Keeping (x - mean) instead of expanding B * x - B * mean
    # avoids cancellation when |mean| >> std.
    x, mean, inv_std, scale, bias_tag, mask, count = res
    dy, g_mean, g_var = cotangents
    ndim = x.ndim
    red = tuple(a for a in range(ndim) if a not in feat)
    cdt = mean.dtype
    # Separate handles (_handles) on x, dy and mean for each of the passes: the
    # two sums, then dx.
    x_sum, x_dx = (v.astype(cdt) for v in _handles(x, 2))
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
    # all-reduced exactly once.
    axes = _axis_tuple(axis_name)
    s_rep = _replicated_axes(scale, axes)
    b_rep = _replicated_axes(bias_tag, axes)
    r_sum_dy, r_sum_dy_xc = _psum_over((sum_dy, sum_dy_xc), s_rep)
    s = 1.0 if scale is None else scale.astype(cdt)
    t_sum_dy, t_sum_dy_xc = _psum_over(
        (s * r_sum_dy, s * r_sum_dy_xc), tuple(n for n in axes if n not in s_rep)
    )
    b = (2.0 * g_var - inv_std**3 * t_sum_dy_xc) / count
    c = (g_mean - inv_std * t_sum_dy) / count
    corr = _expand(b, ndim, feat) * centred + _expand(c, ndim, feat)
    if mask is not None:
        corr = jnp.where(mask, corr, 0)
    dx = _expand(s * inv_std, ndim, feat) * dyc + corr
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
        mask: boolean, broadcastable to ``x`` without its feature axes; only
            ``True`` entries count in the statistics (``y`` is computed
            everywhere and stays finite). A mask keeping nothing gives
            statistics of zero, not NaN.

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
        mask: boolean over the reduction axes, as in :func:`batch_norm`.

    Returns:
        ``(count, mean, var)``: the number of values per feature (a scalar, over
        the named axes too), and the biased statistics shaped like the features.
    """
    feat, mask = _checks.check_op_args(
        x, None, None, axis, 1.0, mask, training=False, axis_name=axis_name
    )
    x = jnp.asarray(x)
    red = tuple(a for a in range(x.ndim) if a not in feat)
    emask = None if mask is None else _expand_mask(mask, x.ndim, feat)
    count, mean, var = _moments(x, red, emask, axis_name, _compute_dtype(x.dtype))
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
    _checks.check_feature_vector("mean", mean, fshape)
    _checks.check_feature_vector("var", var, fshape)
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

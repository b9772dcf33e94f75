"""The computation shared by the batch-norm op and the fused op (internal).

:mod:`jaxbn.ops` and :mod:`jaxbn.act` normalize with the same statistics, in the
same way, and reduce their parameter gradients over devices by the same rule;
each of those ideas lives here once. Arguments arrive checked and in canonical
form (sorted feature axes ``feat``, reduction axes ``red``, the mask at ``x``'s
rank, ``axes`` a tuple of axis names): nothing here validates.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks


def compiled(fn, static_argnums: tuple[int, ...]):
    """``fn``, where it is called on concrete arrays, run as one compiled program.

    Outside any transformation JAX runs a function primitive by primitive, compiling
    and dispatching each on its own (the op is some fifty of them); compiled, a call
    is one program per shape. Inside ``jit``, ``vmap`` or ``grad`` (an argument is a
    tracer) ``fn`` is traced as it is, so the caller's compiled program is exactly
    what it would be without this wrapper.
    """
    jitted = jax.jit(fn, static_argnums=static_argnums)

    def call(*args):
        traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(args))
        return (fn if traced else jitted)(*args)

    return call


def expand(v: jax.Array, ndim: int, feat: tuple[int, ...]) -> jax.Array:
    """Reshapes a ``[features]`` vector so that it broadcasts against ``x``."""
    return jnp.expand_dims(v, tuple(a for a in range(ndim) if a not in feat))


def next_count(count: jax.Array) -> jax.Array:
    """``count + 1`` for a count of updates, saturating at its dtype's largest value.

    A wrapped (negative) count would turn ``momentum ** count`` into infinity;
    at 2**31 - 1 updates ``1 / count`` and ``momentum ** count`` are 0 in
    float32 anyway, so holding the count there changes nothing else.
    """
    return jnp.minimum(count, jnp.iinfo(count.dtype).max - 1) + 1


def psum_over(v, axes: tuple[str, ...]):
    """``lax.psum`` over ``axes``; ``v`` itself when there are none."""
    return lax.psum(v, axes) if axes else v


def varying(v) -> frozenset:
    """The mesh axes over which ``v`` differs between devices (inside checked ``shard_map``)."""
    aval = jax.typeof(v)
    manual = getattr(aval, "manual_axis_type", None)
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def replicated_axes(p, axes: tuple[str, ...], data_axes: frozenset) -> tuple[str, ...]:
    """The named axes over which the parameter ``p`` is shared by every device.

    Only checked ``shard_map`` types its values: there the data varies over its
    batch axes (``data_axes``) and a parameter that does not is replicated, and
    needs the all-reduced cotangent. ``pmap``, ``vmap`` and unchecked
    ``shard_map`` carry no such types: each device holds its own copy of the
    parameter and gets its own contribution, as JAX's autodiff gives it.
    ``None`` (no parameter) counts as replicated wherever the data varies.
    """
    shared = tuple(n for n in axes if n in data_axes)
    if p is None:
        return shared
    own = varying(p)
    return tuple(n for n in shared if n not in own)


def handles(v, n: int) -> tuple:
    """``n`` separate handles on the same value, one for each consumer (on the CPU).

    XLA on CPU fuses an elementwise producer (a broadcast subtraction such as
    ``x - mean``, a conversion such as ``x.astype(float32)``) into its consumer
    only when the consumer is its single user; a producer shared by two passes
    is written out as an x-sized temporary and read back. Behind an
    ``optimization_barrier`` each consumer recomputes its own copy inside its
    fusion and streams ``x`` itself: fewer passes, no temporaries.

    Applied only where the computation is lowered for the CPU: on GPU and TPU,
    XLA fuses sibling reductions into one multi-output kernel that reads ``x``
    once, which the barrier could prevent, so there the handles are the value
    itself. Both give the same numbers.
    """
    return lax.platform_dependent(
        v,
        cpu=functools.partial(_barrier_handles, n=n),
        default=lambda v: (v,) * n,
    )


def _barrier_handles(v, n: int) -> tuple:
    # One barrier per group of leaves with the same varying axes (inside
    # shard_map): a barrier gives all its outputs the union of its operands'
    # types, and each handle must keep the type of its value.
    leaves, tree = jax.tree.flatten((v,) * n)
    return jax.tree.unflatten(tree, _by_group(leaves, varying, lax.optimization_barrier))


def _by_group(values, key, fn) -> list:
    """``fn`` applied to each group of ``values`` with the same ``key``, in ``values``' order."""
    groups: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        groups.setdefault(key(v), []).append(i)
    out = list(values)
    for idx in groups.values():
        for i, result in zip(idx, fn([values[i] for i in idx]), strict=True):
            out[i] = result
    return out


def computed_once(vectors: tuple) -> tuple:
    """Per-feature vectors computed once, not once per element of ``x`` (on the CPU).

    XLA on CPU fuses the small computation of a per-feature vector into the
    x-sized loop that broadcasts it, and the loop then redoes it for every
    element of ``x`` (some twenty operations per element where five are
    needed). An ``optimization_barrier`` does not stop it (XLA:CPU drops
    barriers before fusing); a reduction does, as XLA:CPU never fuses one into
    an elementwise consumer. So on the CPU the vectors are stacked and summed
    with a row of zeros, which returns them unchanged (``v + 0 == v``; only
    ``-0.0`` becomes ``0.0``), in a small fusion of their own that the loop
    only reads. Elsewhere they are the values themselves.
    """
    return lax.platform_dependent(*vectors, cpu=_reduced_vectors, default=lambda *v: v)


def _reduced_vectors(*vectors) -> tuple:
    # One reduction per group of vectors of the same shape, dtype and (inside
    # shard_map) varying axes, so that each comes back with its own type.
    return tuple(_by_group(vectors, lambda v: (v.shape, v.dtype, varying(v)), _plus_zero))


def _plus_zero(vectors: list) -> list:
    """The vectors (of one shape and dtype) stacked and summed with zeros, in one reduction."""
    stacked = jnp.stack(vectors)
    summed = jnp.sum(jnp.stack([stacked, jnp.zeros_like(stacked)]), axis=0)
    return [summed[k] for k in range(len(vectors))]


def _sharded_along(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether ``x``'s type says it is sharded along any of ``axes`` over an explicit mesh axis."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or spec is None:
        return False
    names = [spec[a] for a in axes if a < len(spec) and spec[a] is not None]
    return any(set((n,) if isinstance(n, str) else n) & set(mesh.explicit_axes) for n in names)


def statistics(x, feat, mask, axes):
    """Returns ``(count, mean, var, residue)`` over all but ``feat`` and the named ``axes``.

    ``mean``, ``var`` and ``residue`` have the feature shape, in the compute
    dtype (:func:`jaxbn._checks.compute_dtype`); ``count`` is a scalar, or has
    the feature shape where the mask varies along the features. Two passes over
    ``x``, each a single fused reduction, all-reduced once over ``axes``:

    1. the mean, shifted by ``s`` (:func:`_shift`, a kept sample of the batch,
       the same on every device): ``mean = s + sum(x - s) / n``. Summing
       ``x - s`` rather than ``x`` keeps the sum accurate when
       ``|mean| >> std`` (summing values of 1e6 in float32 loses the digits of
       a unit spread).
    2. the centred squares: ``var = sum((x - mean)^2) / n - residue^2``, where
       ``residue`` is what rounding ``s + sum(x - s) / n`` to ``mean`` lost
       (computed exactly by the two-sum trick): the exact mean is
       ``mean + residue``. Even with a shift far out the mean's error stays a
       small fraction of ``std`` and the centred pass removes its effect;
       the naive ``E[x^2] - E[x]^2`` would lose every digit.

    A batch whose mask keeps nothing has statistics of zero, not ``0 / 0``.
    """
    red = tuple(a for a in range(x.ndim) if a not in feat)
    cdt = _checks.compute_dtype(x.dtype)
    xa, xb = (v.astype(cdt) for v in handles(x, 2))
    count = _checks.feature_counts(mask, x.shape, feat, dtype=cdt, keepdims=True)
    if mask is not None and all(mask.shape[a] == 1 for a in feat):
        count = jnp.reshape(count, ())
    shift = _shift(x, red, mask).astype(cdt)
    if axes:
        # One shift for all devices, exactly the same value on each (the two-sum
        # below needs it exact, and a maximum is exact in any order): the largest
        # of the devices' own, among those that keep something.
        shift = lax.pmax(jnp.where(count > 0, shift, -jnp.inf), axes)
        shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
        count = lax.psum(count, axes)
    safe = jnp.maximum(count, 1.0)
    d = xa - shift
    mean_s = psum_over(
        jnp.sum(d if mask is None else jnp.where(mask, d, 0), red, keepdims=True), axes
    )
    mean_s = mean_s / safe
    # Two-sum: mean + residue == shift + mean_s exactly.
    mean = shift + mean_s
    back = mean - shift
    residue = (shift - (mean - back)) + (mean_s - back)
    # Its own handle on the mean too: a broadcast shared with other users would
    # be written out as an x-sized array.
    (mean_d,) = handles(mean, 1)
    c = xb - mean_d
    sq = psum_over(
        jnp.sum(c * c if mask is None else jnp.where(mask, c * c, 0), red, keepdims=True), axes
    )
    var = jnp.maximum(sq / safe - residue * residue, 0.0)
    mean, var, residue = (jnp.squeeze(v, red) for v in (mean, var, residue))
    return (jnp.squeeze(count, red) if jnp.ndim(count) else count), mean, var, residue


def _shift(x, red, mask):
    """Per feature, a kept sample of the batch near its centre (``x``'s rank, size 1 on ``red``).

    The median of three samples: the first, middle and last of the flattened
    reduction axes, or with a mask the first and last kept ones and the middle
    one if it is kept (else the first again): no single sample, however far
    out, can be the median where the three are distinct, and a masked-out
    value (padding may hold anything) is never picked. 0 where nothing is kept.
    """
    feat = tuple(a for a in range(x.ndim) if a not in red)
    if mask is None:
        total = int(np.prod([x.shape[a] for a in red]))
        picks = [
            _sample(x, red, np.unravel_index(i, [x.shape[a] for a in red]))
            for i in (0, total // 2, total - 1)
        ]
        kept = None
    else:
        mred = [mask.shape[a] for a in red]
        mfeat = [mask.shape[a] for a in feat]
        flat = jnp.reshape(jnp.transpose(mask, red + feat), (int(np.prod(mred)), -1))
        # Reductions over the mask, not slices (a slice of a sharded axis has no sharding).
        position = jnp.arange(flat.shape[0])[:, None]
        first = jnp.min(jnp.where(flat, position, flat.shape[0] - 1), axis=0)
        last = jnp.max(jnp.where(flat, position, 0), axis=0)
        middle = flat.shape[0] // 2
        middle = jnp.where(jnp.any(flat & (position == middle), axis=0), middle, first)
        kept = jnp.reshape(jnp.any(flat, axis=0), mfeat)
        picks = []
        for i in (first, middle, last):
            multi = jnp.unravel_index(i, mred)
            # A mask of size 1 along a reduction axis is the same all along it.
            multi = [
                jnp.reshape(m, mfeat) if n > 1 else 0 for m, n in zip(multi, mred, strict=True)
            ]
            picks.append(_sample(x, red, multi))
    a, b, c = picks
    median = jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))
    if kept is not None:
        median = jnp.where(kept, median, jnp.zeros((), median.dtype))
    return lax.stop_gradient(jnp.expand_dims(median, red))


def _sample(x, red, index):
    """``x`` at one position of the reduction axes per feature: shape of the feature axes.

    ``index`` holds one entry per reduction axis: an int, or an array that
    broadcasts against the feature axes (a position per feature). A batch
    sharded over an explicit mesh gives its samples replicated (a one-row slice
    of a sharded axis has no sharding of its own).
    """
    at = dict(zip(red, index, strict=True))
    sharded = _sharded_along(x, red)
    if not sharded and all(isinstance(i, (int, np.integer)) for i in index):
        return x[tuple(int(at[a]) if a in at else slice(None) for a in range(x.ndim))]
    # A gather: every axis indexed by an array that broadcasts to the feature shape.
    feat = tuple(a for a in range(x.ndim) if a not in red)
    where = []
    for a in range(x.ndim):
        if a in at:
            where.append(jnp.asarray(at[a]))
        else:
            shape = [1] * len(feat)
            shape[feat.index(a)] = x.shape[a]
            where.append(jnp.reshape(jnp.arange(x.shape[a]), shape))
    if not sharded:
        return x[tuple(where)]
    replicated = jax.sharding.NamedSharding(
        jax.typeof(x).sharding.mesh, jax.sharding.PartitionSpec()
    )
    return x.at[tuple(where)].get(out_sharding=replicated)


def normalize(x, mean, residue, inv_std, scale, bias, feat):
    """``y = (x - mean - residue) * (scale * inv_std) + bias``: one pass over ``x``.

    ``mean``, ``residue``, ``inv_std`` are ``[features]`` in the compute dtype
    (that of ``y``); ``scale``/``bias``
    ``[features]`` or ``None``. Subtracting the mean first (rather than
    ``y = x * a + b``) keeps ``y`` accurate when ``|mean| >> std``; the residue
    (what the mean lost to rounding) folds into the per-feature offset.
    """
    ndim, cdt = x.ndim, mean.dtype
    a = inv_std if scale is None else inv_std * scale.astype(cdt)
    offset = -residue * a
    if bias is not None:
        offset = offset + bias.astype(cdt)
    mean, a, offset = computed_once((mean, a, offset))
    return (x.astype(cdt) - expand(mean, ndim, feat)) * expand(a, ndim, feat) + expand(
        offset, ndim, feat
    )


def reduce_sums(res, sums, cotangents, s, scale, bias, data):
    """The backward's per-feature sums over devices, each all-reduced once.

    Args:
        res: the forward's residuals: their ``count`` of values per feature (over
            every device), ``inv_std`` (the same on every device) and named axes
            ``axis_name``.
        sums: this device's ``(sum dy, sum dy * x_hat)``.
        cotangents: ``(g_mean, g_var)``, this device's cotangents of the statistics.
        s: the multiplier of ``x_hat`` in ``y`` (``[features]``, or ``None`` for 1).
        scale: the scale parameter (or ``None``): its type decides the rule,
            its dtype that of ``dscale``.
        bias: the bias parameter (or ``None``): its type decides the rule,
            its dtype that of ``dbias``.
        data: the backward's x-sized inputs (e.g. ``(x, dy)``): the named axes
            over which they vary are the data's.

    Returns:
        ``(mean_term, var_term, dscale, dbias)``: ``(g_mean - inv_std * T_dy) / n``
        and ``(2 g_var - inv_std^2 * T_dy_xhat) / n``, the factors of ``dx``'s
        corrections, where ``T`` are the sums over the global batch of
        ``s * sum dy`` and ``s * sum dy * x_hat``, each device weighted by its
        own ``s``, and the cotangents are summed over the devices that each
        hold a copy of the statistics (``pmap``, ``vmap``, unchecked
        ``shard_map``; checked ``shard_map`` delivers them summed already).
        A feature with nothing kept (``count`` 0) has its corrections masked
        out; dividing by ``max(count, 1)`` keeps them finite there, and so the
        derivatives of the backward (grad of grad). Then the sums that give the
        parameter gradients: reduced over the axes where the parameter is
        replicated, a device's own where it is per-device
        (:func:`replicated_axes`), and over axes outside ``axes`` where devices
        normalize with their own statistics (the data varies) and share the
        parameter.
    """
    axes, inv_std, sum_dy = res.axis_name, res.inv_std, sums[0]
    data_axes = frozenset().union(*(varying(v) for v in data))
    s_rep = replicated_axes(scale, axes, data_axes)
    b_rep = replicated_axes(bias, axes, data_axes)
    r_dy, r_dy_xhat = psum_over(sums, s_rep)
    sv = 1.0 if s is None else s
    w_dy, w_dy_xhat = psum_over(
        (inv_std * sv * r_dy, inv_std**2 * sv * r_dy_xhat),
        tuple(n for n in axes if n in data_axes and n not in s_rep),
    )
    g_mean, g_var = cotangents
    # One all-reduce for the cotangents and the weighted sums together (where the
    # data is not typed, the weighted sums are not reduced above).
    mean_term, var_term = psum_over(
        (g_mean - w_dy, 2.0 * g_var - w_dy_xhat), tuple(n for n in axes if n not in data_axes)
    )
    local = frozenset(data_axes - set(axes))
    local_axes = tuple(sorted(local))
    dscale = psum_over(r_dy_xhat, replicated_axes(scale, local_axes, local))
    dbias = r_dy if b_rep == s_rep else psum_over(sum_dy, b_rep)
    dbias = psum_over(dbias, replicated_axes(bias, local_axes, local))
    if scale is not None:
        dscale = dscale.astype(scale.dtype)
    if bias is not None:
        dbias = dbias.astype(bias.dtype)
    n = jnp.maximum(res.count, 1.0)
    return mean_term / n, var_term / n, dscale, dbias

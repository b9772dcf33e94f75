"""Argument checks shared by every public entry point.

These functions only look at shapes, dtypes and Python values, so every error is
raised while a function is traced, before anything runs. They hold no formula of
batch normalization: the custom op and the reference both call them without
sharing any of the arithmetic that the tests compare. The one count kept here,
:func:`feature_counts` (the values a mask keeps per feature), serves the checks
and the op and layer built on them; the reference counts on its own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

AxisArg = int | Sequence[int]
AxisName = str | tuple[str, ...] | None


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (a ``bool`` is not one)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is an int ``>= 1`` (see :func:`is_int`)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_or_none(name: str, value: Any) -> None:
    """Raises ``ValueError`` unless ``value`` is ``None`` or a number ``> 0``."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be None or > 0, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a Python or NumPy bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_training(training: Any) -> None:
    """Raises ``TypeError`` unless ``training`` is a bool (a static mode, never traced)."""
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a Python bool (True or False), got {training!r}")


def compute_dtype(dtype: Any) -> np.dtype:
    """The dtype batch norm computes in: float32 for low-precision inputs, else the input's.

    NumPy's promotion, which does not depend on JAX's promotion mode (under
    ``jax_numpy_dtype_promotion="strict"`` JAX refuses to mix float widths).
    """
    return np.promote_types(dtype, np.float32)


def feature_axes(ndim: int, axis: AxisArg) -> tuple[int, ...]:
    """Normalizes ``axis`` (an int or a sequence; negative allowed) to sorted axes.

    Raises:
        ValueError: if an axis is out of range for ``ndim`` or given twice.
        TypeError: if ``axis`` is not an int or a sequence of ints.
    """
    raw = (axis,) if isinstance(axis, (int, np.integer)) else axis
    try:
        raw = tuple(raw)
    except TypeError:
        raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}") from None
    if not raw:
        raise ValueError("axis must name at least one feature axis, got ()")
    out = []
    for a in raw:
        if not is_int(a):
            raise TypeError(f"axis must be an int or a tuple of ints, got {axis!r}")
        if not -ndim <= a < ndim:
            raise ValueError(
                f"axis {a} is out of range for x of rank {ndim} (expected -{ndim} <= axis < {ndim})"
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis has repeated entries: {axis!r} (rank {ndim})")
    return tuple(sorted(out))


def check_x(x: ArrayLike) -> None:
    """Checks that ``x`` is a floating-point array of rank at least 1."""
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"x must have a floating-point dtype, got {dtype}")
    if jnp.ndim(x) == 0:
        raise ValueError("x must have rank >= 1 (a batch of values), got a scalar")


def check_eps(eps: float, dtype: Any = jnp.float32) -> None:
    """Checks that ``eps`` is a positive, finite, normal Python number (a static value).

    ``dtype`` is the compute dtype (float32 or wider): an ``eps`` below its
    smallest normal number is flushed to zero by XLA on the CPU, so a constant
    feature would give NaN, as with ``eps = 0``.
    """
    if not isinstance(eps, (int, float, np.floating)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
    tiny = float(jnp.finfo(compute_dtype(dtype)).tiny)
    if eps < tiny:
        raise ValueError(
            f"eps must be a normal number in the compute dtype "
            f"{compute_dtype(dtype)} (>= {tiny:.4g}; smaller "
            f"values are flushed to zero), got {eps}"
        )


def check_hashable_fields(config: Any) -> None:
    """Refuses a field that makes a frozen config unhashable (a list, a dict, an array).

    Configs are static arguments of ``jax.jit``, which hashes them; a list
    would be accepted at construction and fail far from its cause.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            hash(value)
        except TypeError:
            raise TypeError(
                f"{type(config).__name__}.{f.name} must be hashable (a tuple, not a list; "
                f"Python scalars, not arrays), got {value!r}"
            ) from None


def check_axis_name(axis_name: Any) -> None:
    """Checks that ``axis_name`` is ``None``, a name (str) or a tuple of names."""
    names = axis_name if isinstance(axis_name, (tuple, list)) else (axis_name,)
    if axis_name is not None and (not names or not all(isinstance(n, str) for n in names)):
        raise TypeError(
            f"axis_name must be None, a str or a tuple of str (named mapped axes), "
            f"got {axis_name!r}"
        )


def check_feature_vector(name: str, v: ArrayLike | None, shape: tuple[int, ...]):
    """Checks that a per-feature array (scale, bias, mean, var) has ``shape``."""
    if v is None:
        return
    if jnp.shape(v) != shape:
        raise ValueError(
            f"{name} must have shape {shape} (the feature axes of x), got {jnp.shape(v)}"
        )
    if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {jnp.result_type(v)}")


def check_mask(mask: ArrayLike | None, x_shape: tuple[int, ...], feat: tuple[int, ...]):
    """Checks ``mask`` and returns it with ``x``'s rank, broadcastable to ``x`` (or ``None``).

    Two layouts are accepted, told apart by the mask's rank:

    - ``x``'s rank: broadcastable to ``x`` by NumPy's rules (Flax's convention),
      ``[N, 1]`` or ``[N, C]`` for ``[N, C]``; where the mask varies along the
      feature axes, each feature gets its own count;
    - the rank of ``x`` without its feature axes: one axis per reduction axis,
      in order (``[N]`` for ``[N, C]``; ``[N, H, W]`` or ``[N, 1, 1]`` for
      NHWC), the same for every feature.

    A scalar mask is accepted too. Any other rank is refused: aligned from the
    right, a per-example mask ``[N]`` on NCHW input would mask along ``W``.

    Returns:
        The mask as an array of ``x``'s rank: size 1 on the feature axes where
        it does not vary along them.
    """
    if mask is None:
        return None
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got {jnp.result_type(mask)}")
    given = mshape = tuple(jnp.shape(mask))
    red_shape = reduce_shape(x_shape, feat)
    # A concrete mask stays concrete (NumPy), so its counts can be checked.
    xp = jnp if isinstance(mask, jax.core.Tracer) else np
    mask = xp.asarray(mask)
    if len(mshape) == len(red_shape) != len(x_shape):
        mshape = tuple(
            1 if a in feat else mshape[a - sum(f < a for f in feat)] for a in range(len(x_shape))
        )
        mask = xp.reshape(mask, mshape)
    elif not mshape:
        mshape = (1,) * len(x_shape)
        mask = xp.reshape(mask, mshape)
    ok = len(mshape) == len(x_shape) and all(
        m in (1, d) for m, d in zip(mshape, x_shape, strict=True)
    )
    if not ok:
        raise ValueError(
            f"mask must broadcast to x's shape {x_shape} with x's rank (Flax's "
            f"convention), or have one axis per reduction axis, broadcasting to "
            f"{red_shape} (the rank of x without its feature axes); got "
            f"{given} for x of shape {x_shape}"
        )
    return mask


def mask_over_batch(mask: Any, x_shape: tuple[int, ...], feat: tuple[int, ...], xp: Any = jnp):
    """``mask`` (as :func:`check_mask` returns it) broadcast to ``x``'s reduction axes.

    The result has ``x``'s shape on the reduction axes and the mask's own size
    (1, or the feature's size) on the feature axes ``feat``. ``xp`` is ``jnp``
    or ``np`` (a concrete mask, counted while tracing).
    """
    shape = tuple(mask.shape[a] if a in feat else d for a, d in enumerate(x_shape))
    return xp.broadcast_to(mask, shape)


def feature_counts(
    mask: Any,
    x_shape: tuple[int, ...],
    feat: tuple[int, ...],
    *,
    dtype: Any = None,
    keepdims: bool = False,
    xp: Any = jnp,
):
    """The number of values of each feature that enter the batch statistics (local, no named axis).

    Without a mask: every value of the reduction axes, a scalar. With ``mask``
    (as :func:`check_mask` returns it): the kept ones, summed over the
    reduction axes, one count per feature where the mask varies along the
    feature axes (size 1 there otherwise); ``keepdims`` keeps ``x``'s rank.
    ``xp`` is ``jnp`` or ``np``.
    """
    red = tuple(a for a in range(len(x_shape)) if a not in feat)
    if mask is None:
        return xp.asarray(math.prod(x_shape[a] for a in red), dtype)
    kept = mask_over_batch(mask, x_shape, feat, xp)
    return xp.sum(kept, axis=red, keepdims=keepdims, dtype=dtype)


def mask_counts(mask: Any, x_shape: tuple[int, ...], feat: tuple[int, ...]) -> np.ndarray | None:
    """The number of kept values per feature of a concrete mask, or ``None`` if traced.

    ``mask`` is as :func:`check_mask` returns it.
    """
    if isinstance(mask, jax.core.Tracer):
        return None
    return feature_counts(np.asarray(mask), x_shape, feat, xp=np)


def check_batch(
    x_shape: tuple[int, ...],
    reduce_axes: tuple[int, ...],
    axis_name: AxisName,
    mask: ArrayLike | None,
) -> None:
    """Refuses training statistics over a single value per feature.

    With one value the variance is zero and the output is ``bias`` whatever the
    input: always a bug. A named axis can make the count differ from the local
    shape, and a traced mask is unknown while tracing, so the check is made only
    where the count is known here: without a named axis, and with no mask or a
    concrete one (which must not keep exactly one value of any feature; keeping
    none gives statistics of zero).
    """
    if axis_name is not None:
        return
    count = math.prod(x_shape[a] for a in reduce_axes)
    if mask is None and count <= 1:
        raise ValueError(
            f"expected more than 1 value per feature in training, got x of shape "
            f"{x_shape} with reduction axes {reduce_axes}"
        )
    feat = tuple(a for a in range(len(x_shape)) if a not in reduce_axes)
    counts = None if mask is None else mask_counts(mask, x_shape, feat)
    if counts is not None and np.any(counts == 1):
        raise ValueError(
            f"expected more than 1 value per feature in training, got a mask keeping 1 "
            f"value of some feature (x of shape {x_shape}, reduction axes {reduce_axes})"
        )


def reduce_shape(x_shape: tuple[int, ...], feat: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``x`` with its feature axes removed."""
    return tuple(d for i, d in enumerate(x_shape) if i not in feat)


def check_op_args(x, scale, bias, axis, eps, mask, training=True, axis_name=None):
    """Runs every check of the op's arguments.

    Returns:
        ``(feature_axes, mask)``: the sorted feature axes, and the mask as an
        array of ``x``'s rank (see :func:`check_mask`), or ``None``.
    """
    check_x(x)
    check_eps(eps, jnp.result_type(x))
    check_axis_name(axis_name)
    shape = jnp.shape(x)
    feat = feature_axes(len(shape), axis)
    fshape = tuple(shape[a] for a in feat)
    check_feature_vector("scale", scale, fshape)
    check_feature_vector("bias", bias, fshape)
    red = tuple(a for a in range(len(shape)) if a not in feat)
    mask = check_mask(mask, shape, feat)
    if training:
        check_batch(shape, red, axis_name, mask)
    return feat, mask


def check_keys(name: str, tree: Any, allowed: tuple[str, ...], required: tuple[str, ...]):
    """Checks that ``tree`` is a dict holding ``required`` keys and no others than ``allowed``."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name} must be a dict, got {type(tree).__name__}")
    extra = sorted(set(tree) - set(allowed))
    if extra:
        raise ValueError(f"{name} may only hold the keys {list(allowed)}, got extra keys {extra}")
    missing = [k for k in required if k not in tree]
    if missing:
        raise ValueError(f"{name} must hold the keys {list(required)}, missing {missing}")


def check_cotangents(
    cotangents: Any,
    x_shape: tuple[int, ...],
    feat: tuple[int, ...],
    names: tuple[str, str, str],
    *,
    shape_name: str,
) -> tuple:
    """Checks the triple of cotangents a public backward takes; returns it as a tuple.

    Args:
        cotangents: ``(d_out, dmean, dvar)`` as given.
        x_shape: the shape of the op's array output (and input).
        feat: the forward's feature axes.
        names: the three cotangents' names, for the messages (e.g. ``("dy", "dmean",
            "dvar")``).
        shape_name: what the first cotangent's shape is called (e.g. ``"x's shape"``).

    Returns:
        ``tuple(cotangents)``.

    Raises:
        TypeError: if ``cotangents`` is not a triple or a cotangent is not floating.
        ValueError: if a cotangent has the wrong shape (the message names it).
    """
    if not isinstance(cotangents, (tuple, list)) or len(cotangents) != 3:
        raise TypeError(
            f"cotangents must be a triple ({', '.join(names)}), got {type(cotangents).__name__}"
            + (f" of length {len(cotangents)}" if isinstance(cotangents, (tuple, list)) else "")
        )
    fshape = tuple(x_shape[a] for a in feat)
    for name, ct, want in zip(names, cotangents, (x_shape, fshape, fshape), strict=True):
        if jnp.shape(ct) != want:
            what = shape_name if want is x_shape else f"the feature shape (axes {feat})"
            raise ValueError(f"{name} must have {what} {want}, got {jnp.shape(ct)}")
        if not jnp.issubdtype(jnp.result_type(ct), jnp.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {jnp.result_type(ct)}")
    return tuple(cotangents)

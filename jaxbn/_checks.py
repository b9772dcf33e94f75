"""Argument checks shared by every public entry point.

These functions only look at shapes, dtypes and Python values, so every error is
raised while a function is traced, before anything runs. They hold no formula of
batch normalization: the custom op and the reference both call them without
sharing any of the arithmetic that the tests compare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

AxisArg = int | Sequence[int]
AxisName = str | tuple[str, ...] | None


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
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
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


def check_eps(eps: float) -> None:
    """Checks that ``eps`` is a positive Python number (a static value)."""
    if not isinstance(eps, (int, float, np.floating)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


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
    """Checks ``mask`` and returns it over the reduction axes of ``x`` (or ``None``).

    A mask is boolean with the rank of ``x`` without its feature axes, and
    broadcasts to that shape (``[N]`` for ``[N, C]``; ``[N, H, W]`` or
    ``[N, 1, 1]`` for NHWC), or has ``x``'s rank with size 1 on the feature axes
    (``[N, 1]`` for ``[N, C]``, ``[N, 1, 1, 1]`` for NCHW).
    """
    if mask is None:
        return None
    if jnp.result_type(mask) != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got {jnp.result_type(mask)}")
    mshape = jnp.shape(mask)
    red_shape = reduce_shape(x_shape, feat)
    if len(mshape) == len(x_shape) and all(mshape[a] == 1 for a in feat):
        mask = jnp.squeeze(jnp.asarray(mask), feat)
        mshape = mask.shape
    try:
        ok = np.broadcast_shapes(mshape, red_shape) == red_shape
    except ValueError:
        ok = False
    # A lower rank would be aligned from the right: a per-example mask [N] on NCHW
    # input would then mask along W. Only [N] on a single reduced axis is unambiguous.
    if not ok or len(mshape) != len(red_shape):
        raise ValueError(
            f"mask must have the rank of x without its feature axes and broadcast to "
            f"{red_shape} (or have x's rank with size 1 on the feature axes); got "
            f"{jnp.shape(mask)} for x of shape {x_shape}"
        )
    return jnp.asarray(mask)


def check_batch(
    x_shape: tuple[int, ...],
    reduce_axes: tuple[int, ...],
    axis_name: AxisName,
    mask: ArrayLike | None,
) -> None:
    """Refuses training statistics over a single value per feature.

    With one value the variance is zero and the output is ``bias`` whatever the
    input: always a bug. A named axis or a mask can make the count differ from
    the local shape, so the check is made only where the count is known here.
    """
    count = math.prod(x_shape[a] for a in reduce_axes)
    if count <= 1 and axis_name is None and mask is None:
        raise ValueError(
            f"expected more than 1 value per feature in training, got x of shape "
            f"{x_shape} with reduction axes {reduce_axes}"
        )


def reduce_shape(x_shape: tuple[int, ...], feat: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of ``x`` with its feature axes removed."""
    return tuple(d for i, d in enumerate(x_shape) if i not in feat)


def check_op_args(x, scale, bias, axis, eps, mask, training=True, axis_name=None):
    """Runs every check of the op's arguments.

    Returns:
        ``(feature_axes, mask)``: the sorted feature axes, and the mask as an
        array over the reduction axes (or ``None``).
    """
    check_x(x)
    check_eps(eps)
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

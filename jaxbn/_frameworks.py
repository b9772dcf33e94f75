"""Pieces shared by the framework adapters (no framework is imported here)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn.layer import BatchNorm


def require(module: str, *, adapter: str, extra: str) -> ModuleType:
    """Imports an optional framework, or raises an ``ImportError`` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{adapter} needs {module.split('.')[0]}, an optional dependency: "
            f'pip install "jaxbn[{extra}]"'
        ) from e


def flax_mask(mask: Any, x_shape: tuple[int, ...], feat: tuple[int, ...]) -> jax.Array:
    """A Flax mask (boolean, broadcastable to ``x``) in the form jaxbn's op takes.

    A mask of size 1 on every feature axis masks whole positions: it becomes a
    mask over the reduction axes (``(N, 1)`` for ``(N, C)`` gives ``(N,)``). A mask
    that varies along a feature axis gives each feature its own count (Flax's
    semantics); it is passed on with ``x``'s full shape.

    Raises:
        TypeError: if ``mask`` is not boolean (Flax would treat numbers as
            truth values; jaxbn's op refuses them, and so does this).
        ValueError: if ``mask`` does not broadcast to ``x``'s shape.
    """
    dtype = jnp.result_type(mask)
    if dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array, got {dtype}")
    mshape = jnp.shape(mask)
    try:
        ok = len(mshape) <= len(x_shape) and np.broadcast_shapes(mshape, x_shape) == x_shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask must broadcast to x's shape {x_shape}, got shape {mshape}")
    mask = jnp.reshape(jnp.asarray(mask), (1,) * (len(x_shape) - len(mshape)) + mshape)
    if all(mask.shape[a] == 1 for a in feat):
        return jnp.squeeze(mask, feat)
    return jnp.broadcast_to(mask, x_shape)


def as_number(value: Any) -> Any:
    """A NumPy real scalar as the Python number it holds; anything else unchanged.

    ``np.float32(0.9)`` is a number to the frameworks, so the adapters take it
    where they take ``0.9``; jaxbn's configs compute with Python numbers, which
    stay weakly typed (a ``np.float32`` momentum times a float64 statistic is
    refused under ``jax_numpy_dtype_promotion="strict"``). A ``np.bool_`` is not
    a NumPy integer and stays as it is, for the checks to refuse.
    """
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def promote(*args: Any) -> np.dtype:
    """The standard promotion of the dtypes of ``args``, also under strict promotion.

    The adapters' output dtype is their framework's rule (the promotion of the
    input's and the variables' dtypes): a rule applied on purpose, computed
    here, so it holds with ``jax_numpy_dtype_promotion="strict"`` too.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*args)


def as_axis(axis: Any) -> int | tuple[int, ...]:
    """Flax allows a list of feature axes; jaxbn's frozen configs take a tuple."""
    return tuple(axis) if isinstance(axis, list) else axis


def check_axis_index_groups(axis_index_groups: Any) -> None:
    """Refuses Flax's ``axis_index_groups``, which has no jaxbn counterpart."""
    if axis_index_groups is not None:
        raise ValueError(
            f"axis_index_groups is not supported by jaxbn (statistics are averaged over the "
            f"whole axis_name); expected None, got {axis_index_groups!r}"
        )


def flax_layer(module: Any, num_features: int | tuple[int, ...], /, *, dtype: Any, **options: Any):
    """The :class:`jaxbn.BatchNorm` configured by a Flax batch norm's attributes.

    Reads ``axis``, ``momentum``, ``epsilon`` (jaxbn's ``eps``; both may be
    NumPy scalars), ``use_scale``, ``use_bias``, ``axis_name`` and
    ``param_dtype`` of ``module`` (a ``flax.linen`` or ``flax.nnx`` batch norm,
    Flax's or jaxbn's); ``dtype`` and any jaxbn-only ``options`` are given.
    """
    return BatchNorm(
        num_features,
        axis=as_axis(module.axis),
        momentum=as_number(module.momentum),
        eps=as_number(module.epsilon),
        use_scale=module.use_scale,
        use_bias=module.use_bias,
        axis_name=module.axis_name,
        dtype=dtype,
        param_dtype=module.param_dtype,
        **{name: as_number(value) for name, value in options.items()},
    )

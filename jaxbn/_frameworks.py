"""Pieces shared by the framework modules (no framework is imported here).

The Flax modules (:mod:`jaxbn.nnx`, :mod:`jaxbn.linen`) turn their attributes and
call arguments into one :meth:`jaxbn.BatchNorm.apply` here (:func:`flax_apply`),
which validates them and runs jaxbn's op; the Equinox module builds its layer
itself (one example per call, axis 0).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
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


def as_number(value: Any) -> Any:
    """A NumPy real scalar as the Python number it holds; anything else unchanged.

    ``np.float32(0.9)`` is a number to the frameworks, so the modules take it
    where they take ``0.9``; jaxbn's configs compute with Python numbers, which
    stay weakly typed (a ``np.float32`` momentum times a float64 statistic is
    refused under ``jax_numpy_dtype_promotion="strict"``). A ``np.bool_`` is not
    a NumPy integer and stays as it is, for the checks to refuse.
    """
    return value.item() if isinstance(value, (np.integer, np.floating)) else value


def as_tuple(value: Any) -> Any:
    """A list as a tuple: the frameworks take lists (of axes, of axis names), jaxbn tuples."""
    return tuple(value) if isinstance(value, list) else value


def promote(*args: Any) -> np.dtype:
    """The standard promotion of the dtypes of ``args``, also under strict promotion.

    The modules' output dtype is their framework's rule (the promotion of the
    input's and the variables' dtypes): a rule applied on purpose, computed
    here, so it holds with ``jax_numpy_dtype_promotion="strict"`` too.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.result_type(*(a for a in args if a is not None))


def check_axis_index_groups(axis_index_groups: Any) -> None:
    """Refuses Flax's ``axis_index_groups``, which has no jaxbn counterpart."""
    if axis_index_groups is not None:
        raise ValueError(
            f"axis_index_groups is not supported by jaxbn (statistics are averaged over the "
            f"whole axis_name); expected None, got {axis_index_groups!r}"
        )


# The attributes of Flax's batch norms (``flax.linen`` and ``flax.nnx``) that are
# fields of :class:`jaxbn.BatchNorm` under the same name and meaning; Flax's
# ``epsilon`` is jaxbn's ``eps``.
FLAX_FIELDS = ("axis", "momentum", "use_scale", "use_bias", "axis_name", "dtype", "param_dtype")


def flax_layer(module: Any, num_features: int | tuple[int, ...], /, **options: Any) -> BatchNorm:
    """The :class:`jaxbn.BatchNorm` configured by a Flax batch norm's attributes.

    Reads :data:`FLAX_FIELDS` and ``epsilon`` (jaxbn's ``eps``) of ``module`` (a
    ``flax.linen`` or ``flax.nnx`` batch norm, Flax's or jaxbn's); ``options``
    override them or add jaxbn's own. NumPy scalars become Python numbers, a
    list of axes a tuple.
    """
    fields = {name: getattr(module, name) for name in FLAX_FIELDS}
    fields.update(axis=as_tuple(module.axis), eps=module.epsilon)
    fields.update(options)
    return BatchNorm(num_features, **{name: as_number(v) for name, v in fields.items()})


def flax_apply(module, num_features, params, state, x, *, training, mask, **options):
    """``(y, new_state)`` of a Flax module's call, computed by :meth:`jaxbn.BatchNorm.apply`.

    Args:
        module: the Flax batch norm whose attributes configure the layer
            (:func:`flax_layer`, with ``options``).
        num_features: the feature shape.
        params: ``{"scale", "bias"}`` (either may be absent).
        state: the running statistics, as the layer's state.
        x: the input array.
        training: batch statistics (``True``) or the running ones.
        mask: Flax's mask, broadcast against ``x`` from the right, or ``None``.
            It is put at ``x``'s rank, where the layer checks it (boolean,
            broadcastable to ``x``) once; in evaluation, where Flax ignores it,
            it is only checked.
        **options: more fields of the layer (:func:`flax_layer`).
    """
    layer = flax_layer(module, num_features, **options)
    if mask is not None:
        shape = jnp.shape(mask)
        if len(shape) > x.ndim:
            raise ValueError(f"mask must broadcast to x's shape {x.shape}, got shape {shape}")
        mask = jnp.reshape(mask, (1,) * (x.ndim - len(shape)) + shape)
        if not training:
            _checks.check_mask(mask, x.shape, _checks.feature_axes(x.ndim, layer.axis))
            mask = None
    return layer.apply(params, state, x, training=training, mask=mask)

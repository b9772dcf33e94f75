"""What the models (:class:`jaxbn.MLP`, :class:`jaxbn.CNN`) share about their batch norms.

Both configs carry the same batch-norm fields (``momentum``, ``eps``,
``axis_name``, ``param_dtype``, ``debias``, ``frozen``, ``activation``,
``fuse_activation``); these helpers read them, so that each model builds, checks
and folds its batch-norm layers with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxbn import _checks
from jaxbn.act import ACTIVATIONS, check_activation, effective_scale
from jaxbn.layer import BatchNorm


def check_model_activation(model: Any) -> None:
    """Refuses a ``model.activation`` that is not a key of :data:`jaxbn.act.ACTIVATIONS`."""
    if model.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {model.activation!r}"
        )


#: The model options that configure its batch-norm layers and mean nothing without.
BATCH_NORM_OPTIONS = ("debias", "frozen", "fuse_activation")


def check_batch_norm_options(model: Any) -> None:
    """Refuses a batch-norm-only option (:data:`BATCH_NORM_OPTIONS`) without batch norm.

    An option that would be ignored is a mistake the user should hear of; a
    fused activation must also be invertible.
    """
    for name in ("use_batch_norm", *BATCH_NORM_OPTIONS):
        _checks.check_bool(name, getattr(model, name))
    if not model.use_batch_norm:
        for name in BATCH_NORM_OPTIONS:
            if getattr(model, name):
                raise ValueError(f"{name}=True needs use_batch_norm=True")
    if model.fuse_activation:
        check_activation(model.activation, 0.01, name="activation (with fuse_activation=True)")


def model_batch_norm(model: Any, width: int, *, axis: int = -1) -> BatchNorm:
    """The batch-norm layer of ``width`` features on ``axis`` that ``model``'s fields configure."""
    return BatchNorm(
        width,
        axis=axis,
        momentum=model.momentum,
        eps=model.eps,
        axis_name=model.axis_name,
        param_dtype=model.param_dtype,
        debias=model.debias,
        frozen=model.frozen,
        activation=model.activation if model.fuse_activation else None,
    )


def fold_model_layers(
    model: Any,
    layers: Sequence[Mapping[str, Any]],
    states: Sequence[Mapping[str, Any]],
    *,
    linear: str,
    fold: Callable[..., dict[str, Any]],
) -> list[Mapping[str, Any]]:
    """``model``'s layers with every batch norm folded into the linear map before it.

    A layer ``{linear: ..., "batch_norm": ...}`` becomes ``{linear: fold(...)}``
    (:func:`jaxbn.fold_into_dense` or :func:`jaxbn.fold_into_conv`); one
    without batch norm is kept as it is. With ``model.fuse_activation`` the
    scale folded in is ``|scale| + eps``, the one :func:`jaxbn.batch_norm_act`
    multiplies by.
    """
    out = []
    for layer, layer_state in zip(layers, states, strict=True):
        if "batch_norm" in layer:
            bn_params = dict(layer["batch_norm"])
            if model.fuse_activation:
                bn_params["scale"] = effective_scale(bn_params["scale"], eps=model.eps)
            folded = fold(layer[linear], bn_params, layer_state["batch_norm"], eps=model.eps)
            layer = {linear: folded}
        out.append(layer)
    return out


def is_batch_norm_state(node: Any) -> bool:
    """Whether ``node`` is a batch-norm layer's state: a dict with ``mean`` and ``var``."""
    return isinstance(node, dict) and "mean" in node and "var" in node


def batch_norm_layers(state: Any) -> tuple[list, list, Any, list[int]]:
    """``state`` flattened with each batch-norm state dict kept whole.

    Returns ``(paths, leaves, treedef, idx)``, ``idx`` the indices of those
    leaves. How :func:`jaxbn.precise_stats` and :func:`jaxbn.diagnose` find the batch-norm
    layers of any model of the training protocol.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_batch_norm_state)
    leaves = [leaf for _, leaf in flat]
    idx = [i for i, leaf in enumerate(leaves) if is_batch_norm_state(leaf)]
    return [path for path, _ in flat], leaves, treedef, idx

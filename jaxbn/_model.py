"""What the models (:class:`jaxbn.MLP`, :class:`jaxbn.CNN`) share.

Both configs carry the same batch-norm fields (``momentum``, ``eps``,
``axis_name``, ``param_dtype``, ``debias``, ``frozen``, ``activation``,
``fuse_activation``) and the same ``init_stddev``, and both are a list of
layers ``{linear: {"kernel", ["bias"]}, ["batch_norm"]}`` under one key of
their params (``"layers"``, ``"blocks"``). These helpers read that, so that
each model checks, builds, validates and folds its layers with the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks, _core
from jaxbn.act import ACTIVATIONS, check_activation, effective_scale
from jaxbn.layer import BatchNorm

#: The model options that configure its batch-norm layers and mean nothing without.
BATCH_NORM_OPTIONS = ("debias", "frozen", "fuse_activation")


def check_sizes(name: str, sizes: Any, minimum: int, what: str) -> None:
    """Refuses ``sizes`` unless it is a tuple of at least ``minimum`` positive ints."""
    if not isinstance(sizes, tuple):
        raise TypeError(
            f"{name} must be a tuple of ints (hashable), got {type(sizes).__name__} {sizes!r}"
        )
    if len(sizes) < minimum or any(not _checks.is_int(d) or d < 1 for d in sizes):
        raise ValueError(f"{name} must hold at least {what}, got {sizes!r}")


def check_config(model: Any) -> None:
    """The checks of the fields both models share, for their ``__post_init__``.

    A batch-norm-only option (:data:`BATCH_NORM_OPTIONS`) without batch norm
    would be ignored: a mistake the user should hear of. A fused activation
    must be invertible. ``momentum``, ``eps`` and ``axis_name`` are checked by
    building one batch-norm layer, with the layer's own messages.
    """
    if model.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {model.activation!r}"
        )
    _checks.check_positive_or_none("init_stddev", model.init_stddev)
    for name in ("use_batch_norm", *BATCH_NORM_OPTIONS):
        _checks.check_bool(name, getattr(model, name))
    if not model.use_batch_norm:
        for name in BATCH_NORM_OPTIONS:
            if getattr(model, name):
                raise ValueError(f"{name}=True needs use_batch_norm=True")
    if model.fuse_activation:
        check_activation(model.activation, 0.01, name="activation (with fuse_activation=True)")
    _checks.check_hashable_fields(model)
    if model.use_batch_norm:
        batch_norm(model, 1)


def batch_norm(model: Any, width: int, *, axis: int = -1) -> BatchNorm:
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


def init_layer(
    model: Any, key: jax.Array, shape: tuple[int, ...], linear: str, bn: BatchNorm | None
) -> tuple[dict, dict]:
    """A fresh layer with kernel ``shape`` (``[..., in, out]``); ``(params, state)``.

    The kernel is Gaussian with standard deviation ``model.init_stddev``, or
    ``1 / sqrt(fan_in)`` (LeCun normal; ``fan_in`` the product of all but the
    last axis). With batch norm ``bn`` the layer has no bias (batch norm's
    takes its place); without it, a zero bias and an empty state.
    """
    std = model.init_stddev
    if std is None:
        std = 1.0 / math.sqrt(math.prod(shape[:-1]))
    kernel = {"kernel": std * jax.random.normal(key, shape, model.param_dtype)}
    params, state = {linear: kernel}, {}
    if bn is None:
        kernel["bias"] = jnp.zeros(shape[-1:], model.param_dtype)
    else:
        params["batch_norm"], state["batch_norm"] = bn.init()
    return params, state


def normalize(layer, layer_state, z, bn: BatchNorm | None, *, linear: str, training: bool, axis):
    """The rest of a layer after its linear map ``z``: ``z + bias`` or ``BN(z)``.

    Returns ``(u, new_layer_state)``; ``u`` is already activated when ``bn`` is fused.
    """
    if bn is None:
        bias = _core.expand(layer[linear]["bias"], z.ndim, (axis % z.ndim,))
        return z + bias, {}
    u, bn_state = bn.apply(layer["batch_norm"], layer_state["batch_norm"], z, training=training)
    return u, {"batch_norm": bn_state}


def variable_shapes(model: Any) -> tuple[dict, dict]:
    """The shape of every leaf of ``model.init``'s params and state, by path (a key string)."""
    out = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    flat = [jax.tree_util.tree_flatten_with_path(tree)[0] for tree in out]
    return tuple({jax.tree_util.keystr(p): v.shape for p, v in leaves} for leaves in flat)


def check_variables(model: Any, params: Any, state: Any, key: str) -> None:
    """Checks that ``params`` and ``state`` have the layout and shapes of ``model.init``.

    The layer count under ``key``, every entry (a batch-norm entry or a bias
    present or absent) and every shape (the widths), named in the message,
    while tracing. The expected shapes are ``model._variable_shapes``,
    computed once per model.
    """
    kind = type(model).__name__
    shapes = model._variable_shapes
    for tree, want, name in zip((params, state), shapes, ("params", "state"), strict=True):
        if not isinstance(tree, dict) or not isinstance(tree.get(key), (list, tuple)):
            raise TypeError(
                f'{name} must be a dict {{"{key}": [...]}} as {kind}.init returns, got '
                f"{type(tree).__name__}"
                + (f" with keys {sorted(tree)}" if isinstance(tree, dict) else "")
            )
        n = len(model._batch_norms)
        if len(tree[key]) != n:
            raise ValueError(f"{name} has {len(tree[key])} {key}, expected {n} for this {kind}")
        got = {
            jax.tree_util.keystr(p): jnp.shape(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]
        }
        missing = [f"missing {name}{k}" for k in want if k not in got]
        extra = [f"unexpected {name}{k}" for k in got if k not in want]
        if missing or extra:
            raise ValueError(f"{name} does not match {kind}.init's: " + "; ".join(missing + extra))
        for k, shape in want.items():
            if got[k] != shape:
                raise ValueError(
                    f"{name}{k} must have shape {shape} as {kind}.init gives, got {got[k]}"
                )


def fold(model: Any, params: Any, state: Any, *, key: str, linear: str, fold_fn: Callable):
    """``(model, params, state)`` with every batch norm folded into the linear map before it.

    A layer ``{linear: ..., "batch_norm": ...}`` of ``params[key]`` becomes
    ``{linear: fold_fn(...)}`` (:func:`jaxbn.fold_into_dense` or
    :func:`jaxbn.fold_into_conv`); one without batch norm is kept as it is.
    With ``model.fuse_activation`` the scale folded in is ``|scale| + eps``,
    the one :func:`jaxbn.batch_norm_act` multiplies by. The folded model has
    no batch norm, and its state no statistics.
    """
    layers = []
    for layer, layer_state in zip(params[key], state[key], strict=True):
        if "batch_norm" in layer:
            bn_params = dict(layer["batch_norm"])
            if model.fuse_activation:
                bn_params["scale"] = effective_scale(bn_params["scale"], eps=model.eps)
            folded = fold_fn(layer[linear], bn_params, layer_state["batch_norm"], eps=model.eps)
            layer = {linear: folded}
        layers.append(layer)
    options = dict.fromkeys(("use_batch_norm", *BATCH_NORM_OPTIONS), False)
    return (
        dataclasses.replace(model, **options),
        {**params, key: layers},
        {**state, key: [{} for _ in layers]},
    )


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

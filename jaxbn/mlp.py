"""A multilayer perceptron with batch normalization after every hidden linear layer.

As in Ioffe & Szegedy (2015), batch norm sits between each hidden linear layer and
its nonlinearity, ``h = act(BN(x @ W))``; the hidden linear layer then has no bias,
since batch norm's learned ``bias`` (``beta``) takes its place. The output layer is a
plain linear layer with a bias and produces logits. Without batch norm every layer
is an ordinary biased linear layer, ``h = act(x @ W + b)``.

``MLP`` is a frozen, hashable config holding no arrays; ``init`` returns the params
(trained by the optimizer) and the state (the running statistics of every batch-norm
layer) as plain nested dicts, and ``apply`` threads the state through explicitly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn import _checks, _core
from jaxbn._checks import AxisName
from jaxbn._model import (
    BATCH_NORM_OPTIONS,
    check_batch_norm_options,
    check_model_activation,
    fold_model_layers,
    model_batch_norm,
)
from jaxbn.act import ACTIVATIONS, invert_activation
from jaxbn.fold import fold_into_dense
from jaxbn.layer import BatchNorm

__all__ = ["ACTIVATIONS", "MLP"]

Params = dict[str, Any]
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class MLP:
    """Multilayer perceptron with optional batch norm before each hidden nonlinearity.

    For hidden layer ``i`` (``0 <= i < len(layer_sizes) - 2``)::

        z_i = h_i @ kernel_i                     (no bias with batch norm)
        u_i = BN_i(z_i)                          (or z_i + bias_i without batch norm)
        h_{i+1} = activation(u_i)

    and the last layer gives ``logits = h @ kernel + bias``.

    Layout of ``params, state = mlp.init(key)`` (one entry per linear layer, the
    last entry being the output layer)::

        params["layers"][i]["dense"]["kernel"]        [fan_in, fan_out]
        params["layers"][i]["dense"]["bias"]          [fan_out]  output layer, and
                                                      hidden layers without batch norm
        params["layers"][i]["batch_norm"]["scale"]    [fan_out]  hidden layers, batch norm
        params["layers"][i]["batch_norm"]["bias"]     [fan_out]
        state["layers"][i]["batch_norm"]["mean"]      [fan_out]  running statistics
        state["layers"][i]["batch_norm"]["var"]       [fan_out]

    ``state["layers"][i]`` is an empty dict for layers without batch norm.

    Attributes:
        layer_sizes: ``(inputs, hidden_1, ..., hidden_k, outputs)``, a tuple of at
            least two positive ints.
        activation: name of the hidden nonlinearity, a key of :data:`ACTIVATIONS`.
        use_batch_norm: put a :class:`jaxbn.BatchNorm` before each hidden
            nonlinearity.
        momentum: running-statistics momentum of the batch-norm layers.
        eps: batch norm's ``eps``.
        axis_name: named axis to synchronize batch statistics over (inside
            ``shard_map``/``pmap``), or ``None``.
        init_stddev: standard deviation of the Gaussian initial kernels; ``None``
            (default) uses ``1 / sqrt(fan_in)`` (LeCun normal). Biases start at 0.
        param_dtype: dtype of the params and state.
        remat: recompute each hidden layer's linear map and batch norm in the
            backward pass instead of keeping them (``jax.checkpoint`` per layer):
            less activation memory for one more matmul per layer.
        debias: zero-debiased running averages in every batch-norm layer (see
            :class:`jaxbn.BatchNorm`; the state then counts updates in ``"count"``).
        frozen: batch-norm layers normalize with their running statistics in
            training too and leave them unchanged (see :class:`jaxbn.BatchNorm`).
        fuse_activation: run every hidden batch norm fused with its activation
            (:func:`jaxbn.batch_norm_act`, In-Place ABN): the backward keeps only
            each layer's output, for less activation memory at about the same
            speed. Needs batch norm and an invertible ``activation``
            (``"leaky_relu"``, ``"elu"``, ``"identity"``); batch norm's scale is
            then ``|scale| + eps`` (see :func:`jaxbn.act.effective_scale`).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxbn.mlp import MLP
        >>> mlp = MLP((4, 8, 3), activation="relu")
        >>> params, state = mlp.init(jax.random.key(0))
        >>> params["layers"][0]["dense"]["kernel"].shape
        (4, 8)
        >>> sorted(params["layers"][0]["batch_norm"])
        ['bias', 'scale']
        >>> logits, state = mlp.apply(params, state, jnp.ones((5, 4)), training=True)
        >>> logits.shape
        (5, 3)
    """

    layer_sizes: tuple[int, ...]
    activation: str = "relu"
    use_batch_norm: bool = True
    momentum: float = 0.99
    eps: float = 1e-5
    axis_name: AxisName = None
    init_stddev: float | None = None
    param_dtype: Any = jnp.float32
    remat: bool = False
    debias: bool = False
    frozen: bool = False
    fuse_activation: bool = False

    def __post_init__(self):
        sizes = self.layer_sizes
        if not isinstance(sizes, tuple):
            raise TypeError(
                f"layer_sizes must be a tuple of ints (hashable), got {type(sizes).__name__} "
                f"{sizes!r}"
            )
        if len(sizes) < 2 or any(not _checks.is_int(d) or d < 1 for d in sizes):
            raise ValueError(
                f"layer_sizes must hold at least two positive ints (inputs, ..., outputs), "
                f"got {sizes!r}"
            )
        check_model_activation(self)
        _checks.check_positive_or_none("init_stddev", self.init_stddev)
        check_batch_norm_options(self)
        _checks.check_hashable_fields(self)
        # Checks momentum, eps and axis_name once, with the layer's own messages.
        if self.use_batch_norm:
            self._batch_norm(sizes[1] if len(sizes) > 2 else 1)

    @property
    def num_hidden(self) -> int:
        """The number of hidden layers, ``len(layer_sizes) - 2``."""
        return len(self.layer_sizes) - 2

    def _batch_norm(self, width: int) -> BatchNorm:
        """The batch-norm layer after a hidden linear layer of ``width`` units."""
        return model_batch_norm(self, width)

    def init(self, key: jax.Array) -> tuple[Params, State]:
        """Returns fresh ``(params, state)`` in the layout of the class docstring.

        Args:
            key: a ``jax.random.key`` for the kernels.

        Returns:
            ``(params, state)``, nested dicts of arrays.
        """
        keys = jax.random.split(key, len(self.layer_sizes) - 1)
        layers, states = [], []
        for i, (fan_in, fan_out) in enumerate(
            zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True)
        ):
            std = 1.0 / math.sqrt(fan_in) if self.init_stddev is None else self.init_stddev
            kernel = std * jax.random.normal(keys[i], (fan_in, fan_out), self.param_dtype)
            dense = {"kernel": kernel}
            layer, layer_state = {"dense": dense}, {}
            if i < self.num_hidden and self.use_batch_norm:
                bn_params, bn_state = self._batch_norm(fan_out).init()
                layer["batch_norm"], layer_state["batch_norm"] = bn_params, bn_state
            else:
                dense["bias"] = jnp.zeros((fan_out,), self.param_dtype)
            layers.append(layer)
            states.append(layer_state)
        return {"layers": layers}, {"layers": states}

    def _forward(self, params, state, x, training):
        """Returns ``(logits, new_state, pre_activations)``."""
        _checks.check_training(training)
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.layer_sizes[0]:
            raise ValueError(
                f"x must have shape [batch, {self.layer_sizes[0]}] (layer_sizes[0] inputs), "
                f"got {x.shape}"
            )
        self._check_variables(params, state)
        h, new_states, pre = x, [], []
        for i, (layer, layer_state) in enumerate(
            zip(params["layers"], state["layers"], strict=True)
        ):
            hidden = i < self.num_hidden
            layer_fn = self._layer
            if self.remat and hidden:
                layer_fn = jax.checkpoint(layer_fn, static_argnums=(3, 4))
            h, u, new_layer_state = layer_fn(layer, layer_state, h, training, hidden)
            new_states.append(new_layer_state)
            if hidden:
                pre.append(u)
        return h, {"layers": new_states}, pre

    def _check_variables(self, params, state):
        """Checks that ``params`` and ``state`` have the layout and shapes of :meth:`init`.

        Compares the layer count, every entry (a batch-norm entry present or
        absent, a dense ``bias`` present or absent) and every shape (the
        widths) with what this config's ``init`` returns, while tracing.
        """
        want = jax.eval_shape(lambda: self.init(jax.random.key(0)))
        n = len(self.layer_sizes) - 1
        for tree, name in ((params, "params"), (state, "state")):
            if not isinstance(tree, dict) or not isinstance(tree.get("layers"), (list, tuple)):
                raise TypeError(
                    f'{name} must be a dict {{"layers": [...]}} as MLP.init returns, got '
                    f"{type(tree).__name__}"
                    + (f" with keys {sorted(tree)}" if isinstance(tree, dict) else "")
                )
            if len(tree["layers"]) != n:
                raise ValueError(
                    f"{name} has {len(tree['layers'])} layers, expected {n} for "
                    f"layer_sizes={self.layer_sizes!r}"
                )
        config = f"layer_sizes={self.layer_sizes!r}, use_batch_norm={self.use_batch_norm!r}"
        for tree, expected, name in ((params, want[0], "params"), (state, want[1], "state")):
            got = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
            exp = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
            paths = {jax.tree_util.keystr(p): p for p in (*got, *exp)}
            got = {jax.tree_util.keystr(p): v for p, v in got.items()}
            exp = {jax.tree_util.keystr(p): v for p, v in exp.items()}
            missing = [k for k in paths if k in exp and k not in got]
            extra = [k for k in paths if k in got and k not in exp]
            if missing or extra:
                raise ValueError(
                    f"{name} does not match the MLP ({config}): "
                    + "; ".join(
                        [f"missing {name}{k}" for k in missing]
                        + [f"unexpected {name}{k}" for k in extra]
                    )
                )
            for k, v in exp.items():
                if jnp.shape(got[k]) != v.shape:
                    raise ValueError(
                        f"{name}{k} must have shape {v.shape} for the MLP ({config}), "
                        f"got {jnp.shape(got[k])}"
                    )

    def _layer(self, layer, layer_state, h, training, hidden):
        """One layer: ``(output, pre_activation, new_layer_state)``."""
        dense = layer["dense"]
        u = h @ dense["kernel"]
        if "bias" in dense:
            u = u + _core.expand(dense["bias"], u.ndim, (u.ndim - 1,))
        new_layer_state = {}
        if "batch_norm" in layer:
            bn = self._batch_norm(u.shape[-1])
            u, new_layer_state["batch_norm"] = bn.apply(
                layer["batch_norm"], layer_state["batch_norm"], u, training=training
            )
            if bn.fused:
                # The activation ran inside batch norm; the pre-activation (for
                # pre_activations only, dead code otherwise) is its inverse.
                return (
                    u,
                    invert_activation(u, self.activation, bn.negative_slope)[0],
                    new_layer_state,
                )
        return (ACTIVATIONS[self.activation](u) if hidden else u), u, new_layer_state

    def apply(
        self, params: Params, state: State, x: ArrayLike, *, training: bool
    ) -> tuple[jax.Array, State]:
        """Runs the network; returns ``(logits, new_state)``.

        Args:
            params: from :meth:`init`.
            state: the running statistics, from :meth:`init` or a previous call.
            x: ``[batch, layer_sizes[0]]`` inputs.
            training: ``True``: batch norm uses the batch statistics and the
                running statistics are updated; ``False``: running statistics are
                used and ``state`` comes back unchanged.

        Returns:
            ``(logits, new_state)``: ``logits`` is ``[batch, layer_sizes[-1]]``,
            ``new_state`` has the layout of ``state`` (no gradient flows into it).
        """
        logits, new_state, _ = self._forward(params, state, x, training)
        return logits, new_state

    def pre_activations(
        self, params: Params, state: State, x: ArrayLike, *, training: bool
    ) -> list[jax.Array]:
        """The inputs to each hidden nonlinearity: ``u_i`` in the class docstring.

        With batch norm these are batch norm's outputs (after ``scale`` and
        ``bias``), without it ``x @ kernel + bias``. This is what Ioffe & Szegedy
        (2015), Figure 1 (b, c) plots for one sigmoid unit.

        Args:
            params: from :meth:`init`.
            state: the running statistics.
            x: ``[batch, layer_sizes[0]]`` inputs.
            training: as in :meth:`apply` (``True`` normalizes with the statistics
                of ``x`` itself).

        Returns:
            A list of ``num_hidden`` arrays, ``[batch, layer_sizes[i + 1]]``.
        """
        return self._forward(params, state, x, training)[2]

    def fold(self, params: Params, state: State) -> tuple[MLP, Params, State]:
        """Folds every batch norm into its dense layer, for inference.

        Each hidden layer ``act(BN(x @ W))`` in evaluation mode is the affine map
        ``act(x @ W' + b')`` (see :func:`jaxbn.fold_into_dense`), so the folded
        network is the same MLP without batch norm: cheaper, and with outputs
        equal to ``apply(params, state, x, training=False)`` to within rounding.

        Args:
            params: trained params of this network.
            state: its running statistics.

        Returns:
            ``(model, params, state)`` of the folded network (``use_batch_norm``
            off; the state holds no statistics).
        """
        layers = fold_model_layers(
            self, params["layers"], state["layers"], linear="dense", fold=fold_into_dense
        )
        folded = dataclasses.replace(
            self, use_batch_norm=False, **dict.fromkeys(BATCH_NORM_OPTIONS, False)
        )
        return folded, {"layers": layers}, {"layers": [{} for _ in layers]}

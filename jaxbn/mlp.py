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
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxbn import _model
from jaxbn._checks import AxisName, check_training
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
        _model.check_sizes(
            "layer_sizes", self.layer_sizes, 2, "two positive ints (inputs, ..., outputs)"
        )
        _model.check_config(self)

    @property
    def num_hidden(self) -> int:
        """The number of hidden layers, ``len(layer_sizes) - 2``."""
        return len(self.layer_sizes) - 2

    @functools.cached_property
    def _batch_norms(self) -> tuple[BatchNorm | None, ...]:
        """Each layer's batch norm (``None`` for the output layer, or without batch norm)."""
        hidden = self.layer_sizes[1:-1] if self.use_batch_norm else ()
        bns = [_model.batch_norm(self, width) for width in hidden]
        return (*bns, *[None] * (len(self.layer_sizes) - 1 - len(bns)))

    @functools.cached_property
    def _variable_shapes(self) -> tuple[dict, dict]:
        """The shapes :meth:`init` gives, computed once (see :func:`_model.check_variables`)."""
        return _model.variable_shapes(self)

    def init(self, key: jax.Array) -> tuple[Params, State]:
        """Returns fresh ``(params, state)`` in the layout of the class docstring.

        Args:
            key: a ``jax.random.key`` for the kernels.

        Returns:
            ``(params, state)``, nested dicts of arrays.
        """
        keys = jax.random.split(key, len(self.layer_sizes) - 1)
        shapes = zip(self.layer_sizes[:-1], self.layer_sizes[1:], strict=True)
        layers = [
            _model.init_layer(self, k, shape, "dense", bn)
            for k, shape, bn in zip(keys, shapes, self._batch_norms, strict=True)
        ]
        return {"layers": [p for p, _ in layers]}, {"layers": [s for _, s in layers]}

    def _forward(self, params, state, x, training):
        """Returns ``(logits, new_state, pre_activations)``, after checking the arguments."""
        x = self._check(params, state, x, training)
        h, new_states, pre = x, [], []
        for i, (layer, layer_state, bn) in enumerate(
            zip(params["layers"], state["layers"], self._batch_norms, strict=True)
        ):
            hidden = i < self.num_hidden
            layer_fn = self._layer
            if self.remat and hidden:
                layer_fn = jax.checkpoint(layer_fn, static_argnums=(3, 4, 5))
            h, u, new_layer_state = layer_fn(layer, layer_state, h, bn, training, hidden)
            new_states.append(new_layer_state)
            if hidden:
                pre.append(u)
        return h, {"layers": new_states}, pre

    def _check(self, params, state, x, training):
        """Checks the arguments of :meth:`apply` while tracing; returns ``x`` as an array."""
        check_training(training)
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.layer_sizes[0]:
            raise ValueError(
                f"x must have shape [batch, {self.layer_sizes[0]}] (layer_sizes[0] inputs), "
                f"got {x.shape}"
            )
        _model.check_variables(self, params, state, "layers")
        return x

    def _layer(self, layer, layer_state, h, bn, training, hidden):
        """One layer: ``(output, pre_activation, new_layer_state)``."""
        z = h @ layer["dense"]["kernel"]
        u, new_layer_state = _model.normalize(
            layer, layer_state, z, bn, linear="dense", training=training, axis=-1
        )
        if bn is not None and bn.fused:
            # The activation ran inside batch norm; the pre-activation (for
            # pre_activations only, dead code otherwise) is its inverse.
            pre = invert_activation(u, self.activation, bn.negative_slope)[0]
            return u, pre, new_layer_state
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
        return _model.fold(
            self, params, state, key="layers", linear="dense", fold_fn=fold_into_dense
        )

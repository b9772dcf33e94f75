"""Equinox adapter: a drop-in for ``eqx.nn.BatchNorm(mode="batch")`` computed by jaxbn.

Needs equinox (``pip install "jaxbn[equinox]"``); ``import jaxbn`` never
imports it.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks, _core
from jaxbn._frameworks import as_number, as_tuple, promote, require
from jaxbn.layer import BatchNorm as _Layer
from jaxbn.layer import debiased

eqx = require("equinox", adapter="jaxbn.equinox", extra="equinox")

__all__ = ["BatchNorm"]


class BatchNorm(eqx.nn.BatchNorm):
    """``eqx.nn.BatchNorm(mode="batch")`` computed by jaxbn, with correct debiasing.

    Same constructor, call and use as Equinox's: build it with
    ``eqx.nn.make_with_state``, call it inside ``jax.vmap(...,
    axis_name=axis_name)`` on one example ``x`` of shape ``(input_size, *spatial)``
    with an ``eqx.nn.State``, get ``(y, state)`` back; toggle ``inference`` with
    ``eqx.nn.inference_mode``. Fields ``weight`` and ``bias`` (``None`` without
    ``channelwise_affine``), state under ``batch_counter`` (int32) and
    ``batch_state_index`` (``(hidden_mean, hidden_var)`` in ``dtype``). Training
    normalizes with :func:`jaxbn.batch_norm` (the hand-written backward) over
    the spatial axes and the named axis, through :meth:`jaxbn.BatchNorm.apply`;
    the output dtype is Equinox's (the promotion of ``x``'s and the weights',
    computed explicitly: it holds under ``jax_numpy_dtype_promotion="strict"``
    too).

    A subclass of ``eqx.nn.BatchNorm``, so code that selects batch norms by type
    (``isinstance``, a type predicate in ``eqx.filter``) finds it; its fields
    are Equinox's, with ``ema_first_time_index`` and ``ema_state_index``
    ``None`` as in Equinox's batch mode, so the leaves of a model are those of
    the same model with Equinox's layer. Equinox's abstract/final pattern
    advises against subclassing a concrete module, but enforces it only for
    classes declared ``strict=True``, which ``eqx.nn.BatchNorm`` is not
    (equinox 0.13): this class builds its fields with Equinox's ``__init__``
    in batch mode, starts the hidden variance at zero (below), and replaces
    ``__call__`` whole.
    Code that reads the hidden statistics of a layer selected by type reads
    jaxbn's hidden variance, Equinox's minus ``momentum**t`` (below).

    Running statistics: both keep zero-debiased averages, ``hidden = momentum *
    hidden + (1 - momentum) * batch``, with a batch counter ``t``, and evaluate
    with ``hidden / (1 - momentum**t)``. Equinox starts the hidden variance at
    one, not zero, so its evaluation variance is the debiased average plus
    ``momentum**t / (1 - momentum**t)``: after 5 steps at ``momentum=0.99``
    that is 19.4 on top of the data's variance, after 100 steps 0.58, and the
    first evaluations normalize with a far too large variance. Here the hidden
    variance starts at zero, so evaluation uses exactly the debiased average of
    the batch statistics seen (before any training step: mean 0, variance 1).
    The hidden means are equal; the hidden variances differ by ``momentum**t``.

    Args:
        input_size: number of channels (axis 0 of each example).
        axis_name: the ``vmap`` (or ``pmap``/``shard_map``) axis name, or a
            sequence of names, to compute the statistics over.
        eps: positive constant added to the variance (a Python or NumPy real).
        channelwise_affine: learn ``weight`` and ``bias``.
        momentum: weight of the old running statistics, in ``[0, 1)`` (a
            Python or NumPy real; not a bool).
        inference: ``True``: normalize with the running statistics.
        dtype: dtype of the weights and the running statistics; default float32
            (float64 with ``jax_enable_x64``).
        mode: must be ``"batch"``; Equinox's ``"ema"`` mode is not provided.

    Raises:
        ValueError, TypeError: for arguments :class:`jaxbn.BatchNorm` refuses
            (``input_size``, ``eps``, ``momentum``) or ``mode != "batch"``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import equinox as eqx
        >>> from jaxbn import equinox as beqx
        >>> bn, state = eqx.nn.make_with_state(beqx.BatchNorm)(2, "batch", momentum=0.9)
        >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> y, state = jax.vmap(bn, (0, None), (0, None), axis_name="batch")(x, state)
        >>> state.get(bn.batch_state_index)[0]
        Array([0.2, 2. ], dtype=float32)
    """

    def __init__(
        self,
        input_size: int,
        axis_name: Hashable | Sequence[Hashable],
        eps: float = 1e-5,
        channelwise_affine: bool = True,
        momentum: float = 0.99,
        inference: bool = False,
        dtype: Any = None,
        mode: str = "batch",
    ):
        if mode != "batch":
            raise ValueError(
                f'mode must be "batch" (jaxbn keeps correctly debiased batch statistics); '
                f"got {mode!r}"
            )
        input_size, eps, momentum = as_number(input_size), as_number(eps), as_number(momentum)
        real = isinstance(momentum, (int, float)) and not isinstance(momentum, bool)
        if not (real and 0.0 <= momentum < 1.0):
            raise ValueError(
                f"momentum must be in [0, 1), got {momentum!r} (the debiasing divides by "
                f"1 - momentum**t)"
            )
        dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
        _Layer(input_size, axis=0, eps=eps, momentum=momentum, param_dtype=dtype)  # checks
        super().__init__(
            input_size, axis_name, eps, channelwise_affine, momentum, inference, dtype, mode
        )
        # Equinox starts the hidden variance at one; zero makes its debiased value exact.
        zeros = jnp.zeros((input_size,), dtype)
        self.batch_state_index = eqx.nn.StateIndex((zeros, zeros))

    def __call__(
        self,
        x: jax.Array,
        state: Any,
        *,
        key: Any = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, Any]:
        """Normalizes one example ``x``; returns ``(y, state)``.

        Args:
            x: ``(input_size, *spatial)``, one example (call inside ``vmap``).
            state: the ``eqx.nn.State`` holding the running statistics.
            key: ignored (Equinox's layer API).
            inference: overrides the ``inference`` field when given.

        Returns:
            ``(y, state)``: ``y`` like ``x``; ``state`` updated in training.

        Raises:
            NameError: outside a ``vmap`` with the matching ``axis_name``.
            ValueError, TypeError: for bad input, as :func:`jaxbn.batch_norm`.
        """
        del key
        if inference is None:
            inference = self.inference
        _checks.check_x(x)
        x = jnp.asarray(x)
        if x.shape[0] != self.input_size:
            raise ValueError(
                f"x must have input_size={self.input_size} channels on axis 0, got shape {x.shape}"
            )
        params = {} if self.weight is None else {"scale": self.weight, "bias": self.bias}
        counter = state.get(self.batch_counter)
        hidden_mean, hidden_var = state.get(self.batch_state_index)
        layer = _Layer(
            self.input_size,
            axis=0,
            eps=self.eps,
            use_scale=self.channelwise_affine,
            use_bias=self.channelwise_affine,
            momentum=self.momentum,
            axis_name=as_tuple(self.axis_name),
            dtype=promote(x, *params.values(), hidden_mean if inference else None),
        )
        if inference:
            stats = {
                "mean": debiased(hidden_mean, self.momentum, counter, 0.0),
                "var": debiased(hidden_var, self.momentum, counter, 1.0),
            }
            y, _ = layer.apply(params, stats, x, training=False)
            return y, state
        y, hidden = layer.apply(params, {"mean": hidden_mean, "var": hidden_var}, x, training=True)
        state = state.set(self.batch_counter, _core.next_count(counter))
        state = state.set(self.batch_state_index, (hidden["mean"], hidden["var"]))
        return y, state

"""The batch-norm layer: a frozen config, explicit params and running statistics.

``BatchNorm`` holds no arrays. ``init`` returns two plain dicts, ``params``
(trained by the optimizer) and ``state`` (the running statistics, updated by
``apply`` and returned, never differentiated). The training step is then::

    def loss_fn(params, state, x, labels):
        y, new_state = bn.apply(params, state, x, training=True)
        return loss(y, labels), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, labels)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxbn import _checks
from jaxbn._checks import AxisName
from jaxbn.ops import batch_norm, batch_norm_inference

__all__ = ["BatchNorm"]

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    """Batch normalization layer (Ioffe & Szegedy, 2015) as a hashable config.

    Training normalizes with the batch statistics and updates the running ones:

    .. math::

        \\hat\\mu \\leftarrow m \\hat\\mu + (1 - m) \\mu_B, \\qquad
        \\hat\\sigma^2 \\leftarrow m \\hat\\sigma^2 + (1 - m) \\sigma_B^2

    (Flax's convention, with ``m = momentum``). PyTorch's ``momentum`` weighs the
    new value instead: PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here
    (``m = 1 - m_torch``). Evaluation normalizes with the running statistics.

    Attributes:
        num_features: size of the feature axis (an int), or the sizes of the
            feature axes (a tuple) when ``axis`` is a tuple.
        axis: feature axis or axes of the input (``-1`` for ``[N, C]`` and NHWC,
            ``1`` for NCHW).
        momentum: weight of the old running statistics, in ``[0, 1]``.
        eps: positive constant added to the variance.
        use_scale: learn a per-feature ``scale`` (``gamma``).
        use_bias: learn a per-feature ``bias`` (``beta``).
        axis_name: named mapped axis (or tuple) to synchronize statistics over
            inside ``shard_map``/``pmap``.
        param_dtype: dtype of ``params`` and ``state``.

    Examples:
        >>> import jax.numpy as jnp
        >>> import jaxbn
        >>> bn = jaxbn.BatchNorm(3)
        >>> params, state = bn.init()
        >>> y, state = bn.apply(params, state, jnp.ones((4, 3)), training=True)
        >>> state["var"]
        Array([0.99, 0.99, 0.99], dtype=float32)
    """

    num_features: int | tuple[int, ...]
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: AxisName = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        shape = self.feature_shape
        if not shape or any(
            isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 for d in shape
        ):
            raise ValueError(
                f"num_features must be a positive int or a tuple of them, got {self.num_features!r}"
            )
        naxes = 1 if isinstance(self.axis, (int, np.integer)) else len(self.axis)
        if isinstance(self.axis, list) or isinstance(self.num_features, list):
            raise TypeError("axis and num_features must be ints or tuples, not lists")
        if naxes != len(shape):
            raise ValueError(
                f"num_features {self.num_features!r} must give one size per feature "
                f"axis in axis={self.axis!r}"
            )
        if isinstance(self.momentum, bool) or not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum!r}")
        _checks.check_eps(self.eps)
        if not jnp.issubdtype(self.param_dtype, jnp.floating):
            raise TypeError(f"param_dtype must be floating, got {self.param_dtype!r}")

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of every per-feature array: params and statistics."""
        n = self.num_features
        return (n,) if isinstance(n, (int, np.integer)) else tuple(n)

    def init(self, dtype: Any = None) -> tuple[Params, State]:
        """Returns ``(params, state)``: ``{"scale": 1, "bias": 0}``, ``{"mean": 0, "var": 1}``.

        Needs no mode and no named axis. ``scale``/``bias`` are left out of
        ``params`` when ``use_scale``/``use_bias`` is off.

        Args:
            dtype: dtype of the params and state; defaults to ``param_dtype``.
        """
        dtype = self.param_dtype if dtype is None else dtype
        shape = self.feature_shape
        params = {}
        if self.use_scale:
            params["scale"] = jnp.ones(shape, dtype)
        if self.use_bias:
            params["bias"] = jnp.zeros(shape, dtype)
        state = {"mean": jnp.zeros(shape, dtype), "var": jnp.ones(shape, dtype)}
        return params, state

    def apply(
        self,
        params: Params,
        state: State,
        x: ArrayLike,
        *,
        training: bool,
        mask: ArrayLike | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x``; returns ``(y, new_state)``.

        Args:
            params: from :meth:`init` (``"scale"``, ``"bias"``).
            state: running statistics ``{"mean", "var"}``.
            x: ``[..., features]`` input.
            training: ``True``: batch statistics, and the running averages are
                updated; ``False``: running statistics, state returned as is.
            mask: boolean over the batch axes (training only): only ``True``
                entries count in the statistics. A mask keeping nothing leaves
                the running statistics unchanged.

        Returns:
            ``(y, new_state)``: ``y`` like ``x``; ``new_state`` like ``state``.
            No gradient flows into ``new_state``.
        """
        if not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a Python bool (True or False), got {training!r}")
        _checks.check_x(x)
        feat = _checks.feature_axes(jnp.ndim(x), self.axis)
        got = tuple(jnp.shape(x)[a] for a in feat)
        if got != self.feature_shape:
            raise ValueError(
                f"x has {got} features on axis {self.axis!r} (shape {jnp.shape(x)}), "
                f"but the layer was built with num_features={self.num_features!r}"
            )
        scale, bias = params.get("scale"), params.get("bias")
        if not training:
            # The state is returned unchanged, as a constant: no gradient into it.
            state = jax.lax.stop_gradient(state)
            y = batch_norm_inference(
                x, scale, bias, state["mean"], state["var"], axis=self.axis, eps=self.eps
            )
            return y, state
        y, batch_mean, batch_var = batch_norm(
            x, scale, bias, axis=self.axis, eps=self.eps, axis_name=self.axis_name, mask=mask
        )
        m = self.momentum
        old = jax.lax.stop_gradient(state)

        def update(old, new):
            return m * old + (1.0 - m) * jax.lax.stop_gradient(new).astype(old.dtype)

        new_state = {
            "mean": update(old["mean"], batch_mean),
            "var": update(old["var"], batch_var),
        }
        if mask is not None:
            # An all-masked batch has no statistics: keep the old ones.
            kept = jnp.any(jnp.asarray(mask))
            if self.axis_name is not None:
                kept = jax.lax.psum(kept.astype(jnp.int32), self.axis_name) > 0
            new_state = {k: jnp.where(kept, v, old[k]) for k, v in new_state.items()}
        return y, new_state

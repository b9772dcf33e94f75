"""Interoperability with ``flax.linen.BatchNorm``: variables, configs and a module.

Flax is an optional dependency: ``import jaxbn`` never imports it, and this
module is imported only on demand (``from jaxbn import interop``), which needs
``pip install flax``.

Facts about ``flax.linen.BatchNorm`` (flax 0.12) that the converters rely on:

- Variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``,
  each shaped like the feature axes. ``"params"`` is absent when both
  ``use_scale`` and ``use_bias`` are off. The statistics are float32 (with the
  default ``force_float32_reductions=True``), the params ``param_dtype``.
- Running statistics: ``momentum * old + (1 - momentum) * batch``, the same
  convention as :class:`jaxbn.BatchNorm`; defaults ``momentum=0.99``,
  ``epsilon=1e-5`` (jaxbn's ``eps``), ``axis=-1``.
- ``use_fast_variance=True`` (the default) computes ``E[x^2] - E[x]^2``, which
  loses precision when ``|mean| >> std``; jaxbn always uses a shifted,
  cancellation-free variance, so the two agree to float32 rounding on
  well-conditioned data and jaxbn is the accurate one otherwise.
- ``axis_name`` averages the statistics over a named axis; ``axis_index_groups``
  (subgroups of it) has no jaxbn counterpart and is refused.
- ``use_running_average`` is a module attribute or a call argument (exactly one
  of the two must be set): ``True`` normalizes with the running statistics
  (jaxbn's ``training=False``), ``False`` with the batch's and updates the
  running ones, which then needs ``mutable=["batch_stats"]``. During ``init``
  the running statistics are not updated and ``axis_name`` is not used.
- ``mask`` broadcasts against the whole input; only ``True`` positions enter the
  statistics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
    import flax.linen as nn
except ImportError as e:  # pragma: no cover - exercised only without flax
    raise ImportError(
        "jaxbn.interop needs flax, an optional dependency: pip install flax "
        '(or pip install -e ".[bench]")'
    ) from e

from jaxbn import _checks
from jaxbn.layer import BatchNorm

__all__ = [
    "FlaxBatchNorm",
    "batch_norm_from_flax",
    "from_flax",
    "to_flax",
    "to_flax_module",
]

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def _check_same_shape(named: dict[str, Any]) -> None:
    shapes = {name: jnp.shape(v) for name, v in named.items()}
    if len(set(shapes.values())) > 1:
        got = ", ".join(f"{name}: {shape}" for name, shape in shapes.items())
        raise ValueError(
            f"the params and statistics of one batch norm must share one shape "
            f"(the feature axes), got {got}"
        )


def to_flax(params: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Converts jaxbn ``(params, state)`` to a ``flax.linen.BatchNorm``'s variables.

    The arrays are passed through as they are (no copy, no cast).

    Args:
        params: ``{"scale", "bias"}`` from :meth:`jaxbn.BatchNorm.init` (either
            key may be absent).
        state: ``{"mean", "var"}``, the running statistics.

    Returns:
        ``{"params": {...}, "batch_stats": {"mean", "var"}}``, the layout of
        ``flax.linen.BatchNorm(...).init(...)``; as there, ``"params"`` is left
        out when it would be empty (neither scale nor bias).

    Raises:
        TypeError, ValueError: on a missing or unexpected key or mismatched
            shapes.

    Examples:
        >>> import jaxbn
        >>> from jaxbn import interop
        >>> params, state = jaxbn.BatchNorm(3).init()
        >>> variables = interop.to_flax(params, state)
        >>> sorted(variables), sorted(variables["batch_stats"])
        (['batch_stats', 'params'], ['mean', 'var'])
    """
    _checks.check_keys("params", params, ("scale", "bias"), ())
    _checks.check_keys("state", state, ("mean", "var"), ("mean", "var"))
    _check_same_shape(
        {f'params["{k}"]': v for k, v in params.items()}
        | {f'state["{k}"]': v for k, v in state.items()}
    )
    out = {"batch_stats": {"mean": state["mean"], "var": state["var"]}}
    if params:
        out["params"] = {k: params[k] for k in ("scale", "bias") if k in params}
    return out


def from_flax(variables: Mapping[str, Any]) -> tuple[Params, State]:
    """Converts a ``flax.linen.BatchNorm``'s variables to jaxbn ``(params, state)``.

    Args:
        variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean",
            "var"}}`` of one batch-norm layer (a dict or a ``FrozenDict``; for a
            layer inside a model pass e.g. ``{"params":
            v["params"]["BatchNorm_0"], "batch_stats":
            v["batch_stats"]["BatchNorm_0"]}``). ``"params"`` may be absent.

    Returns:
        ``(params, state)``: plain dicts as :meth:`jaxbn.BatchNorm.init` makes,
        for :meth:`jaxbn.BatchNorm.apply`.

    Raises:
        TypeError, ValueError: on a missing or unexpected key or mismatched
            shapes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from jaxbn import interop
        >>> variables = nn.BatchNorm(use_running_average=True).init(
        ...     jax.random.key(0), jnp.ones((2, 3)))
        >>> params, state = interop.from_flax(variables)
        >>> state["var"]
        Array([1., 1., 1.], dtype=float32)
    """
    _checks.check_keys("variables", variables, ("params", "batch_stats"), ("batch_stats",))
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    _checks.check_keys('variables["params"]', params, ("scale", "bias"), ())
    _checks.check_keys('variables["batch_stats"]', stats, ("mean", "var"), ("mean", "var"))
    _check_same_shape(
        {f'variables["params"]["{k}"]': v for k, v in params.items()}
        | {f'variables["batch_stats"]["{k}"]': v for k, v in stats.items()}
    )
    return (
        {k: jnp.asarray(params[k]) for k in ("scale", "bias") if k in params},
        {"mean": jnp.asarray(stats["mean"]), "var": jnp.asarray(stats["var"])},
    )


def _is_constant_init(init, value: float, shape: tuple[int, ...], dtype) -> bool:
    """Whether a Flax initializer always gives ``value`` (checked by calling it)."""
    if init is (jax.nn.initializers.ones if value == 1 else jax.nn.initializers.zeros):
        return True
    with jax.ensure_compile_time_eval():
        a = init(jax.random.key(0), shape, dtype)
        b = init(jax.random.key(1), shape, dtype)
    return bool(np.all(np.asarray(a) == value) and np.all(np.asarray(b) == value))


def batch_norm_from_flax(module: nn.BatchNorm, num_features: int | tuple[int, ...]) -> BatchNorm:
    """The :class:`jaxbn.BatchNorm` configured like a ``flax.linen.BatchNorm``.

    Maps ``axis``, ``momentum``, ``epsilon`` (to ``eps``), ``use_scale``,
    ``use_bias``, ``axis_name`` and ``param_dtype``. ``use_running_average``
    is not part of a jaxbn config (pass ``training=not use_running_average`` to
    ``apply``), and ``use_fast_variance`` needs no counterpart (jaxbn's variance
    is always the accurate one).

    Args:
        module: the Flax module (a config: no variables are read).
        num_features: the size of the feature axis (a tuple of sizes when
            ``module.axis`` is a tuple); Flax infers it from the input, jaxbn
            needs it up front.

    Returns:
        The equivalent frozen :class:`jaxbn.BatchNorm`.

    Raises:
        TypeError: if ``module`` is not a ``flax.linen.BatchNorm``.
        ValueError: for Flax options jaxbn does not support:
            ``axis_index_groups``, an output ``dtype``,
            ``force_float32_reductions=False``, or a ``scale_init`` /
            ``bias_init`` other than ones / zeros.

    Examples:
        >>> import flax.linen as nn
        >>> from jaxbn import interop
        >>> bn = interop.batch_norm_from_flax(nn.BatchNorm(momentum=0.9, axis=1), 8)
        >>> bn.num_features, bn.axis, bn.momentum, bn.eps
        (8, 1, 0.9, 1e-05)
    """
    if not isinstance(module, nn.BatchNorm):
        raise TypeError(f"module must be a flax.linen.BatchNorm, got {type(module).__name__}")
    if module.axis_index_groups is not None:
        raise ValueError(
            f"axis_index_groups is not supported by jaxbn (statistics are averaged over the "
            f"whole axis_name); expected None, got {module.axis_index_groups!r}"
        )
    if module.dtype is not None:
        raise ValueError(
            f"dtype (the output dtype) is not supported by jaxbn.BatchNorm, whose output has "
            f"the input's dtype: expected None (cast the output yourself), got {module.dtype!r}"
        )
    if not module.force_float32_reductions:
        raise ValueError(
            "force_float32_reductions=False is not supported: jaxbn always reduces in "
            "float32 or wider; expected True, got False"
        )
    axis = tuple(module.axis) if isinstance(module.axis, list) else module.axis
    bn = BatchNorm(
        num_features,
        axis=axis,
        momentum=module.momentum,
        eps=module.epsilon,
        use_scale=module.use_scale,
        use_bias=module.use_bias,
        axis_name=module.axis_name,
        param_dtype=module.param_dtype,
    )
    for name, value in (("scale_init", 1.0), ("bias_init", 0.0)):
        if not _is_constant_init(getattr(module, name), value, bn.feature_shape, bn.param_dtype):
            raise ValueError(
                f"{name} must be the default (all {'ones' if value else 'zeros'}) to match "
                f"jaxbn.BatchNorm.init, got {getattr(module, name)!r}"
            )
    return bn


def to_flax_module(bn: BatchNorm) -> nn.BatchNorm:
    """The ``flax.linen.BatchNorm`` configured like a :class:`jaxbn.BatchNorm`.

    ``use_running_average`` is left unset (give it at call time), and
    ``use_fast_variance=False`` so that Flax computes the accurate two-pass
    variance, as jaxbn does.

    Args:
        bn: the jaxbn config.

    Returns:
        An unbound ``flax.linen.BatchNorm``; its variables are
        :func:`to_flax` of ``bn``'s ``(params, state)``.

    Raises:
        TypeError: if ``bn`` is not a :class:`jaxbn.BatchNorm`.

    Examples:
        >>> import jaxbn
        >>> from jaxbn import interop
        >>> m = interop.to_flax_module(jaxbn.BatchNorm(4, momentum=0.9, eps=1e-3))
        >>> m.momentum, m.epsilon, m.use_fast_variance
        (0.9, 0.001, False)
    """
    if not isinstance(bn, BatchNorm):
        raise TypeError(f"bn must be a jaxbn.BatchNorm, got {type(bn).__name__}")
    return nn.BatchNorm(
        axis=bn.axis,
        momentum=bn.momentum,
        epsilon=bn.eps,
        use_scale=bn.use_scale,
        use_bias=bn.use_bias,
        axis_name=bn.axis_name,
        param_dtype=bn.param_dtype,
        use_fast_variance=False,
    )


def _reduction_mask(mask: Any, x_shape: tuple[int, ...], feat: tuple[int, ...]) -> jax.Array:
    """A Flax mask (broadcastable to ``x``) as a jaxbn mask (over the batch axes)."""
    mask = jnp.asarray(mask)
    if mask.ndim > len(x_shape):
        raise ValueError(
            f"mask must broadcast to x's shape {x_shape}, got a mask of shape {mask.shape}"
        )
    mask = jnp.reshape(mask, (1,) * (len(x_shape) - mask.ndim) + mask.shape)
    if any(mask.shape[a] != 1 for a in feat):
        raise ValueError(
            f"mask must have size 1 on the feature axes {feat} (jaxbn masks whole "
            f"examples, not single features); got shape {mask.shape} for x of shape {x_shape}"
        )
    return jnp.squeeze(mask.astype(bool), feat)


class FlaxBatchNorm(nn.Module):
    """A ``flax.linen`` module with ``nn.BatchNorm``'s interface, computed by jaxbn.

    Holds the same variables (``"params"``: ``scale``, ``bias``;
    ``"batch_stats"``: ``mean``, ``var``) under the same names, takes the same
    call arguments, and normalizes with :func:`jaxbn.batch_norm` (the
    hand-written backward) in training and :func:`jaxbn.batch_norm_inference`
    with the running statistics, through :meth:`jaxbn.BatchNorm.apply`. So
    ``nn.BatchNorm`` can be swapped for it in a Flax model, and existing
    variables load unchanged.

    Differences from ``nn.BatchNorm``: the variance is always the accurate one
    (there is no ``use_fast_variance``); no ``axis_index_groups``, initializers
    or ``force_float32_reductions``; a ``mask`` must not vary along the feature
    axes; training on a single value per feature raises (Flax returns ``bias``),
    except during ``init``; a mask that keeps nothing gives zero statistics and
    leaves the running ones unchanged (Flax gives NaN); with ``dtype=None`` the
    output has the input's dtype (Flax promotes it with the params' dtype).

    Attributes:
        use_running_average: ``True``: normalize with the running statistics;
            ``False``: with the batch's, updating the running ones (call with
            ``mutable=["batch_stats"]``). Set here or at call time, not both.
        axis: feature axis or tuple of axes.
        momentum: weight of the old running statistics.
        epsilon: positive constant added to the variance.
        dtype: output dtype; ``None`` keeps the input's.
        param_dtype: dtype of ``scale`` and ``bias``; the statistics are float32
            (or wider if ``param_dtype`` is wider).
        use_bias: learn ``bias`` (``beta``).
        use_scale: learn ``scale`` (``gamma``).
        axis_name: named axis (or tuple) to average the statistics over.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxbn.interop import FlaxBatchNorm
        >>> bn = FlaxBatchNorm(momentum=0.9)
        >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
        >>> y, updates = bn.apply(
        ...     variables, x, use_running_average=False, mutable=["batch_stats"])
        >>> updates["batch_stats"]["mean"]
        Array([0.2, 2. ], dtype=float32)
    """

    use_running_average: bool | None = None
    axis: int | tuple[int, ...] = -1
    momentum: float = 0.99
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    use_bias: bool = True
    use_scale: bool = True
    axis_name: str | tuple[str, ...] | None = None

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Normalizes ``x``, updating ``batch_stats`` when training.

        Args:
            x: ``[..., features]`` input.
            use_running_average: as the attribute; exactly one of the two is set.
            mask: boolean, broadcastable to ``x`` with size 1 on the feature
                axes; only ``True`` positions enter the statistics.

        Returns:
            The normalized ``x``, shaped like ``x``.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        _checks.check_x(x)
        x = jnp.asarray(x)
        axis = tuple(self.axis) if isinstance(self.axis, list) else self.axis
        feat = _checks.feature_axes(x.ndim, axis)
        fshape = tuple(x.shape[a] for a in feat)
        bn = BatchNorm(
            fshape[0] if isinstance(axis, (int, np.integer)) else fshape,
            axis=axis,
            momentum=self.momentum,
            eps=self.epsilon,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            axis_name=self.axis_name,
            param_dtype=self.param_dtype,
        )
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", nn.initializers.ones, fshape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", nn.initializers.zeros, fshape, self.param_dtype)
        stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, fshape, stats_dtype)
        ra_var = self.variable("batch_stats", "var", jnp.ones, fshape, stats_dtype)
        state = {"mean": ra_mean.value, "var": ra_var.value}
        if mask is not None:
            mask = _reduction_mask(mask, x.shape, feat)

        if use_running_average:
            y, _ = bn.apply(params, state, x, training=False)
        elif self.is_initializing():
            # As in Flax: the running statistics keep their initial values and
            # axis_name is not used. Initializing on a single example (a common
            # dummy input) must work: a mask keeping everything lifts the check
            # against one value per feature, and the output is then ``bias``.
            if mask is None and math.prod(x.shape) // math.prod(fshape) <= 1:
                mask = jnp.ones(_checks.reduce_shape(x.shape, feat), bool)
            bn = dataclasses.replace(bn, axis_name=None)
            y, _ = bn.apply(params, state, x, training=True, mask=mask)
        else:
            y, new_state = bn.apply(params, state, x, training=True, mask=mask)
            ra_mean.value = new_state["mean"]
            ra_var.value = new_state["var"]
        return y if self.dtype is None else y.astype(self.dtype)

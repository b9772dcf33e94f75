"""``flax.linen`` adapter: a drop-in ``BatchNorm`` and converters of variables and configs.

Needs flax (``pip install "jaxbn[flax]"``); ``import jaxbn`` never imports it.
The four converters are also importable from :mod:`jaxbn.interop`.

Facts about ``flax.linen.BatchNorm`` (flax 0.12) that this module relies on:

- Variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``,
  each shaped like the feature axes. ``"params"`` is absent when both
  ``use_scale`` and ``use_bias`` are off. The statistics are float32 (with the
  default ``force_float32_reductions=True``), the params ``param_dtype``.
- Running statistics: ``momentum * old + (1 - momentum) * batch``, the same
  convention as :class:`jaxbn.BatchNorm`; defaults ``momentum=0.99``,
  ``epsilon=1e-5`` (jaxbn's ``eps``), ``axis=-1``.
- Output dtype: ``dtype``, or with ``dtype=None`` the promotion of the input's
  and the params' dtypes (bfloat16 ``x`` with float32 params gives float32).
- ``use_fast_variance=True`` (the default) computes ``E[x^2] - E[x]^2``, which
  loses precision when ``|mean| >> std``; jaxbn always uses a shifted,
  cancellation-free variance, so the two agree to float32 rounding on
  well-conditioned data and jaxbn is the accurate one otherwise.
- ``use_running_average`` is a module attribute or a call argument (exactly one
  of the two must be set). During ``init`` the running statistics are not
  updated and ``axis_name`` is not used.
- ``mask`` broadcasts against the whole input; only ``True`` positions enter the
  statistics; it is ignored with ``use_running_average=True``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks, _frameworks
from jaxbn._frameworks import check_axis_index_groups, flax_apply, flax_layer, promote, require
from jaxbn.layer import BatchNorm as _Layer

nn = require("flax.linen", adapter="jaxbn.linen", extra="flax")

__all__ = ["BatchNorm", "batch_norm_from_flax", "from_flax", "to_flax", "to_flax_module"]

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


def _check_variables(params_name: str, params: Any, stats_name: str, stats: Any) -> None:
    """Checks a batch norm's params and statistics: dicts of its keys, floating, one shape."""
    _checks.check_keys(params_name, params, ("scale", "bias"), ())
    _checks.check_keys(stats_name, stats, ("mean", "var"), ("mean", "var"))
    trees = ((params_name, params), (stats_name, stats))
    named = {f'{name}["{k}"]': v for name, tree in trees for k, v in tree.items()}
    for name, v in named.items():
        dtype = jnp.result_type(v)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating-point dtype, got {dtype}")
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
        state: ``{"mean", "var"}``, the running statistics. A state with more
            (``"count"``, ``"renorm_mean"``...) belongs to an option Flax does
            not have and is refused.

    Returns:
        ``{"params": {...}, "batch_stats": {"mean", "var"}}``, the layout of
        ``flax.linen.BatchNorm(...).init(...)``; as there, ``"params"`` is left
        out when it would be empty (neither scale nor bias).

    Raises:
        TypeError: if a tree is not a dict or an array is not floating.
        ValueError: on a missing or unexpected key or mismatched shapes.

    Examples:
        >>> import jaxbn
        >>> from jaxbn import linen
        >>> params, state = jaxbn.BatchNorm(3).init()
        >>> variables = linen.to_flax(params, state)
        >>> sorted(variables), sorted(variables["batch_stats"])
        (['batch_stats', 'params'], ['mean', 'var'])
    """
    _check_variables("params", params, "state", state)
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
        TypeError: if a tree is not a dict or an array is not floating.
        ValueError: on a missing or unexpected key or mismatched shapes.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from jaxbn import linen
        >>> variables = nn.BatchNorm(use_running_average=True).init(
        ...     jax.random.key(0), jnp.ones((2, 3)))
        >>> params, state = linen.from_flax(variables)
        >>> state["var"]
        Array([1., 1., 1.], dtype=float32)
    """
    _checks.check_keys("variables", variables, ("params", "batch_stats"), ("batch_stats",))
    params = variables.get("params", {})
    stats = variables["batch_stats"]
    _check_variables('variables["params"]', params, 'variables["batch_stats"]', stats)
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


def batch_norm_from_flax(module: nn.BatchNorm, num_features: int | tuple[int, ...]) -> _Layer:
    """The :class:`jaxbn.BatchNorm` configured like a ``flax.linen.BatchNorm``.

    Maps ``axis``, ``momentum``, ``epsilon`` (to ``eps``), ``dtype``,
    ``param_dtype``, ``use_scale``, ``use_bias`` and ``axis_name``.
    ``use_running_average`` is not part of a jaxbn config (pass
    ``training=not use_running_average`` to ``apply``), and
    ``use_fast_variance`` needs no counterpart (jaxbn's variance is always the
    accurate one). With ``dtype=None`` the two differ in the output dtype of
    inputs narrower than the params: Flax promotes (bfloat16 ``x``, float32
    params: float32 ``y``), :class:`jaxbn.BatchNorm` keeps the input's
    (:class:`jaxbn.linen.BatchNorm` follows Flax).

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
            ``axis_index_groups``, ``force_float32_reductions=False``, or a
            ``scale_init`` / ``bias_init`` other than ones / zeros; and for
            values :class:`jaxbn.BatchNorm` refuses (e.g. ``momentum=1.5``).

    Examples:
        >>> import flax.linen as nn
        >>> from jaxbn import linen
        >>> bn = linen.batch_norm_from_flax(nn.BatchNorm(momentum=0.9, axis=1), 8)
        >>> bn.num_features, bn.axis, bn.momentum, bn.eps
        (8, 1, 0.9, 1e-05)
    """
    if not isinstance(module, nn.BatchNorm):
        raise TypeError(f"module must be a flax.linen.BatchNorm, got {type(module).__name__}")
    _check_flax_only_options(module)
    bn = flax_layer(module, num_features)
    for name, value in (("scale_init", 1.0), ("bias_init", 0.0)):
        if not _is_constant_init(getattr(module, name), value, bn.feature_shape, bn.param_dtype):
            raise ValueError(
                f"{name} must be the default (all {'ones' if value else 'zeros'}) to match "
                f"jaxbn.BatchNorm.init, got {getattr(module, name)!r}"
            )
    return bn


def _check_flax_only_options(module) -> None:
    """Refuses the Flax options that have no jaxbn counterpart."""
    check_axis_index_groups(module.axis_index_groups)
    if not module.force_float32_reductions:
        raise ValueError(
            "force_float32_reductions=False is not supported: jaxbn always reduces in "
            "float32 or wider; expected True, got False"
        )


def to_flax_module(bn: _Layer) -> nn.BatchNorm:
    """The ``flax.linen.BatchNorm`` configured like a :class:`jaxbn.BatchNorm`.

    ``use_running_average`` is left unset (give it at call time), and
    ``use_fast_variance=False`` so that Flax computes the accurate two-pass
    variance, as jaxbn does. ``dtype`` is passed on; with ``dtype=None`` Flax
    promotes a narrower input to the params' dtype where jaxbn keeps the
    input's (see :func:`batch_norm_from_flax`).

    Args:
        bn: the jaxbn config.

    Returns:
        An unbound ``flax.linen.BatchNorm``; its variables are
        :func:`to_flax` of ``bn``'s ``(params, state)``.

    Raises:
        TypeError: if ``bn`` is not a :class:`jaxbn.BatchNorm`.
        ValueError: for options Flax cannot express: ``momentum=None``
            (cumulative average), ``unbiased_running_var``,
            ``virtual_batch_size``, ``renorm``, ``debias``, ``frozen``,
            ``activation``.

    Examples:
        >>> import jaxbn
        >>> from jaxbn import linen
        >>> m = linen.to_flax_module(jaxbn.BatchNorm(4, momentum=0.9, eps=1e-3))
        >>> m.momentum, m.epsilon, m.use_fast_variance
        (0.9, 0.001, False)
    """
    if not isinstance(bn, _Layer):
        raise TypeError(f"bn must be a jaxbn.BatchNorm, got {type(bn).__name__}")
    unsupported = {
        "momentum": (bn.momentum is None, "a float (Flax has no cumulative average)"),
        "unbiased_running_var": (bn.unbiased_running_var, "False"),
        "virtual_batch_size": (bn.virtual_batch_size is not None, "None"),
        "renorm": (bn.renorm, "False"),
        "debias": (bn.debias, "False"),
        "frozen": (bn.frozen, "False (freeze with use_running_average=True)"),
        "activation": (bn.activation is not None, "None (apply it after the module)"),
    }
    for name, (bad, expected) in unsupported.items():
        if bad:
            raise ValueError(
                f"flax.linen.BatchNorm cannot express {name}={getattr(bn, name)!r}: "
                f"expected {expected}"
            )
    shared = {name: getattr(bn, name) for name in _frameworks.FLAX_FIELDS}
    return nn.BatchNorm(**shared, epsilon=bn.eps, use_fast_variance=False)


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` computed by jaxbn: swap the import, keep the model.

    A subclass of ``flax.linen.BatchNorm`` that inherits its attributes (so
    positional and keyword arguments are Flax's), so code that selects
    batch-norm layers by type finds it. Holds the same variables
    (``"params"``: ``scale``, ``bias``; ``"batch_stats"``: ``mean``, ``var``)
    under the same names and dtypes, takes the same call arguments, and
    follows Flax's dtype rule (``dtype``, or the promotion of the input's and
    the params' dtypes, computed explicitly: it holds under
    ``jax_numpy_dtype_promotion="strict"`` too). Training normalizes with
    :func:`jaxbn.batch_norm` (the hand-written backward) and evaluation with
    :func:`jaxbn.batch_norm_inference`, both through
    :meth:`jaxbn.BatchNorm.apply`. Existing variables load unchanged.

    Where it deliberately differs from ``flax.linen.BatchNorm``:

    - the variance is always the accurate, shifted one: ``use_fast_variance``
      is accepted and has no effect (Flax's default fast variance loses digits
      when ``|mean| >> std``);
    - ``axis_index_groups`` and ``force_float32_reductions=False`` are refused;
    - training on a single value per feature raises (Flax returns ``bias``),
      except during ``init``, as Flax initializes on one dummy example;
    - a mask that keeps nothing gives zero statistics and leaves the running
      ones unchanged (Flax gives NaN); a non-boolean mask is refused.

    Attributes:
        use_running_average: ``True``: normalize with the running statistics;
            ``False``: with the batch's, updating the running ones (call with
            ``mutable=["batch_stats"]``). Set here or at call time, not both.
        axis: feature axis or tuple of axes.
        momentum: weight of the old running statistics (Python or NumPy real).
        epsilon: positive constant added to the variance (Python or NumPy real).
        dtype: output dtype; ``None`` promotes the input's and the params'.
        param_dtype: dtype of ``scale`` and ``bias``; the statistics are float32.
        use_bias: learn ``bias`` (``beta``).
        use_scale: learn ``scale`` (``gamma``).
        bias_init: initializer of ``bias``.
        scale_init: initializer of ``scale``.
        axis_name: named axis (or tuple) to average the statistics over.
        axis_index_groups: must be ``None``.
        use_fast_variance: accepted for compatibility; no effect.
        force_float32_reductions: must be ``True``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jaxbn import linen
        >>> bn = linen.BatchNorm(momentum=0.9)
        >>> x = jnp.array([[1.0, 10.0], [3.0, 30.0]])
        >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
        >>> y, updates = bn.apply(
        ...     variables, x, use_running_average=False, mutable=["batch_stats"])
        >>> updates["batch_stats"]["mean"]
        Array([0.2, 2. ], dtype=float32)
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Normalizes ``x``, updating ``batch_stats`` when training.

        Args:
            x: ``[..., features]`` input.
            use_running_average: as the attribute; exactly one of the two is set.
            mask: boolean, broadcastable to ``x``; only ``True`` positions enter
                the statistics (ignored with ``use_running_average=True``).

        Returns:
            The normalized ``x``, shaped like ``x``, in ``dtype`` (or the
            promotion of the input's and the params' dtypes).

        Raises:
            ValueError, TypeError: as :class:`jaxbn.BatchNorm` and
                :func:`jaxbn.batch_norm` for bad input, and for the options
                refused above.
        """
        use_running_average = nn.merge_param(
            "use_running_average", self.use_running_average, use_running_average
        )
        _check_flax_only_options(self)
        _checks.check_x(x)
        x = jnp.asarray(x)
        feat = _checks.feature_axes(x.ndim, self.axis)
        fshape = tuple(x.shape[a] for a in feat)
        params = {}
        if self.use_scale:
            params["scale"] = self.param("scale", self.scale_init, fshape, self.param_dtype)
        if self.use_bias:
            params["bias"] = self.param("bias", self.bias_init, fshape, self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, fshape, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, fshape, jnp.float32)
        state = {"mean": ra_mean.value, "var": ra_var.value}
        # Flax's output dtype: the one given, or the promotion of x's and the params'.
        dtype = promote(x, *params.values()) if self.dtype is None else self.dtype
        training = not use_running_average
        # As in Flax, initialization in training mode leaves the running statistics
        # at their initial values and uses no axis_name. On a single example (a
        # common dummy input) it must work too: with one value per feature, x - mean
        # is 0 and the output is ``bias``, which evaluation mode with x itself as
        # the mean gives exactly.
        initializing = training and self.is_initializing()
        if initializing and math.prod(x.shape) <= math.prod(fshape):
            reduced = tuple(a for a in range(x.ndim) if a not in feat)
            state["mean"] = jnp.squeeze(x, reduced).astype(jnp.float32)
            training = False
        axis_name = None if initializing else self.axis_name
        options = {"mask": mask, "dtype": dtype, "axis_name": axis_name}
        y, new_state = flax_apply(self, fshape, params, state, x, training=training, **options)
        if training and not initializing:
            ra_mean.value = new_state["mean"]
            ra_var.value = new_state["var"]
        return y

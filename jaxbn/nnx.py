"""``flax.nnx`` adapter: a drop-in ``BatchNorm`` computed by jaxbn.

Needs flax (``pip install "jaxbn[flax]"``); ``import jaxbn`` never imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks
from jaxbn._frameworks import (
    as_tuple,
    check_axis_index_groups,
    flax_apply,
    flax_layer,
    promote,
    require,
)

nnx = require("flax.nnx", adapter="jaxbn.nnx", extra="flax")
_promote_dtype = require("flax.nnx.nn.dtypes", adapter="jaxbn.nnx", extra="flax").promote_dtype

__all__ = ["BatchNorm"]

# Flax's default initializers, made once.
_ZEROS = nnx.initializers.zeros_init()
_ONES = nnx.initializers.ones_init()


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` computed by jaxbn: swap the import, keep the model.

    A subclass of ``flax.nnx.BatchNorm``, so code that selects batch-norm
    layers by type (``isinstance`` over ``nnx.iter_graph(model)``, to freeze
    them, say) finds it. Same constructor, call, attributes (``scale``,
    ``bias``: ``nnx.Param``; ``mean``, ``var``: ``nnx.BatchStat``, float32),
    ``set_view`` (inherited) and random-key use as
    ``flax.nnx.BatchNorm``, so ``nnx.state(model, nnx.BatchStat)``,
    ``nnx.Optimizer``, ``nnx.jit``, ``nnx.grad``, ``model.train()`` /
    ``model.eval()``, ``nnx.view`` and ``nnx.split`` / ``nnx.merge`` work as
    with Flax's, and a model that swaps it in initializes to the same values.
    Training normalizes with :func:`jaxbn.batch_norm` (the hand-written
    backward), evaluation with :func:`jaxbn.batch_norm_inference`, through
    :meth:`jaxbn.BatchNorm.apply`. Flax's dtype rule is kept: the output is
    ``dtype``, or with ``dtype=None`` the promotion of the input's, the params'
    and the statistics' dtypes (bfloat16 ``x`` gives float32 ``y``); the
    promotion is computed explicitly, so the module also works under
    ``jax_numpy_dtype_promotion="strict"``. A custom ``promote_dtype`` is
    applied as Flax applies it, to ``x`` and the four variables before
    normalizing (the running statistics are updated from the variables
    themselves, as Flax does); the output dtype is then ``dtype`` or the
    promotion of the promoted ``x``, ``scale`` and ``bias``.

    jaxbn's options come as extra keyword arguments: ``momentum=None``
    (cumulative average; adds a ``count`` batch statistic),
    ``unbiased_running_var``, ``virtual_batch_size`` (ghost batch norm),
    ``renorm``, ``renorm_clipping``, ``renorm_momentum`` (batch
    renormalization; adds ``renorm_mean`` and ``renorm_var``). Without them the
    module holds no variables beyond Flax's four.

    Where it deliberately differs from ``flax.nnx.BatchNorm``:

    - the variance is always the accurate, shifted one: ``use_fast_variance``
      is accepted and has no effect;
    - with ``dtype`` set, the statistics, scale and bias stay in float32
      (Flax casts them to ``dtype`` first, so with ``dtype=bfloat16`` it
      subtracts a running mean rounded to bfloat16);
    - ``axis_index_groups`` is refused;
    - training on a single value per feature raises (Flax returns ``bias``);
      a mask that keeps nothing leaves the running statistics unchanged (Flax
      writes NaN); a non-boolean mask is refused.

    Args:
        num_features: size of the feature axis (a tuple of sizes with a tuple
            ``axis``).
        use_running_average: ``True``: normalize with the running statistics;
            ``False``: with the batch's, updating the running ones. The call
            argument, when given, takes precedence.
        axis: feature axis (or tuple of axes).
        momentum: weight of the old running statistics (``None``: cumulative);
            a Python or NumPy real number.
        epsilon: positive constant added to the variance (Python or NumPy).
        dtype: output dtype; ``None`` promotes as Flax does.
        param_dtype: dtype of ``scale`` and ``bias``.
        use_bias: learn ``bias``.
        use_scale: learn ``scale``.
        bias_init: initializer of ``bias``.
        scale_init: initializer of ``scale``.
        axis_name: named axis (or tuple) to average the statistics over.
        axis_index_groups: must be ``None``.
        use_fast_variance: accepted for compatibility; no effect.
        promote_dtype: Flax's ``promote_dtype(args, *, dtype)``; with Flax's
            default, jaxbn's rule above.
        rngs: ``nnx.Rngs``; one ``params`` key is drawn for each of ``scale``
            and ``bias``, as Flax does.
        bias_metadata: metadata of the ``bias`` ``nnx.Param``.
        scale_metadata: metadata of the ``scale`` ``nnx.Param``.
        **options: jaxbn's options above.

    Raises:
        ValueError, TypeError: for arguments :class:`jaxbn.BatchNorm` refuses
            (feature count, axis, epsilon, momentum, dtypes, options) and the
            Flax options refused above.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jaxbn import nnx as bnx
        >>> bn = bnx.BatchNorm(2, momentum=0.9, rngs=nnx.Rngs(0))
        >>> y = bn(jnp.array([[1.0, 10.0], [3.0, 30.0]]))
        >>> bn.mean[...]
        Array([0.2, 2. ], dtype=float32)
        >>> bn.eval()
        >>> bn(jnp.zeros((1, 2))).shape
        (1, 2)
    """

    def __init__(
        self,
        num_features: int | tuple[int, ...],
        *,
        use_running_average: bool | None = False,
        axis: int | tuple[int, ...] = -1,
        momentum: float | None = 0.99,
        epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        use_bias: bool = True,
        use_scale: bool = True,
        bias_init: Any = _ZEROS,
        scale_init: Any = _ONES,
        axis_name: str | tuple[str, ...] | None = None,
        axis_index_groups: Any = None,
        use_fast_variance: bool = True,
        promote_dtype: Any = _promote_dtype,
        rngs: Any,
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        scale_metadata: Mapping[str, Any] = MappingProxyType({}),
        **options: Any,
    ):
        check_axis_index_groups(axis_index_groups)
        if not callable(promote_dtype):
            raise TypeError(f"promote_dtype must be callable, got {promote_dtype!r}")
        self.num_features = num_features
        self.use_running_average = use_running_average
        self.axis = as_tuple(axis)
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.use_bias = use_bias
        self.use_scale = use_scale
        self.axis_name = axis_name
        self.axis_index_groups = axis_index_groups
        self.use_fast_variance = use_fast_variance
        self.promote_dtype = promote_dtype
        self.options = tuple(sorted(options.items()))  # static and hashable
        layer = flax_layer(self, num_features, **options)  # every check of jaxbn.BatchNorm, now
        shape = layer.feature_shape
        _, state = layer.init()  # with jaxbn's options' statistics ("count", "renorm_mean", ...)
        state.update(mean=jnp.zeros(shape, jnp.float32), var=jnp.ones(shape, jnp.float32))
        for name, value in state.items():
            setattr(self, name, nnx.BatchStat(value))
        # Flax draws one params key for each, in this order: models that swap this
        # module in keep the random streams of the layers after it.
        if use_scale:
            scale = scale_init(rngs.params(), shape, param_dtype)
            self.scale = nnx.Param(scale, **scale_metadata)
        else:
            self.scale = nnx.data(None)
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
        else:
            self.bias = nnx.data(None)

    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        """Normalizes ``x``, updating the batch statistics when training.

        Args:
            x: ``[..., features]`` input.
            use_running_average: overrides the attribute when given.
            mask: boolean, broadcastable to ``x``; only ``True`` positions enter
                the statistics (ignored when using the running average).

        Returns:
            The normalized ``x``, shaped like ``x``, in Flax's output dtype.

        Raises:
            ValueError: if neither ``use_running_average`` is set; for bad input
                as :func:`jaxbn.batch_norm`.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError(
                "no use_running_average was given: set it in the constructor, at call "
                "time, or with model.train() / model.eval()"
            )
        _checks.check_x(x)
        x = jnp.asarray(x)
        scale, bias = (None if v is None else v[...] for v in (self.scale, self.bias))
        # Flax's mean and var, and those of jaxbn's options ("count", ...).
        stats = {n: v for n, v in vars(self).items() if isinstance(v, nnx.BatchStat)}
        state = {n: v[...] for n, v in stats.items()}
        mean, var = state["mean"], state["var"]
        if self.promote_dtype is _promote_dtype:
            # Flax casts x and the four variables to their promotion (or to dtype)
            # before normalizing. jaxbn computes in float32 or wider whatever they
            # are and takes only the output dtype from it: nothing is rounded to
            # dtype first.
            promoted = (x, mean, var, scale, bias)
        else:
            x, mean, var, scale, bias = self.promote_dtype(
                (x, mean, var, scale, bias), dtype=self.dtype
            )
            promoted = (x, scale, bias)  # as Flax's output dtype, the statistics left out
        params = {k: v for k, v in (("scale", scale), ("bias", bias)) if v is not None}
        if use_running_average:
            # Normalized with the (promoted) variables; in training the running
            # statistics are updated from the variables themselves, as Flax does.
            state.update(mean=mean, var=var)
        dtype = promote(*promoted) if self.dtype is None else self.dtype
        training = not use_running_average
        options = {"mask": mask, "dtype": dtype, **dict(self.options)}
        y, new_state = flax_apply(
            self, self.num_features, params, state, x, training=training, **options
        )
        if training:
            for name, value in new_state.items():
                stats[name][...] = value
        return y

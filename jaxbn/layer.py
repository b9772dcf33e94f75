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

from jaxbn import _checks, _core
from jaxbn._checks import AxisName
from jaxbn.act import (
    ACTIVATIONS,
    INVERTIBLE_ACTIVATIONS,
    activate,
    batch_norm_act,
    check_activation,
    effective_scale,
)
from jaxbn.ops import batch_norm, batch_norm_inference, batch_stats

__all__ = ["BatchNorm"]

Params = dict[str, jax.Array]
State = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class BatchNorm:
    r"""Batch normalization layer (Ioffe & Szegedy, 2015) as a hashable config.

    Training normalizes with the batch statistics and updates the running ones:

    .. math::

        \hat\mu \leftarrow m \hat\mu + (1 - m) \mu_B, \qquad
        \hat\sigma^2 \leftarrow m \hat\sigma^2 + (1 - m) \sigma_B^2

    (Flax's convention, with ``m = momentum``). PyTorch's ``momentum`` weighs the
    new value instead: PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here
    (``m = 1 - m_torch``; :meth:`like_torch` does the translation). Evaluation
    normalizes with the running statistics.

    Attributes:
        num_features: size of the feature axis (an int), or the sizes of the
            feature axes (a tuple) when ``axis`` is a tuple, in the order of the
            axes sorted (as Flax's params are laid out): ``axis=(3, 1)`` on
            ``[N, C, H, W]`` takes ``(C, W)``.
        axis: feature axis or axes of the input (``-1`` for ``[N, C]`` and NHWC,
            ``1`` for NCHW).
        momentum: weight of the old running statistics, in ``[0, 1]``; ``None``
            for a cumulative moving average (PyTorch's ``momentum=None``): the
            state then counts the batches seen in ``state["count"]``.
        eps: positive constant added to the variance.
        use_scale: learn a per-feature ``scale`` (``gamma``).
        use_bias: learn a per-feature ``bias`` (``beta``).
        axis_name: named mapped axis (or tuple) to synchronize statistics over
            inside ``shard_map``/``pmap``.
        dtype: dtype of ``y``; ``None`` keeps the input's. Computation is in
            float32 (or wider) whatever the input and output dtypes.
        param_dtype: dtype of ``params``; the state is kept in it promoted to at
            least float32.
        unbiased_running_var: update the running variance with the unbiased
            batch variance ``var * n / (n - 1)`` (PyTorch's behaviour); the
            batch is still normalized with the biased one.
        virtual_batch_size: ghost batch norm (Hoffer et al., 2017): split the
            batch (axis 0) into groups of this many examples, each normalized
            with its own statistics; the running statistics average the groups'
            (weighted by their kept counts under a mask; with
            ``unbiased_running_var`` the ``n / (n - 1)`` correction uses the
            average group count).
        renorm: batch renormalization (Ioffe, 2017): in training,
            ``y = ((x - mean_B) / std_B * r + d) * scale + bias`` with ``r`` and
            ``d`` from the renorm running statistics, clipped, and held constant
            in the backward pass.
        renorm_clipping: ``(rmax, dmax)``: ``r`` is clipped to
            ``[1 / rmax, rmax]`` and ``d`` to ``[-dmax, dmax]``. ``apply`` takes
            an override, so a caller can schedule them per step.
        renorm_momentum: momentum of the running statistics that ``r`` and ``d``
            are computed from (``state["renorm_mean"]``, ``state["renorm_var"]``).
        debias: zero-debiased running averages: the average of the batch
            statistics with weights ``(1 - m) m^(t - i)`` over the ``t`` updates
            so far, divided by ``1 - m^t`` (the hidden average starting at zero,
            corrected for its bias toward zero), so it is exactly the batch
            statistics after one step and tends to the plain average as
            ``m^t -> 0``. ``state["count"]`` counts the updates; ``state["mean"]``
            and ``state["var"]`` hold the debiased values themselves (what
            evaluation, folding and converters read), updated directly in that
            form. Before any update (``count == 0``) they are the initial mean 0
            and variance 1, as without ``debias``. Needs ``momentum < 1``; the
            renorm statistics are not debiased.
        frozen: training mode normalizes with the running statistics (as
            evaluation does) and leaves the state unchanged, so gradients flow
            through the fixed per-feature affine map only (fine-tuning with
            small batches). Not with ``renorm`` or ``virtual_batch_size``
            (both are ways of using batch statistics).
        activation: ``None``, or the name of an activation applied after the
            normalization (a key of :data:`jaxbn.act.ACTIVATIONS`). An invertible
            one (``"leaky_relu"``, ``"elu"``, ``"identity"``) is fused with it:
            training runs :func:`jaxbn.batch_norm_act`, which keeps only the
            output for the backward, and the layer's scale is then
            ``|scale| + eps`` in training and evaluation alike
            (:func:`jaxbn.act.effective_scale`). Others are applied after
            :func:`jaxbn.batch_norm`. Not combined with ``renorm``.
        negative_slope: the slope of ``"leaky_relu"`` below zero (finite, > 0).

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
    momentum: float | None = 0.99
    eps: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    axis_name: AxisName = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    unbiased_running_var: bool = False
    virtual_batch_size: int | None = None
    renorm: bool = False
    renorm_clipping: tuple[float, float] = (3.0, 5.0)
    renorm_momentum: float = 0.99
    debias: bool = False
    frozen: bool = False
    activation: str | None = None
    negative_slope: float = 0.01

    def __post_init__(self):
        if isinstance(self.axis, list) or isinstance(self.num_features, list):
            raise TypeError("axis and num_features must be ints or tuples, not lists")
        for size in self.feature_shape:
            _checks.check_positive_int("num_features", size)
        naxes = 1 if isinstance(self.axis, (int, np.integer)) else len(self.axis)
        if naxes != len(self.feature_shape):
            raise ValueError(
                f"num_features {self.num_features!r} must give one size per feature "
                f"axis in axis={self.axis!r}"
            )
        if self.momentum is not None:
            _check_fraction("momentum", self.momentum)
        _check_fraction("renorm_momentum", self.renorm_momentum)
        # The compute dtype is known in apply (which checks eps against it too).
        _checks.check_eps(self.eps, jnp.float64)
        _checks.check_axis_name(self.axis_name)
        _check_floating("param_dtype", self.param_dtype)
        if self.dtype is not None:
            _check_floating("dtype", self.dtype, "floating or None")
        _checks.check_positive_int(
            "virtual_batch_size", self.virtual_batch_size, minimum=2, or_none=True
        )
        _check_clipping(self.renorm_clipping)
        _checks.check_bool("debias", self.debias)
        _checks.check_bool("frozen", self.frozen)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be None or one of {sorted(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.fused:
            check_activation(self.activation, self.negative_slope)
        self._check_combinations()
        _checks.check_hashable_fields(self)

    def _check_combinations(self):
        """Refuses options that contradict each other; each message says why."""
        ghost = self.virtual_batch_size is not None
        for bad, message in (
            (
                ghost and (self.renorm or self.axis_name is not None),
                "virtual_batch_size cannot be combined with renorm or axis_name "
                f"(got renorm={self.renorm!r}, axis_name={self.axis_name!r})",
            ),
            (
                self.debias and (self.momentum is None or self.momentum == 1.0),
                f"debias=True needs a momentum < 1, got momentum={self.momentum!r}: "
                "momentum=None is a cumulative average, which has no bias toward its "
                "initial value to correct, and with momentum=1 the running average is "
                "never updated (its debiased value 0 / (1 - 1) is undefined)",
            ),
            (
                self.frozen and (self.renorm or ghost),
                "frozen=True normalizes with the running statistics and cannot be combined "
                "with renorm or virtual_batch_size, which normalize with batch statistics "
                f"(got renorm={self.renorm!r}, virtual_batch_size={self.virtual_batch_size!r})",
            ),
            (
                self.fused and self.renorm,
                f"activation={self.activation!r} (fused with batch norm) cannot be "
                "combined with renorm=True",
            ),
        ):
            if bad:
                raise ValueError(message)

    @property
    def fused(self) -> bool:
        """Whether training runs :func:`jaxbn.batch_norm_act` (an invertible activation)."""
        return self.activation in INVERTIBLE_ACTIVATIONS

    @classmethod
    def like_torch(
        cls, num_features: int, *, momentum: float | None = 0.1, eps: float = 1e-5, **kwargs
    ) -> BatchNorm:
        """A layer with PyTorch's conventions: ``torch.nn.BatchNorm{1,2,3}d`` defaults.

        Feature axis 1 (``[N, C]``, ``[N, C, L]``, NCHW), ``momentum`` weighing the
        new value (``None``: cumulative average), unbiased running variance.

        Args:
            num_features: number of channels ``C``.
            momentum: PyTorch's momentum (translated to ``1 - momentum``).
            eps: PyTorch's ``eps``.
            **kwargs: any other :class:`BatchNorm` field.
        """
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum (PyTorch's) must be in [0, 1] or None, got {momentum!r}")
        kwargs.setdefault("axis", 1)
        kwargs.setdefault("unbiased_running_var", True)
        return cls(
            num_features, momentum=None if momentum is None else 1.0 - momentum, eps=eps, **kwargs
        )

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of every per-feature array: params and statistics."""
        n = self.num_features
        return tuple(n) if isinstance(n, (tuple, list)) else (n,)

    def init(self, dtype: Any = None) -> tuple[Params, State]:
        """Returns ``(params, state)``: ``{"scale": 1, "bias": 0}``, ``{"mean": 0, "var": 1}``.

        Needs no mode and no named axis. ``scale``/``bias`` are left out of
        ``params`` when ``use_scale``/``use_bias`` is off. The state also holds
        ``"count"`` (batches seen) with ``momentum=None`` or ``debias``, and
        ``"renorm_mean"``/``"renorm_var"`` with ``renorm=True``.

        Args:
            dtype: dtype of the params; defaults to ``param_dtype``. The state
                is kept in this dtype promoted to at least float32: a running
                average in bfloat16 loses its ``(1 - momentum)`` updates to
                rounding (at momentum 0.99 the running variance of unit-variance
                data stays near its initial 1).
        """
        dtype = self.param_dtype if dtype is None else dtype
        _check_floating("dtype", dtype, "floating (the params' dtype)")
        state_dtype = _checks.compute_dtype(dtype)
        shape = self.feature_shape
        params = {}
        if self.use_scale:
            params["scale"] = jnp.ones(shape, dtype)
        if self.use_bias:
            params["bias"] = jnp.zeros(shape, dtype)
        state = {"mean": jnp.zeros(shape, state_dtype), "var": jnp.ones(shape, state_dtype)}
        if self.momentum is None or self.debias:
            state["count"] = jnp.zeros((), jnp.int32)
        if self.renorm:
            state["renorm_mean"] = jnp.zeros(shape, state_dtype)
            state["renorm_var"] = jnp.ones(shape, state_dtype)
        return params, state

    def apply(
        self,
        params: Params,
        state: State,
        x: ArrayLike,
        *,
        training: bool,
        mask: ArrayLike | None = None,
        renorm_clipping: tuple[ArrayLike, ArrayLike] | None = None,
    ) -> tuple[jax.Array, State]:
        """Normalizes ``x``; returns ``(y, new_state)``.

        Args:
            params: from :meth:`init` (``"scale"``, ``"bias"``).
            state: running statistics from :meth:`init` or a previous ``apply``.
            x: ``[..., features]`` input.
            training: ``True``: batch statistics, and the running averages are
                updated; ``False``: running statistics, state returned as is.
                A ``frozen`` layer does in training what it does in evaluation.
            mask: boolean (training only): only ``True`` entries count in the
                statistics; the layouts of :func:`jaxbn.batch_norm` (``x``'s rank
                and broadcastable to ``x`` as in Flax, or one axis per reduction
                axis). Where it varies along the feature axes, each feature has
                its own count (in the statistics, the running averages and the
                unbiased correction); not with ``debias`` or ``momentum=None``,
                whose state counts updates per layer (``ValueError``). A mask
                keeping nothing of a feature leaves that feature's running
                statistics unchanged.
            renorm_clipping: ``(rmax, dmax)`` for this step (scalars, may be
                traced), overriding the config's; only with ``renorm=True``.

        Returns:
            ``(y, new_state)``: ``y`` like ``x`` (in ``dtype`` if set);
            ``new_state`` like ``state``. No gradient flows into ``new_state``.
        """
        x, feat, mask = self._check_apply(params, state, x, training, mask, renorm_clipping)
        out_dtype = x.dtype if self.dtype is None else jnp.dtype(self.dtype)
        # A wider output dtype than the input: convert first (exact), normalize there.
        x = x.astype(np.promote_types(x.dtype, out_dtype))
        scale, bias = params.get("scale"), params.get("bias")
        # The state is an input of the update, never differentiated.
        old = jax.lax.stop_gradient(state)
        if not training or self.frozen:
            if self.fused:
                scale = effective_scale(scale, eps=self.eps)
            y = batch_norm_inference(
                x, scale, bias, old["mean"], old["var"], axis=self.axis, eps=self.eps
            )
            return self._activate(y).astype(out_dtype), old

        new_state = dict(old)
        if self.virtual_batch_size is not None:
            y, count, mean, var = self._ghost(x, scale, bias, feat, mask)
        else:
            if self.renorm:
                scale, bias, renorm_state = self._renorm_affine(
                    x, scale, bias, old, mask, renorm_clipping
                )
                new_state.update(renorm_state)
            y, mean, var = self._normalize(x, scale, bias, mask, self.axis_name)
            count = self._count(x.shape, feat, mask)
        if not self.fused:
            y = self._activate(y)
        new_state.update(self._running_update(old, count, mean, var))
        if mask is not None:
            # An all-masked batch (or feature) has no statistics: keep the old ones.
            kept = count > 0
            new_state = {
                k: jnp.where(kept if jnp.ndim(v) else jnp.any(kept), v, old[k])
                for k, v in new_state.items()
            }
        return y.astype(out_dtype), new_state

    def _check_apply(self, params, state, x, training, mask, renorm_clipping):
        """Checks :meth:`apply`'s arguments while tracing.

        Returns:
            ``(x, feature_axes, mask)``: ``x`` as an array, its sorted feature
            axes, and the mask at ``x``'s rank (:func:`jaxbn._checks.check_mask`),
            the form the code below and the op take.
        """
        _checks.check_training(training)
        _checks.check_x(x)
        x = jnp.asarray(x)
        feat = _checks.feature_axes(x.ndim, self.axis)
        got = tuple(x.shape[a] for a in feat)
        if got != self.feature_shape:
            order = "" if len(feat) == 1 else f" (the sizes of axes {feat}, in that order)"
            raise ValueError(
                f"x has {got} features on axis {self.axis!r}{order} (shape {x.shape}), "
                f"but the layer was built with num_features={self.num_features!r}"
            )
        if renorm_clipping is not None and not self.renorm:
            raise ValueError("renorm_clipping was given, but the layer has renorm=False")
        if renorm_clipping is not None:
            _check_clipping(renorm_clipping)
        if mask is not None and not training:
            raise ValueError(
                "mask is only used in training (batch statistics); got a mask with training=False"
            )
        self._check_variables(params, state)
        if training and self.virtual_batch_size is not None:
            self._check_ghost(x.shape, feat)
        # Checked also when frozen, which takes no statistics.
        mask = _checks.check_mask(mask, x.shape, feat)
        counted = self.debias or self.momentum is None
        if counted and mask is not None and any(mask.shape[a] > 1 for a in feat):
            raise ValueError(
                f"mask varies along the feature axes {feat} (shape {mask.shape} at x's "
                f"rank), which gives each feature its own count of updates; with "
                f"{'debias=True' if self.debias else 'momentum=None'} the state counts "
                f"updates per layer: use a mask over the batch axes only"
            )
        return x, feat, mask

    def _check_variables(self, params, state):
        """Checks the keys and shapes of ``params`` and ``state``: those :meth:`init` makes."""
        # Under jit the arrays init makes are unused constants, dropped by XLA.
        trees = (("params", params), ("state", state))
        for (tree_name, tree), initial in zip(trees, self.init(), strict=True):
            _checks.check_keys(tree_name, tree, tuple(initial), tuple(initial))
            for key, v in tree.items():
                if key != "count":
                    _checks.check_feature_vector(f'{tree_name}["{key}"]', v, self.feature_shape)
        if "count" in state:
            count = state["count"]
            if jnp.shape(count) != () or not jnp.issubdtype(jnp.result_type(count), jnp.integer):
                raise ValueError(
                    f'state["count"] must be an integer scalar (batches seen), got shape '
                    f"{jnp.shape(count)} and dtype {jnp.result_type(count)}"
                )

    def _check_ghost(self, x_shape, feat):
        """Checks that ``x``'s axis 0 splits into groups of ``virtual_batch_size``."""
        k = self.virtual_batch_size
        if 0 in feat:
            raise ValueError(
                f"virtual_batch_size needs axis 0 as the batch axis, got axis={self.axis!r}"
            )
        if x_shape[0] % k:
            raise ValueError(
                f"batch size {x_shape[0]} (axis 0 of x) is not divisible by virtual_batch_size={k}"
            )

    def _normalize(self, x, scale, bias, mask, axis_name):
        """The training op: :func:`batch_norm_act` when fused, else :func:`batch_norm`."""
        kwargs = {"axis": self.axis, "eps": self.eps, "axis_name": axis_name, "mask": mask}
        if self.fused:
            kwargs.update(activation=self.activation, negative_slope=self.negative_slope)
            return batch_norm_act(x, scale, bias, **kwargs)
        return batch_norm(x, scale, bias, **kwargs)

    def _activate(self, y):
        """The activation (unfused), or ``y`` as it is without one."""
        if self.activation is None:
            return y
        return activate(y, self.activation, negative_slope=self.negative_slope)

    def _count(self, x_shape, feat, mask):
        """Values per feature in the batch statistics, over the named axes too.

        A scalar, or one count per feature where the mask varies along the
        feature axes.
        """
        n = _checks.feature_counts(mask, x_shape, feat, dtype=jnp.float32)
        if mask is not None:
            n = jnp.reshape(n, ()) if n.size == 1 else jnp.broadcast_to(n, self.feature_shape)
        return n if self.axis_name is None else jax.lax.psum(n, self.axis_name)

    def _running_update(self, old, count, mean, var):
        """New running statistics from the batch's (no gradient flows)."""
        mean, var = jax.lax.stop_gradient((mean, var))
        if self.unbiased_running_var:
            var = var * count / jnp.maximum(count - 1.0, 1.0)
        new, t = {}, None
        if self.momentum is None or self.debias:
            t = new["count"] = _core.next_count(old["count"])
        for name, batch in (("mean", mean), ("var", var)):
            new[name] = moving_average(old[name], batch, self.momentum, t)
        return new

    def _ghost(self, x, scale, bias, feat, mask):
        """Ghost batch norm: groups of ``virtual_batch_size`` examples along axis 0.

        The op is mapped over the groups with ``vmap`` (its custom VJP included);
        the running statistics get the groups' statistics averaged, weighted by
        their counts, and the count of an average group.
        """
        g = x.shape[0] // self.virtual_batch_size

        def groups(a):
            return a.reshape(g, -1, *a.shape[1:])

        def normalize(xi, mi):
            return self._normalize(xi, scale, bias, mi, None)

        if mask is None:
            y, mean, var = jax.vmap(normalize, (0, None))(groups(x), None)
            weights = jnp.ones((g,), jnp.float32)
        else:
            # Split into groups like x: per-group (and per-feature) counts.
            mg = groups(_checks.mask_over_batch(mask, x.shape, feat))
            y, mean, var = jax.vmap(normalize)(groups(x), mg)
            red_g = (1, *(a + 1 for a in range(1, x.ndim) if a not in feat))
            weights = jnp.sum(mg, axis=red_g, dtype=jnp.float32)  # [g, *mask's features]
        w = weights / jnp.maximum(jnp.sum(weights, axis=0), 1.0)
        w = jnp.reshape(w, w.shape + (1,) * (mean.ndim - w.ndim))
        count = self._count(x.shape, feat, mask) / g
        return y.reshape(x.shape), count, jnp.sum(w * mean, 0), jnp.sum(w * var, 0)

    def _renorm_affine(self, x, scale, bias, old, mask, clipping):
        """Folds batch renormalization's ``r`` and ``d`` into the op's scale and bias.

        ``((x - mean_B) / std_B * r + d) * scale + bias`` is batch norm with scale
        ``scale * r`` and bias ``bias + scale * d``; ``r`` and ``d`` are constants
        of the backward pass (stop-gradient), so the op's hand-written backward
        handles ``x`` and autodiff the per-feature products for ``scale``/``bias``.
        """
        rmax, dmax = self.renorm_clipping if clipping is None else clipping
        _, mean_b, var_b = batch_stats(x, axis=self.axis, axis_name=self.axis_name, mask=mask)
        mean_b, var_b = jax.lax.stop_gradient((mean_b, var_b))
        run_std = jnp.sqrt(old["renorm_var"].astype(var_b.dtype) + self.eps)
        r = jnp.clip(jnp.sqrt(var_b + self.eps) / run_std, 1.0 / rmax, rmax)
        d = jnp.clip((mean_b - old["renorm_mean"]) / run_std, -dmax, dmax)
        s = 1.0 if scale is None else scale
        new_bias = s * d if bias is None else bias + s * d
        renorm_state = {}
        for name, batch in (("renorm_mean", mean_b), ("renorm_var", var_b)):
            # The batch statistic is rounded to the state's dtype before averaging.
            batch = batch.astype(old[name].dtype)
            renorm_state[name] = moving_average(old[name], batch, self.renorm_momentum)
        return s * r, new_bias, renorm_state


def moving_average(old, batch, momentum, count=None):
    r"""One update of a running average, ``keep * old + (1 - keep) * batch``, in ``old``'s dtype.

    Without ``count``, ``keep = momentum``. With ``count``, the number of
    updates so far (this one included):

    - ``momentum=None``: the cumulative average, ``batch`` weighing ``1 / count``;
    - otherwise the zero-debiased average: ``old`` and the result are
      :func:`debiased` values ``a_t = h_t / (1 - m^t)`` of a hidden average
      ``h_t = m h_{t-1} + (1 - m) b_t`` started at ``h_0 = 0``, updated directly
      in that form: ``keep = m (1 - m^{t-1}) / (1 - m^t)``, exactly 0 at
      ``t = 1`` (the first average is the batch's own).

    Computed in the wider of the two dtypes (a bfloat16 state, float32 batch
    statistics), promoted explicitly so that it holds under strict promotion.
    """
    if count is None:
        keep, take = momentum, 1.0 - momentum
    elif momentum is None:
        take = 1.0 / count.astype(jnp.float32)
        keep = 1.0 - take
    else:
        m, t = jnp.float32(momentum), count.astype(jnp.float32)
        keep = m * (1.0 - m ** (t - 1.0)) / (1.0 - m**t)
        take = 1.0 - keep
    dtype = np.promote_types(old.dtype, batch.dtype)
    return (keep * old.astype(dtype) + take * batch.astype(dtype)).astype(old.dtype)


def debiased(hidden, momentum, count, initial):
    """The zero-debiased value ``hidden / (1 - momentum**count)`` of a hidden average.

    ``hidden`` is a moving average started at zero and updated ``count``
    times; ``initial`` is returned before any update (``count == 0``). The
    division is computed in ``hidden``'s dtype promoted to at least float32.
    """
    dtype = _checks.compute_dtype(hidden.dtype)
    correction = 1.0 - momentum ** count.astype(dtype)
    return jnp.where(count > 0, hidden.astype(dtype) / correction, initial)


def _check_fraction(name, value):
    """Raises ``ValueError`` unless ``value`` is a real number in ``[0, 1]`` (not a bool)."""
    real = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not real or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _check_floating(name, dtype, expected="floating"):
    """Raises ``TypeError`` unless ``dtype`` is a floating-point dtype."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be {expected}, got {dtype!r}")


def _check_clipping(clipping):
    """Checks ``(rmax, dmax)``: real scalars; ``rmax >= 1``, ``dmax >= 0`` where concrete."""
    try:
        rmax, dmax = clipping
    except (TypeError, ValueError):
        raise TypeError(f"renorm_clipping must be a pair (rmax, dmax), got {clipping!r}") from None
    for name, v in (("rmax", rmax), ("dmax", dmax)):
        if isinstance(v, (bool, np.bool_)) or not (
            isinstance(v, (int, float, np.integer, np.floating))
            or (hasattr(v, "dtype") and jnp.issubdtype(v.dtype, jnp.number))
        ):
            raise TypeError(
                f"renorm_clipping must hold two real numbers (rmax, dmax), got {name}={v!r}"
            )
        if jnp.ndim(v) != 0:
            raise ValueError(
                f"renorm_clipping must hold two scalars (rmax, dmax), got {name} of shape "
                f"{jnp.shape(v)}"
            )
    if any(isinstance(v, jax.core.Tracer) for v in (rmax, dmax)):
        return  # values known only at run time (a schedule inside jit)
    if not float(rmax) >= 1.0 or not float(dmax) >= 0.0:
        raise ValueError(f"renorm_clipping needs rmax >= 1 and dmax >= 0, got {clipping!r}")

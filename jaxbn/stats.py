r"""Population statistics for evaluation, recomputed after training ("precise" batch norm).

The running averages a batch-norm layer evaluates with are an exponential average of
batch statistics taken while the weights kept changing; with a large momentum or a
short schedule they lag behind the final network. :func:`precise_stats` runs the
trained network in training mode over batches of inputs, with the params fixed, and
replaces every batch-norm layer's ``mean`` and ``var`` with the statistics of
everything that layer saw: the count-weighted mean of the batch means, and the
pooled variance (the within-batch variances plus the spread of the batch means).
With batch :math:`b` of weight :math:`w_b` (its examples), mean :math:`\mu_b` and
variance :math:`\sigma_b^2`:

.. math::

    n = \sum_b w_b, \quad
    \mu = \sum_b \frac{w_b}{n} \mu_b, \quad
    \sigma^2 = \sum_b \frac{w_b}{n} \left(\sigma_b^2 + (\mu_b - \mu)^2\right).

The spread is taken about :math:`\mu`, never as :math:`E[\mu_b^2] - \mu^2`, so it
stays accurate when the mean is large against the std. For the first layer the
result is exactly the mean and (biased) variance over all the examples at once.
This is "PreciseBN" (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021); the
later layers see the inputs the final network gives them.

What :func:`precise_stats` needs of a model (``jaxbn.MLP`` and ``jaxbn.BatchNorm``
itself qualify, as does any network config built the same way):

- ``model.apply(params, state, x, *, training)`` returning ``(output, new_state)``,
  with an optional ``mask=`` keyword;
- the model is a hashable dataclass with a ``momentum`` field handed to every
  batch-norm layer. It is evaluated as ``dataclasses.replace(model, momentum=0.0)``,
  whose training-mode ``new_state`` holds each layer's batch statistics (with
  ``momentum=None``, a cumulative average, the layers' counts are set to 0 instead,
  which has the same effect). It runs on one device: an ``axis_name`` field is set
  to ``None`` (the statistics are those of the whole batches given);
- each batch-norm layer's state is a dict with ``"mean"`` and ``"var"`` (the layout
  of :meth:`jaxbn.BatchNorm.init`), anywhere in the state tree: those dicts are the
  ones updated; every other entry is returned as it was;
- each example contributes the same number of values per feature to a given layer
  in every batch (batches are weighed by their number of examples).

Layers with ``frozen=True`` keep their statistics (their state does not change in
training mode). With ghost batch norm a batch's variance is the one the layer
records (its groups' average). A model with ``unbiased_running_var`` is supported
when it is a :class:`jaxbn.BatchNorm` (the ``n / (n - 1)`` correction then uses
the total count); other models with it are refused.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks
from jaxbn._model import batch_norm_layers
from jaxbn.data import batch_indices, check_batch_size
from jaxbn.layer import BatchNorm

__all__ = ["precise_stats", "precise_stats_from_data"]

_HINT = (
    "batches is an iterable of input batches: a stacked array "
    "[num_batches, batch, ...], a list of arrays, or pairs (x, mask)"
)


def check_model(model: Any, state: Any) -> Any:
    """Refuses a model or state :func:`precise_stats` cannot update; else its probe.

    The probe is the model whose training-mode ``new_state`` holds each layer's
    batch statistics: momentum 0, on one device, with the population variance.
    Needs no data, so :func:`jaxbn.train.fit` calls it before training.
    """
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else ()
    if "momentum" not in fields:
        raise TypeError(
            f"model must be a dataclass config with a `momentum` field handed to its "
            f"batch-norm layers (as jaxbn.MLP and jaxbn.BatchNorm), got "
            f"{type(model).__name__}"
        )
    try:
        hash(model)  # a static argument of the compiled statistics
    except TypeError:
        raise TypeError(
            f"model must be hashable (a frozen dataclass), got {type(model).__name__}"
        ) from None
    if not batch_norm_layers(state)[3]:
        raise ValueError(
            "state holds no batch-norm statistics (no dict with 'mean' and 'var'), so "
            "there is nothing to compute: is the model built with use_batch_norm=False?"
        )
    changes = {} if model.momentum is None else {"momentum": 0.0}
    if getattr(model, "axis_name", None) is not None:
        changes["axis_name"] = None
    if getattr(model, "unbiased_running_var", False):
        if not isinstance(model, BatchNorm):
            raise ValueError(
                f"precise_stats cannot count the values per feature of the layers of a "
                f"{type(model).__name__} with unbiased_running_var=True; recompute with "
                f"unbiased_running_var=False (the population variance)"
            )
        changes["unbiased_running_var"] = False
    return dataclasses.replace(model, **changes)


def population_stats(
    model: Any, probe: Any, params: Any, state: Any, groups: list
) -> tuple[Any, list]:
    """``state`` with the population statistics of ``groups``, and their per-batch statistics.

    The work of :func:`precise_stats` once its inputs are checked, shared with
    :func:`jaxbn.diagnose`, which checks its own. ``probe`` is what
    :func:`check_model` returns; ``groups`` are ``(index, xs, masks)``:
    batches stacked as ``xs [k, batch, ...]`` (``masks`` per example, or
    ``None``), ``index`` the position of the first in ``batches`` (for errors).
    The per-batch statistics are every layer's ``(means, vars)``, one row per
    batch in the order of ``groups``, the layers in state order.
    """
    rows = sum(xs.shape[0] * xs.shape[1] for _, xs, _ in groups)
    pstate = _probe_state(state)
    runs = []
    for i, xs, masks in groups:
        try:
            runs.append(_scan_stats(probe, params, pstate, *_as_run(xs, masks, rows)))
        except (ValueError, TypeError) as e:
            alone = " (the batches hold one example in all)" if rows == 1 else ""
            raise type(e)(
                f"batches[{i}] (shape {xs.shape[1:]}) does not fit the model{alone}: {e}"
            ) from e
    weights, stats = jax.tree.map(lambda *a: jnp.concatenate(a), *runs)
    return _pooled(model, state, weights, stats, groups[0][1].shape[1:]), stats


def _probe_state(state):
    """``state`` with every batch-norm count at 0: a cumulative average's first step."""
    _, leaves, treedef, idx = batch_norm_layers(state)
    for i in idx:
        if "count" in leaves[i]:
            leaves[i] = {**leaves[i], "count": jnp.zeros_like(leaves[i]["count"])}
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scan_stats(probe, params, state, xs, masks, copies):
    """Each batch's weight and every layer's ``(mean, var)`` in it, stacked over batches.

    A batch weighs its number of examples (the kept ones, under a mask), counted
    once when its rows were run as ``copies`` copies.
    """

    def one(batch):
        x, mask = batch
        kwargs = {} if mask is None else {"mask": mask}
        _, new_state = probe.apply(params, state, x, training=True, **kwargs)
        _, leaves, _, idx = batch_norm_layers(new_state)
        weight = jnp.float32(x.shape[0]) if mask is None else jnp.sum(mask, dtype=jnp.float32)
        return weight / copies, [(leaves[i]["mean"], leaves[i]["var"]) for i in idx]

    return lax.map(one, (xs, masks))


@functools.partial(jax.jit, static_argnums=(0, 4))
def _pooled(model, state, weights, stats, x_shape):
    """``state`` with each layer's pooled ``(mean, var)`` of its per-batch ``stats``.

    Compiled, so that the result is the same under an outer ``jax.jit``.
    """
    _, leaves, treedef, idx = batch_norm_layers(state)
    n = jnp.sum(weights)
    correction = 1.0
    if getattr(model, "unbiased_running_var", False):  # a BatchNorm: see check_model
        feat = _checks.feature_axes(len(x_shape), model.axis)
        total = n * math.prod(_checks.reduce_shape(x_shape, feat)[1:])
        correction = total / jnp.maximum(total - 1.0, 1.0)
    for i, (means, variances) in zip(idx, stats, strict=True):
        old = leaves[i]
        dtype = jnp.promote_types(old["mean"].dtype, jnp.float32)
        w = (weights / jnp.where(n > 0, n, 1.0)).astype(dtype)
        w = w.reshape(-1, *(1,) * (means.ndim - 1))
        # An empty batch's statistics are not defined: they must not reach the sums.
        means = jnp.where(w > 0, means.astype(dtype), 0.0)
        variances = jnp.where(w > 0, variances.astype(dtype), 0.0)
        mean = jnp.sum(w * means, axis=0, keepdims=True)
        var = jnp.sum(w * (variances + (means - mean) ** 2), axis=0) * correction
        mean = mean[0]
        leaves[i] = {
            **old,
            "mean": jnp.where(n > 0, mean, old["mean"]).astype(old["mean"].dtype),
            "var": jnp.where(n > 0, var, old["var"]).astype(old["var"].dtype),
        }
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_finite(index: Iterable[int], finite: jax.Array) -> None:
    """Refuses a batch that is not finite: ``finite[k]`` is for ``batches[index[k]]``.

    A NaN or infinity would turn the statistics of its layer, and of every layer
    after it, into NaN. Traced batches (under ``jit``) cannot be checked.
    """
    if isinstance(finite, jax.core.Tracer):
        return
    finite = np.asarray(finite)  # one device sync for all the batches
    if not finite.all():
        raise ValueError(
            f"batches must be finite: batches[{list(index)[int(np.argmin(finite))]}] holds "
            f"NaN or infinity"
        )


def _groups(batches, max_batches, takes_mask, stack):
    """``batches`` as groups ``(index, xs, masks)`` of stacked batches of one shape each.

    ``index`` is the position in ``batches`` of the group's first batch.
    """
    if isinstance(batches, (jax.Array, np.ndarray)):
        if batches.ndim < 2:
            raise ValueError(f"{_HINT}; got an array of shape {batches.shape}")
        xs = batches[:max_batches]
        _check_finite(range(len(xs)), jnp.isfinite(xs).all(axis=tuple(range(1, xs.ndim))))
        return [(0, xs, None)] if stack else [(i, xs[i : i + 1], None) for i in range(len(xs))]
    listed = _listed(batches, max_batches, takes_mask)
    if stack and len({(x.shape, None if m is None else m.shape) for _, x, m in listed}) == 1:
        masks = None if listed[0][2] is None else jnp.stack([m for _, _, m in listed])
        return [(listed[0][0], jnp.stack([x for _, x, _ in listed]), masks)]
    return [(i, x[None], None if m is None else m[None]) for i, x, m in listed]


def _listed(batches, max_batches, takes_mask):
    """An iterable of batches as a list of ``(index, x, mask or None)``, checked."""
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"{_HINT}; got {type(batches).__name__}") from None
    out = []
    for i, batch in enumerate(it):
        if max_batches is not None and i >= max_batches:
            break
        mask = None
        if isinstance(batch, (tuple, list)):
            if len(batch) != 2:
                raise ValueError(f"batches[{i}] must be x or a pair (x, mask), got {len(batch)}")
            batch, mask = batch
        x = jnp.asarray(batch)
        if x.ndim < 1:
            raise ValueError(f"batches[{i}] must be an array [batch, ...], got a scalar; {_HINT}")
        if mask is not None:
            x, mask = _with_mask(i, x, jnp.asarray(mask), takes_mask)
        if x.shape[0] == 0:
            continue  # nothing kept: no statistics, weight 0
        if out and x.shape[1:] != out[0][1].shape[1:]:
            raise ValueError(
                f"batches[{i}] has shape {x.shape}, but batches before it have examples of "
                f"shape {out[0][1].shape[1:]}"
            )
        out.append((i, x, mask))
    if not out:
        raise ValueError(
            "batches is empty (or every example is masked): precise_stats needs at least "
            "one batch of inputs"
        )
    _check_finite([i for i, _, _ in out], jnp.stack([_finite(x, m) for _, x, m in out]))
    return out


def _finite(x, mask) -> jax.Array:
    """Whether every kept example of ``x`` is finite (masked ones may hold anything)."""
    ok = jnp.isfinite(x)
    if mask is not None:
        ok = ok | ~jnp.reshape(mask, mask.shape[:1] + (1,) * (x.ndim - 1))
    return jnp.all(ok)


def _with_mask(i, x, mask, takes_mask):
    """Batch ``i``'s ``(x, mask)`` once the mask is checked; dropped where unused."""
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"batches[{i}] is a pair, whose second entry must be a boolean mask, "
            f"got dtype {mask.dtype} (pass the inputs only, not (x, labels))"
        )
    if mask.ndim < 1 or mask.shape[0] != x.shape[0] or math.prod(mask.shape[1:]) != 1:
        # A batch is weighed by its kept examples; a mask within examples (one
        # that could vary along a layer's features) has no single weight.
        raise ValueError(
            f"the mask of batches[{i}] must be per example, of shape [{x.shape[0]}] or "
            f"[{x.shape[0]}, 1, ...] (the batch size first), got shape {mask.shape}"
        )
    if takes_mask:
        return x, mask
    # Examples meet only in the batch statistics: dropping the masked ones is the
    # mask, for a model whose apply takes none.
    return x[np.asarray(mask).reshape(-1)], None


def _as_run(xs, masks, rows):
    """``(xs, masks, copies)``: one-row batches among others run as two copies of their row.

    A layer refuses to compute the statistics of a single value per feature (the
    variance is 0 whatever the input: alone, always a bug); pooled with other
    batches, a one-row batch is as good as any. Its statistics are those of its
    row twice, which weighs once (``copies``). A single row in all is run as it
    is, and refused by the layers that see one value per feature.
    """
    if xs.shape[1] != 1 or rows == 1:
        return xs, masks, 1
    return jnp.repeat(xs, 2, axis=1), None if masks is None else jnp.repeat(masks, 2, axis=1), 2


def precise_stats(
    model: Any,
    params: Any,
    state: Any,
    batches: Iterable[ArrayLike | tuple[ArrayLike, ArrayLike]] | ArrayLike,
    *,
    max_batches: int | None = None,
    stack: bool = True,
) -> Any:
    """Replaces every batch-norm layer's running statistics with population statistics.

    Runs ``model`` in training mode over ``batches`` with ``params`` fixed and sets
    each batch-norm layer's ``mean`` and ``var`` to the count-weighted mean of its
    batch means and the pooled (within- plus between-batch) variance: for the first
    layer, exactly the mean and variance over all the examples at once. See the
    module docstring for what the model must provide and the formula.

    Batches of equal shapes are stacked and run in one compiled ``lax.scan``;
    batches of different sizes (or ``stack=False``) run one compiled step each,
    and every example weighs the same whatever its batch's size. With the batches
    as one stacked array, ``precise_stats`` can itself be called under ``jax.jit``
    (``model`` static).

    Args:
        model: the network config (``jaxbn.MLP``, ``jaxbn.BatchNorm`` or any
            dataclass of the same protocol with a ``momentum`` field).
        params: the trained params.
        state: the state to update (its batch-norm dicts' ``mean``/``var``).
        batches: an iterable of input batches ``x [batch, ...]`` or pairs
            ``(x, mask)`` (``mask`` boolean over the examples; a model whose
            ``apply`` takes a ``mask`` gets it, otherwise the masked examples are
            dropped, which is the same for a model whose examples meet only in
            batch statistics), or one array ``[num_batches, batch, ...]`` of
            stacked batches. Pass inputs only, not labels. A batch may hold a
            single example: only the total must exceed one.
        max_batches: use at most this many batches (``None``: all).
        stack: stack equal-shaped batches into one ``lax.scan`` (one dispatch);
            ``False`` runs one step per batch and makes no stacked copy.

    Returns:
        ``state`` with new ``mean``/``var`` in every batch-norm layer that saw at
        least one example (dtypes kept); every other entry as it was.

    Raises:
        ValueError: if ``batches`` is empty or holds a single example in all
            (where a layer sees one value per feature), a kept example is not
            finite (concrete batches only), a batch does not fit the model
            (feature size, rank), batches' example shapes differ, a mask's batch
            size differs from its batch's, or ``state`` holds no batch norm.
        TypeError: if ``model`` is not a hashable dataclass with a ``momentum``
            field, ``batches`` is not iterable, or a mask is not boolean.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> import jaxbn
        >>> bn = jaxbn.BatchNorm(2)
        >>> params, state = bn.init()
        >>> x = jnp.array([[0.0, 1.0], [2.0, 1.0], [4.0, 1.0], [6.0, 5.0]])
        >>> state = jaxbn.precise_stats(bn, params, state, [x[:2], x[2:]])
        >>> state["mean"], state["var"]
        (Array([3., 2.], dtype=float32), Array([5., 3.], dtype=float32))
    """
    _checks.check_bool("stack", stack)
    if max_batches is not None:
        _checks.check_positive_int("max_batches", max_batches)
    probe = check_model(model, state)
    takes_mask = "mask" in inspect.signature(model.apply).parameters
    groups = _groups(batches, max_batches, takes_mask, stack)
    return population_stats(model, probe, params, state, groups)[0]


def precise_stats_from_data(
    model: Any,
    params: Any,
    state: Any,
    x: ArrayLike,
    *,
    batch_size: int,
    num_batches: int,
    key: jax.Array,
) -> Any:
    """:func:`precise_stats` over ``num_batches`` training batches drawn from ``x``.

    The batches are those the training loop would draw at steps
    ``0 .. num_batches - 1`` from ``key`` (:func:`jaxbn.data.batch_indices`: an
    epoch visits each example once), stacked and run in one ``lax.scan``: the
    statistics are those of the batch size the network was trained with.

    Args:
        model: the network config.
        params: the trained params.
        state: the state to update.
        x: ``[n, ...]`` training inputs (no labels).
        batch_size: examples per batch, ``<= n``.
        num_batches: how many batches, ``>= 1``.
        key: a ``jax.random.key`` the batches are drawn from.

    Returns:
        ``state`` with the population statistics (see :func:`precise_stats`).

    Raises:
        ValueError: for a bad ``batch_size`` or ``num_batches``, or what
            :func:`precise_stats` raises.
    """
    _checks.check_positive_int("num_batches", num_batches)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must be an array [n, ...] of training inputs, got shape {x.shape}")
    check_batch_size(batch_size, x.shape[0])
    draw = functools.partial(batch_indices, key, num_examples=x.shape[0], batch_size=batch_size)
    return precise_stats(model, params, state, x[jax.vmap(draw)(jnp.arange(num_batches))])

r"""Population statistics for evaluation, recomputed after training ("precise" batch norm).

The running averages a batch-norm layer evaluates with are an exponential average of
batch statistics taken while the weights kept changing; with a large momentum or a
short schedule they lag behind the final network. :func:`precise_stats` runs the
trained network in training mode over batches of inputs, with the params fixed, and
replaces every batch-norm layer's ``mean`` and ``var`` with the statistics of
everything that layer saw: the count-weighted mean of the batch means, and the
pooled variance (the within-batch variances plus the spread of the batch means),
combined batch by batch with the parallel update of Chan, Golub & LeVeque (1979):

.. math::

    n' = n + w, \quad \delta = \mu_B - \mu, \quad
    \mu' = \mu + \frac{w}{n'} \delta, \quad
    S' = S + w \sigma_B^2 + \frac{n w}{n'} \delta^2, \qquad
    \sigma^2 = S / n.

For the first layer the result is exactly the mean and (biased) variance over all
the examples at once. This is "PreciseBN" (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021); the later layers see the inputs the final network gives them.

What :func:`precise_stats` needs of a model (``jaxbn.MLP`` and ``jaxbn.BatchNorm``
itself qualify, as does any network config built the same way):

- ``model.apply(params, state, x, *, training)`` returning ``(output, new_state)``,
  with an optional ``mask=`` keyword;
- the model is a dataclass with a ``momentum`` field handed to every batch-norm
  layer. It is evaluated as ``dataclasses.replace(model, momentum=0.0)``, whose
  training-mode ``new_state`` holds each layer's batch statistics (with
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


def _bn_leaves(state) -> tuple[list, Any, list[int]]:
    """Flattens ``state`` keeping batch-norm state dicts whole; their leaf indices."""
    return batch_norm_layers(state)[1:]


def _probe(model):
    """The model whose training-mode ``new_state`` holds the batch statistics."""
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else ()
    if "momentum" not in fields:
        raise TypeError(
            f"model must be a dataclass config with a `momentum` field handed to its "
            f"batch-norm layers (as jaxbn.MLP and jaxbn.BatchNorm), got "
            f"{type(model).__name__}"
        )
    changes = {}
    if model.momentum is not None:
        changes["momentum"] = 0.0
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


def check_model(model: Any, state: Any) -> Any:
    """Refuses a model or state :func:`precise_stats` cannot update; else its probe.

    Needs no data, so :func:`jaxbn.fit` calls it before training.
    """
    probe = _probe(model)
    if not _bn_leaves(state)[2]:
        raise ValueError(
            "state holds no batch-norm statistics (no dict with 'mean' and 'var'); "
            "nothing to recompute"
        )
    return probe


def _probe_state(state):
    """``state`` with every batch-norm count at 0 (a cumulative average's first step)."""
    leaves, treedef, idx = _bn_leaves(state)
    for i in idx:
        if "count" in leaves[i]:
            leaves[i] = {**leaves[i], "count": jnp.zeros_like(leaves[i]["count"])}
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _batch_stats(probe, params, state, x, mask):
    """Every batch-norm layer's ``(mean, var)`` of batch ``x``, in state order."""
    kwargs = {} if mask is None else {"mask": mask}
    _, new_state = probe.apply(params, state, x, training=True, **kwargs)
    leaves, _, idx = _bn_leaves(new_state)
    return [(leaves[i]["mean"], leaves[i]["var"]) for i in idx]


def _combine(acc, w, stats):
    """Adds a batch of weight ``w`` to the per-layer ``(n, mean, S)`` accumulators."""
    out = []
    for (n, mean, m2), (mean_b, var_b) in zip(acc, stats, strict=True):
        has = w > 0
        n_new = n + w
        frac = jnp.where(has, w / jnp.where(has, n_new, 1.0), 0.0)
        # An empty batch's statistics are not defined: they must not reach the sums.
        delta = jnp.where(has, mean_b.astype(mean.dtype) - mean, 0.0)
        var_b = jnp.where(has, var_b.astype(mean.dtype), 0.0)
        out.append((n_new, mean + frac * delta, m2 + w * var_b + n * frac * delta**2))
    return out


def _zero_acc(state):
    leaves, _, idx = _bn_leaves(state)
    acc = []
    for i in idx:
        dtype = jnp.promote_types(leaves[i]["mean"].dtype, jnp.float32)
        zeros = jnp.zeros(jnp.shape(leaves[i]["mean"]), dtype)
        acc.append((jnp.zeros((), dtype), zeros, zeros))
    return acc


def _weight(x, mask, copies):
    """A batch's weight: its number of examples (kept ones, under a mask)."""
    if mask is None:
        return jnp.float32(x.shape[0] // copies)
    return jnp.sum(mask, dtype=jnp.float32) / copies  # per example (checked in _collect)


def _as_run(x, mask, rows):
    """``(x, mask, copies)``: a one-row batch among others runs as two copies of its row.

    A layer refuses to compute the statistics of a single value per feature (the
    variance is 0 whatever the input: alone, always a bug); pooled with other
    batches, a one-row batch is as good as any. Its statistics are those of its
    row twice, which weighs once (``copies``). A single row in all is run as it
    is, and refused by the layers that see one value per feature.
    """
    if x.shape[0] != 1 or rows == 1:
        return x, mask, 1
    return jnp.repeat(x, 2, axis=0), None if mask is None else jnp.repeat(mask, 2, axis=0), 2


@functools.partial(jax.jit, static_argnums=(0, 5))
def _scan_stats(probe, params, state, xs, masks, copies):
    def body(acc, batch):
        x, mask = batch
        stats = _batch_stats(probe, params, state, x, mask)
        return _combine(acc, _weight(x, mask, copies), stats), None

    acc, _ = lax.scan(body, _zero_acc(state), (xs, masks))
    return acc


@functools.partial(jax.jit, static_argnums=(0, 6))
def _step_stats(probe, params, state, acc, x, mask, copies):
    stats = _batch_stats(probe, params, state, x, mask)
    return _combine(acc, _weight(x, mask, copies), stats)


def _finite(x, mask) -> jax.Array:
    """Whether every kept example of ``x`` is finite (masked ones may hold anything)."""
    ok = jnp.isfinite(x)
    if mask is not None:
        ok = ok | ~jnp.reshape(mask, mask.shape[:1] + (1,) * (x.ndim - 1))
    return jnp.all(ok)


def _check_finite(index: list[int], finite: jax.Array) -> None:
    """Refuses a batch that is not finite: ``finite[k]`` is for ``batches[index[k]]``.

    A NaN or infinity would turn the statistics of its layer, and of every layer
    after it, into NaN. Traced batches (under ``jit``) cannot be checked.
    """
    if isinstance(finite, jax.core.Tracer):
        return
    finite = np.asarray(finite)  # one device sync for all the batches
    if not finite.all():
        raise ValueError(
            f"batches must be finite: batches[{index[int(np.argmin(finite))]}] holds NaN "
            f"or infinity"
        )


def _collect(batches, max_batches, takes_mask):
    """The batches as a list of ``(x, mask or None)`` arrays, checked."""
    if max_batches is not None and (not _checks.is_int(max_batches) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    if isinstance(batches, (jax.Array, np.ndarray)):
        if batches.ndim < 2:
            raise ValueError(f"{_HINT}; got an array of shape {batches.shape}")
        batches = batches[:max_batches]
        finite = jnp.isfinite(batches).all(axis=tuple(range(1, batches.ndim)))
        _check_finite(list(range(len(batches))), finite)
        return [(batches, None)], True
    try:
        it = iter(batches)
    except TypeError:
        raise TypeError(f"{_HINT}; got {type(batches).__name__}") from None
    out, index = [], []  # index: each batch's position in batches
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
            mask = jnp.asarray(mask)
            if mask.dtype != jnp.bool_:
                raise TypeError(
                    f"batches[{i}] is a pair, whose second entry must be a boolean mask, "
                    f"got dtype {mask.dtype} (pass the inputs only, not (x, labels))"
                )
            if mask.ndim < 1 or mask.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the mask of batches[{i}] must have the batch size {x.shape[0]} on "
                    f"axis 0, got shape {mask.shape}"
                )
            if math.prod(mask.shape[1:]) != 1:
                # A batch is weighed by its kept examples; a mask within examples (one
                # that could vary along a layer's features) has no single weight.
                raise ValueError(
                    f"the mask of batches[{i}] must be per example ([{x.shape[0]}] or "
                    f"[{x.shape[0]}, 1, ...]), got shape {mask.shape}"
                )
            if not takes_mask:
                # Examples meet only in the batch statistics: dropping the masked
                # ones is the mask, for a model whose apply takes none.
                x, mask = x[np.asarray(mask).reshape(-1)], None
        if x.shape[0] == 0:
            continue  # nothing kept: no statistics, weight 0
        if out and x.shape[1:] != out[0][0].shape[1:]:
            raise ValueError(
                f"batches[{i}] has shape {x.shape}, but batches before it have examples of "
                f"shape {out[0][0].shape[1:]}"
            )
        out.append((x, mask))
        index.append(i)
    if not out:
        raise ValueError(
            "batches is empty (or every example is masked): precise_stats needs at least "
            "one batch of inputs"
        )
    _check_finite(index, jnp.stack([_finite(x, m) for x, m in out]))
    return out, False


def _check_fits(i, probe, params, state, x, mask):
    """Traces one batch through the model; its errors name the batch."""
    try:
        jax.eval_shape(functools.partial(_batch_stats, probe), params, state, x, mask)
    except (ValueError, TypeError) as e:
        # A one-row batch reaches here only as the single example of all the batches.
        alone = " (the batches hold one example in all)" if x.shape[0] == 1 else ""
        raise type(e)(f"batches[{i}] (shape {x.shape}) does not fit the model{alone}: {e}") from e


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
        TypeError: if ``model`` has no ``momentum`` field, ``batches`` is not
            iterable, or a mask is not boolean.

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
    probe = check_model(model, state)
    leaves, treedef, idx = _bn_leaves(state)
    takes_mask = "mask" in inspect.signature(model.apply).parameters
    collected, stacked = _collect(batches, max_batches, takes_mask)
    if stacked and not stack:
        collected, stacked = [(x, None) for x in collected[0][0]], False
    pstate = _probe_state(state)
    if stacked:
        xs = collected[0][0]
        copies = 2 if xs.shape[1] == 1 and xs.shape[0] > 1 else 1  # see _as_run
        if copies == 2:
            xs = jnp.repeat(xs, 2, axis=1)
        _check_fits(0, probe, params, pstate, xs[0], None)
        acc = _scan_stats(probe, params, pstate, xs, None, copies)
    else:
        rows = sum(x.shape[0] for x, _ in collected)
        runs = [_as_run(x, m, rows) for x, m in collected]
        if stack and len({(x.shape, None if m is None else m.shape) for x, m, _ in runs}) == 1:
            x0, m0, copies = runs[0]
            _check_fits(0, probe, params, pstate, x0, m0)
            xs = jnp.stack([x for x, _, _ in runs])
            ms = jnp.stack([m for _, m, _ in runs]) if m0 is not None else None
            acc = _scan_stats(probe, params, pstate, xs, ms, copies)
        else:
            seen = set()
            for i, (x, m, _) in enumerate(runs):
                key = (x.shape, x.dtype, None if m is None else m.shape)
                if key not in seen:
                    seen.add(key)
                    _check_fits(i, probe, params, pstate, x, m)
            acc = _zero_acc(state)
            for x, m, copies in runs:
                acc = _step_stats(probe, params, pstate, acc, x, m, copies)

    unbiased = getattr(model, "unbiased_running_var", False)  # a BatchNorm: see _probe
    if unbiased:
        x0 = collected[0][0][0] if stacked else collected[0][0]
        feat = _checks.feature_axes(x0.ndim, model.axis)
        values_per_example = math.prod(_checks.reduce_shape(x0.shape, feat)[1:])
    for i, (n, mean, m2) in zip(idx, acc, strict=True):
        old = leaves[i]
        var = m2 / jnp.where(n > 0, n, 1.0)
        if unbiased:
            total = n * values_per_example
            var = var * total / jnp.maximum(total - 1.0, 1.0)
        leaves[i] = {
            **old,
            "mean": jnp.where(n > 0, mean, old["mean"]).astype(old["mean"].dtype),
            "var": jnp.where(n > 0, var, old["var"]).astype(old["var"].dtype),
        }
    return jax.tree_util.tree_unflatten(treedef, leaves)


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
    if not _checks.is_int(num_batches):
        raise TypeError(f"num_batches must be an int, got {type(num_batches).__name__}")
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError(f"x must be an array [n, ...] of training inputs, got shape {x.shape}")
    check_batch_size(batch_size, x.shape[0])
    n = x.shape[0]
    idx = jax.vmap(lambda t: batch_indices(key, t, num_examples=n, batch_size=batch_size))(
        jnp.arange(num_batches)
    )
    return precise_stats(model, params, state, x[idx])

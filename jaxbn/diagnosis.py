"""Why does a batch-norm network evaluate worse than it trains? A diagnosis that names the fix.

A network with batch norm trains with the statistics of each batch and evaluates
with running averages of them. When evaluation is much worse than training the
cause is nearly always one of a few, each measurable from the trained network and
a sample of inputs ``x``:

- **stale running statistics**: the averages lag behind the final weights (a
  large ``momentum``, a short schedule) or still hold their initial mean 0 and
  variance 1. Each layer's running statistics are compared with the population
  statistics of ``x`` (:func:`jaxbn.precise_stats` over ``x`` in batches of the
  training batch size): the mean's shift in population standard deviations, and
  the ratio of the variances;
- **noisy batch statistics**: batches too small for their statistics to be the
  population's, measured as the typical distance of a batch's statistics from
  the population's at the training batch size;
- **dead features** (variance near zero: a constant input, whose running mean's
  smallest drift is multiplied by ``1 / sqrt(var + eps)`` in evaluation) and
  **collapsed scales** (``scale`` near zero: a feature switched off).

Then the effect that matters: the model's predictions on ``x`` with the running
statistics, with the population statistics in every layer, and with them in one
layer at a time, scored by accuracy when labels are given (else by agreement with
the predictions that population statistics give). The verdict rests on that
effect, so a model whose running statistics predict as well as population
statistics is not reported stale. :func:`diagnose` returns it all as data, a
:class:`Diagnosis`, whose ``str()`` is a report ending with the fixes that apply,
most effective first.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import textwrap
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import tree_unflatten
from jax.typing import ArrayLike

from jaxbn import _checks
from jaxbn._model import batch_norm_layers
from jaxbn.stats import check_model, population_stats
from jaxbn.train import check_labels

__all__ = ["Diagnosis", "LayerDiagnosis", "diagnose"]

#: A score gap (points of accuracy, or share of changed predictions) this large is a problem.
MATERIAL_GAP = 0.01
#: A running mean this many population standard deviations off (rms over features) is stale.
STALE_SHIFT = 0.25
#: A running variance off by this factor or more (either way, typical feature) is stale.
STALE_VAR_RATIO = 1.5
#: Batch statistics this far from the population's (mean in stds, std relatively) are noisy.
NOISY_SPREAD = 0.3
#: A feature whose population variance is at most this fraction of its layer's median is dead.
DEAD_VAR = 1e-4
#: A scale whose magnitude is at most this fraction of its layer's median has collapsed.
COLLAPSED_SCALE = 1e-2
#: The spread of batch statistics is measured over at most this many batches of ``x``.
MAX_SPREAD_BATCHES = 64


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """What :func:`diagnose` measured in one batch-norm layer.

    Features are counted in the layer's flattened feature shape.

    Attributes:
        name: the layer's path in the state, e.g. ``"blocks/1/batch_norm"``.
        num_features: how many features the layer normalizes.
        mean_shift: ``|running mean - population mean| / population std``, root
            mean square over the live features.
        var_ratio: ``(running var + eps) / (population var + eps)``, geometric
            mean over the live features (1 is right; the initial variance 1 of a
            layer whose features vary more gives a ratio below 1).
        batch_mean_spread: the typical distance of a batch's mean from the
            population mean, in population stds (median over batches of ``x``,
            then over live features); ``None`` when ``x`` holds fewer than two
            batches of ``batch_size``.
        batch_std_spread: the same for the batch's ``sqrt(var + eps)``, relative
            to the population's (what the batch divides by).
        dead: indices of the features whose population variance is near zero.
        collapsed: indices of the features whose ``scale`` is near zero (empty
            when the layer has no scale in ``params`` at the state's path).
        count: the updates the running averages have seen (``state["count"]``,
            with ``debias`` or ``momentum=None``), else ``None``.
        horizon: ``1 / (1 - momentum)``, the updates an average spans; ``None``
            for a cumulative average.
        init_weight: how much of the initial mean 0 and variance 1 the running
            statistics still hold (0 to 1, a least-squares fit of
            ``running = w * initial + (1 - w) * population``); ``None`` where the
            population is too close to the initial values to tell.
        alone_score: the model's score with this layer's population statistics
            and every other layer's running statistics.
    """

    name: str
    num_features: int
    mean_shift: float
    var_ratio: float
    batch_mean_spread: float | None
    batch_std_spread: float | None
    dead: tuple[int, ...]
    collapsed: tuple[int, ...]
    count: int | None
    horizon: float | None
    init_weight: float | None
    alone_score: float

    @property
    def stale(self) -> bool:
        """Whether the running statistics are far from the population's."""
        return self.mean_shift > STALE_SHIFT or abs(math.log(self.var_ratio)) > math.log(
            STALE_VAR_RATIO
        )

    @property
    def noisy(self) -> bool:
        """Whether batch statistics at the training batch size are far from the population's."""
        spreads = (self.batch_mean_spread, self.batch_std_spread)
        return any(s is not None and s > NOISY_SPREAD for s in spreads)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The result of :func:`diagnose`: per layer, overall, the verdict and the fixes.

    ``str(diagnosis)`` is the report: a table of the layers, the scores, the
    verdict and the fixes.

    Attributes:
        model_name: the model's class name.
        num_examples: the examples of ``x``.
        batch_size: the training batch size the statistics were measured at.
        metric: ``"accuracy"`` (labels given) or ``"agreement"`` (the share of
            predictions equal to those with population statistics).
        running_score: the score with the running statistics (evaluation as is).
        population_score: the score with population statistics in every layer.
        output_change: root mean square of the change of the outputs from the
            running to the population statistics, relative to the outputs'.
        layers: one :class:`LayerDiagnosis` per batch-norm layer, in state order.
        fixes: ``(code, why)`` pairs, most effective first; empty when healthy.
    """

    model_name: str
    num_examples: int
    batch_size: int
    metric: str
    running_score: float
    population_score: float
    output_change: float
    layers: tuple[LayerDiagnosis, ...]
    fixes: tuple[tuple[str, str], ...]

    @property
    def gap(self) -> float:
        """What the running statistics cost: population score less running score."""
        return self.population_score - self.running_score

    @property
    def stale(self) -> bool:
        """Whether the running statistics cost a material score (at least 1 point)."""
        return self.gap >= MATERIAL_GAP

    @property
    def costly_layers(self) -> tuple[str, ...]:
        """The layers whose population statistics alone recover a quarter of the gap or more."""
        if not self.stale:
            return ()
        gains = sorted(
            ((layer.alone_score - self.running_score, layer.name) for layer in self.layers),
            reverse=True,
        )
        return tuple(name for gain, name in gains if gain >= self.gap / 4)

    @property
    def problems(self) -> tuple[str, ...]:
        """One sentence per problem found; empty for a healthy model."""
        out = []
        if self.stale:
            alone = {layer.name: layer.alone_score for layer in self.layers}
            costly = ", ".join(
                f"{name} ({_points(alone[name] - self.running_score)})"
                for name in self.costly_layers
            )
            where = f"most of it in {costly}" if costly else "spread over the layers"
            out.append(
                f"stale running statistics: they cost {100 * self.gap:.1f} points of "
                f"{self.metric}; {where}"
            )
        kinds = {
            "noisy": f"noisy batch statistics at batch size {self.batch_size}",
            "dead": "dead features (variance near 0)",
            "collapsed": "collapsed scales (near 0)",
        }
        return (*out, *(f"{kinds[k]} in {self._flagged(k)}" for k in kinds if self._flagged(k)))

    @property
    def healthy(self) -> bool:
        """Whether nothing is wrong: no problem, no fix."""
        return not self.problems

    def _flagged(self, what: str) -> str:
        """The ``"noisy"`` layers, or those with ``"dead"`` or ``"collapsed"`` features, listed."""
        return ", ".join(
            layer.name if what == "noisy" else f"{layer.name} {list(getattr(layer, what))}"
            for layer in self.layers
            if getattr(layer, what)
        )

    def __str__(self) -> str:
        lines = [
            f"batch-norm diagnosis: {self.model_name} on {self.num_examples} examples, "
            f"batch size {self.batch_size}",
            *_table(self),
            *_wrap(
                f"{self.metric}: running statistics {self.running_score:.1%}, population "
                f"statistics {self.population_score:.1%} ({_points(self.gap)} points); the "
                f"outputs change by {self.output_change:.1%}"
            ),
            *_wrap("verdict: " + ("; ".join(self.problems) + "." if self.problems else _HEALTHY)),
        ]
        if self.fixes:
            lines.append("fixes, most effective first:")
        for i, (code, why) in enumerate(self.fixes, 1):
            lines += [f"  {i}. {code}", *_wrap(why, "     # ")]
        return "\n".join(lines)


_HEALTHY = (
    "no problem found. The running statistics predict as well as population statistics, "
    "batch statistics are steady, no feature is dead and no scale has collapsed."
)


def _wrap(text: str, indent: str = "") -> list[str]:
    """``text`` in lines of at most 96 characters, each after ``indent`` (else two spaces)."""
    return textwrap.wrap(text, 96, initial_indent=indent, subsequent_indent=indent or "  ")


def _points(gain: float) -> str:
    """A score difference in points (percent), signed: ``"+25.3"``."""
    return f"{100 * gain:+.1f}"


#: The table's columns after the layer's name, with what the legend says of each.
_COLUMNS = {
    "mean shift": "running vs population mean, in population stds",
    "var ratio": "running / population",
    "batch spread": "batch mean / std vs population",
    "dead": "",
    "collapsed": "",
    "updates": "count / horizon",
    "alone": "points of {metric} with this layer's population statistics alone",
}


def _table(d: Diagnosis) -> list[str]:
    """The per-layer table of the report (columns as wide as their widest cell), its legend."""
    rows = [("layer", *_COLUMNS, ""), *(_row(layer, d.running_score) for layer in d.layers)]
    widths = [max(map(len, column)) for column in zip(*rows, strict=True)]
    table = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in rows
    ]
    legend = "; ".join(f"{name}: {says}" for name, says in _COLUMNS.items() if says)
    return table + _wrap(f"({legend.format(metric=d.metric)})")


def _row(layer: LayerDiagnosis, running_score: float) -> tuple[str, ...]:
    """One layer's cells of the table."""
    spread = "-"
    if layer.batch_mean_spread is not None:
        spread = f"{layer.batch_mean_spread:.2f} / {layer.batch_std_spread:.2f}"
    count = "-" if layer.count is None else layer.count
    horizon = "-" if layer.horizon is None else f"{layer.horizon:.0f}"
    figures = (layer.mean_shift, layer.var_ratio)
    return (
        layer.name,
        *(f"{v:.2f}" for v in figures),
        spread,
        *(str(len(v)) for v in (layer.dead, layer.collapsed)),
        f"{count} / {horizon}",
        _points(layer.alone_score - running_score),
        " ".join(f for f in ("stale", "noisy") if getattr(layer, f)),
    )


def diagnose(
    model: Any,
    params: Any,
    state: Any,
    x: ArrayLike,
    *,
    batch_size: int,
    labels: ArrayLike | None = None,
) -> Diagnosis:
    """Diagnoses a batch-norm network that evaluates worse than it trains; names the fix.

    Measures every batch-norm layer's running statistics against the population
    statistics of ``x``, the spread of batch statistics at ``batch_size``, dead
    features and collapsed scales; then scores the model's predictions on ``x``
    with the running statistics, with population statistics in every layer, and
    with them in each layer alone (see the module docstring). ``x`` is shuffled
    once (a fixed key) before it is cut into batches, and run whole: pass a
    sample of a few thousand examples, ideally data the model is evaluated on.

    Works for any model of the training protocol (``jaxbn.MLP``, ``jaxbn.CNN``,
    ``jaxbn.BatchNorm``, a user's): a hashable dataclass with a ``momentum``
    field whose state holds each batch-norm layer as a dict with ``"mean"`` and
    ``"var"`` (what :func:`jaxbn.precise_stats` needs), and whose outputs are
    ``[n, classes]`` logits. A layer's scale is read from ``params`` at the
    layer's path in the state, under ``"scale"``, where there is one.

    Args:
        model: the network config.
        params: the trained params.
        state: the state to diagnose (the running statistics).
        x: ``[n, ...]`` inputs as ``model.apply`` takes them, finite.
        batch_size: the training batch size (the batch that statistics were
            computed over in training), ``2 <= batch_size <= n``.
        labels: ``[n]`` integer labels of ``x``, to score by accuracy; ``None``
            scores by agreement with the predictions of population statistics.

    Returns:
        A :class:`Diagnosis`; ``print`` it for the report.

    Raises:
        ValueError: if ``state`` holds no batch-norm layer, ``x`` does not fit
            the model or is not finite, ``batch_size`` is not in ``[2, n]``, or
            ``labels`` are not ``n`` class indices; all before any work.
        TypeError: if ``model`` is not a dataclass with a ``momentum`` field.

    Examples:
        >>> import jax
        >>> import jaxbn
        >>> bn = jaxbn.BatchNorm(4)
        >>> params, state = bn.init()  # running mean 0 and variance 1
        >>> x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (256, 4))
        >>> layer = jaxbn.diagnose(bn, params, state, x, batch_size=32).layers[0]
        >>> layer.name, layer.stale, round(layer.mean_shift, 1), round(layer.var_ratio, 2)
        ('state', True, 1.5, 0.26)
    """
    probe, x, labels = _check_inputs(model, params, state, x, batch_size, labels)
    n = x.shape[0]
    # Batches of x as it comes (sorted by class, say) would not be training batches.
    order = jax.random.permutation(jax.random.key(0), n)
    x = x[order]
    labels = None if labels is None else labels[np.asarray(order)]
    k = n // batch_size
    groups = [(0, x[: k * batch_size].reshape(k, batch_size, *x.shape[1:]), None)]
    if k * batch_size < n:
        groups.append((k, x[k * batch_size :][None], None))
    pop_state, per_batch = population_stats(model, probe, params, state, groups)
    paths, running, treedef, idx = batch_norm_layers(state)
    pop = batch_norm_layers(pop_state)[1]
    alone = [tree_unflatten(treedef, [*running[:i], pop[i], *running[i + 1 :]]) for i in idx]
    outputs = [
        np.asarray(_outputs(model, params, s, x), np.float64) for s in (state, pop_state, *alone)
    ]
    scores = _scores(outputs, labels)
    # The spread of at least two (at most MAX_SPREAD_BATCHES) batches of batch_size.
    spread = min(k, MAX_SPREAD_BATCHES)
    per_batch = [(m[:spread], v[:spread]) if spread >= 2 else None for m, v in per_batch]
    scales = _scales(params)
    layers = tuple(
        _measure(model, paths[i], running[i], pop[i], stats, scales.get(paths[i]), score)
        for i, stats, score in zip(idx, per_batch, scores[2:], strict=True)
    )
    result = Diagnosis(
        model_name=type(model).__name__,
        num_examples=int(n),
        batch_size=batch_size,
        metric="agreement" if labels is None else "accuracy",
        running_score=scores[0],
        population_score=scores[1],
        output_change=_relative_change(outputs[0], outputs[1]),
        layers=layers,
        fixes=(),
    )
    return dataclasses.replace(result, fixes=_fixes(model, result))


def _check_inputs(model, params, state, x, batch_size, labels):
    """Refuses what :func:`diagnose` cannot diagnose, before any work; ``(probe, x, labels)``.

    The model and state are checked as :func:`jaxbn.precise_stats` needs them.
    """
    probe = check_model(model, state)
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("x must be an array [n, ...] of examples, got a scalar")
    if not _checks.is_int(batch_size) or not 2 <= batch_size <= x.shape[0]:
        raise ValueError(
            f"batch_size must be the training batch size, an int in [2, {x.shape[0]}] (the "
            f"examples of x), got {batch_size!r}"
        )
    try:
        out = jax.eval_shape(functools.partial(_outputs, model), params, state, x)
    except (TypeError, ValueError) as err:
        raise type(err)(f"x (shape {x.shape}) does not fit the model: {err}") from err
    if len(out.shape) != 2:
        raise ValueError(f"the model's outputs must be logits [n, classes], got shape {out.shape}")
    finite = np.asarray(jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1))
    if not finite.all():
        raise ValueError(f"x must be finite: x[{int(np.argmin(finite))}] holds NaN or infinity")
    if labels is not None:
        check_labels(labels, x.shape[0], num_classes=out.shape[1])
        labels = np.asarray(labels)
    return probe, x, labels


@functools.partial(jax.jit, static_argnums=0)
def _outputs(model, params, state, x):
    """The model's evaluation-mode outputs."""
    return model.apply(params, state, x, training=False)[0]


def _scales(params) -> dict:
    """Every ``"scale"`` in ``params`` by the path of its dict: a layer's path in the state."""

    def has_scale(node):
        return isinstance(node, dict) and "scale" in node

    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=has_scale)[0]
    return {path: node["scale"] for path, node in flat if has_scale(node)}


def _scores(outputs, labels):
    """Accuracy of each output (or agreement with ``outputs[1]``, the population's)."""
    preds = [out.argmax(-1) for out in outputs]
    target = preds[1] if labels is None else labels
    return [float(np.mean(p == target)) for p in preds]


def _relative_change(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b**2)), 1e-30))


def _flat(a):
    return np.asarray(a, np.float64).reshape(-1)


def _indices(flags) -> tuple[int, ...]:
    return tuple(int(i) for i in np.flatnonzero(flags))


def _measure(model, path, running, population, batches, scale, alone_score):
    """One layer's :class:`LayerDiagnosis` (numpy, float64).

    ``batches`` are the layer's ``(means, vars)`` in batches of ``x``, or ``None``.
    """
    eps, momentum = getattr(model, "eps", 1e-5), model.momentum
    mean_r, var_r = _flat(running["mean"]), _flat(running["var"])
    mean_p, var_p = _flat(population["mean"]), _flat(population["var"])
    dead = var_p <= DEAD_VAR * np.median(var_p)
    live = ~dead if not dead.all() else np.ones_like(dead)
    std = np.sqrt(var_p + eps)
    spread = (None, None) if batches is None else _spread(batches, mean_p, var_p, eps, live)
    size = None if scale is None else np.abs(_flat(scale))
    return LayerDiagnosis(
        name=jax.tree_util.keystr(path, simple=True, separator="/") or "state",
        num_features=int(mean_p.size),
        mean_shift=float(np.sqrt(np.mean(((mean_r - mean_p) / std)[live] ** 2))),
        var_ratio=float(np.exp(np.mean(np.log((var_r + eps) / (var_p + eps))[live]))),
        batch_mean_spread=spread[0],
        batch_std_spread=spread[1],
        dead=_indices(dead),
        collapsed=() if size is None else _indices(size <= COLLAPSED_SCALE * np.median(size)),
        count=int(running["count"]) if "count" in running else None,
        horizon=None if momentum is None else (math.inf if momentum >= 1 else 1 / (1 - momentum)),
        init_weight=_init_weight(mean_r, var_r, mean_p, var_p, std, live),
        alone_score=alone_score,
    )


def _spread(batches, mean_p, var_p, eps, live):
    """The typical batch's distance from the population statistics (median over batches).

    A median, not a mean square: one batch holding an outlier (a rare, extreme
    input) has a large variance, which says nothing of the other batches' noise.
    """
    means, variances = (np.asarray(a, np.float64).reshape(len(a), -1) for a in batches)
    d_mean = np.median(np.abs(means - mean_p), axis=0) / np.sqrt(var_p + eps)
    d_std = np.median(np.abs(np.sqrt((variances + eps) / (var_p + eps)) - 1.0), axis=0)
    return float(np.median(d_mean[live])), float(np.median(d_std[live]))


def _init_weight(mean_r, var_r, mean_p, var_p, std, live) -> float | None:
    """The weight ``w`` of ``running = w * initial + (1 - w) * population``, or None.

    Per feature and statistic, ``w = (running - population) / (initial - population)``
    (initial mean 0, variance 1), taken where the initial value is at least half
    a population std (mean) or half the population variance (variance) away;
    the median of those, in ``[0, 1]``.
    """
    usable_mean = live & (np.abs(mean_p) >= 0.5 * std)
    usable_var = live & (np.abs(1.0 - var_p) >= 0.5 * var_p)
    w = np.concatenate(
        [
            (mean_r - mean_p)[usable_mean] / -mean_p[usable_mean],
            (var_r - var_p)[usable_var] / (1.0 - var_p)[usable_var],
        ]
    )
    return float(np.clip(np.median(w), 0.0, 1.0)) if w.size else None


def _option(model, name: str, value: Any) -> str:
    """The line that sets a batch-norm option: in the model's config, else in every layer."""
    if name in {f.name for f in dataclasses.fields(model)}:
        cls = type(model)
        make = f"jaxbn.{cls.__name__}" if cls.__module__.startswith("jaxbn.") else cls.__name__
        return f"model = {make}(..., {name}={value!r})"
    return f"jaxbn.BatchNorm(..., {name}={value!r})  # in every batch-norm layer"


def _fixes(model, d: Diagnosis) -> tuple[tuple[str, str], ...]:
    """The ``(code, why)`` fixes of the problems of ``d``, most effective first.

    Stale statistics: population statistics now, then debiased averages and a
    lower momentum for the next run; then one fix per other problem.
    """
    b, m = d.batch_size, model.momentum
    weight = max((layer.init_weight or 0.0) for layer in d.layers)
    lower = 0.99 if m is None or m > 0.99 else 0.9
    now = "a cumulative average" if m is None else f"~{d.layers[0].horizon:.0f}"
    eps = float(f"{100 * getattr(model, 'eps', 1e-5):g}")
    noisy, dead, collapsed = (d._flagged(what) for what in ("noisy", "dead", "collapsed"))
    candidates = [
        (
            d.stale,
            f"state = jaxbn.precise_stats(model, params, state, "
            f"[x_train[i:i + {b}] for i in range(0, len(x_train), {b})])",
            f"population statistics from the training inputs in batches of {b}, no "
            f"retraining: with those of x, {_points(d.gap)} points of {d.metric} on x",
        ),
        (
            d.stale and m is not None and not getattr(model, "debias", False) and weight >= 0.1,
            _option(model, "debias", True),
            f"the running averages still hold up to {weight:.0%} of their initial "
            "mean 0 and variance 1; debiased ones hold none (retrain)",
        ),
        (
            d.stale and (m is None or m > 0.9),
            _option(model, "momentum", lower),
            f"average over the last ~{1 / (1 - lower):.0f} updates instead of "
            f"{now}: statistics of weights closer to the final ones (retrain)",
        ),
        (
            noisy,
            "train_step = jaxbn.train.make_train_step(model, optimizer, "
            "mesh=jaxbn.parallel.data_mesh())",
            f"batches of {b} give noisy statistics ({noisy}): normalize "
            "over more examples, a larger batch or the statistics synchronized over the "
            "devices (a mesh sets the model's axis_name; in your own shard_map, set axis_name)",
        ),
        (
            dead,
            _option(model, "eps", eps),
            f"dead features ({dead}) have a constant input: any drift "
            "of its running mean is multiplied by 1 / sqrt(var + eps) in evaluation; "
            "a larger eps damps it (the cause is upstream: a dead ReLU, a zero "
            "kernel column)",
        ),
        (
            collapsed,
            "optimizer = optax.adamw(lr, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p))",
            f"scales near 0 ({collapsed}) switch their features off, most "
            "often by weight decay on batch norm's scale: decay the kernels only",
        ),
    ]
    return tuple((code, why) for wanted, code, why in candidates if wanted)

"""Which statistics should a batch-norm network evaluate with? A study on the digits.

Batch norm evaluates with running averages of the batch statistics. With a large
momentum (0.999: an average over the last ~1000 steps) and a short schedule, they
are (a) still close to their initial values 0 and 1 and (b) averaged over weights
that have since changed. This script trains the MLP (``--model mlp``, the default)
or the CNN (``--model cnn``: the digits as 8x8x1 images) on the bundled 8x8 digits
with ``momentum=0.999`` and, at a few points of training, evaluates the same params on
the test split with three sets of statistics:

- ``running``: the plain running averages (Flax's, PyTorch's and Equinox's default);
- ``debiased``: zero-debiased running averages (``BatchNorm(debias=True)``): the
  same exponential average without the weight left on the initial values;
- ``precise``: population statistics recomputed over one epoch of training
  batches with the params fixed (:func:`jaxbn.precise_stats`).

Training is the same for all three (training mode uses batch statistics, never
the running ones): each step updates the plain and the debiased averages from the
same batch with the same params. Writes ``eval_stats.png``, ``eval_stats.md`` (the
table) and ``results.json`` to ``--out`` (a previous run's outputs there are kept:
the run is refused unless ``--overwrite`` is given); ``main`` returns the results.

    python examples/study_eval_stats.py
    python examples/study_eval_stats.py --model cnn --steps 400 --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxbn.cnn import CNN
from jaxbn.data import batch_indices, load_digits
from jaxbn.mlp import MLP
from jaxbn.stats import precise_stats_from_data
from jaxbn.train import evaluate, make_train_step

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared helpers beside this script
    sys.path.insert(0, _HERE)

import _figures  # noqa: E402

METHODS = ("running", "debiased", "precise")


#: What the script writes to --out (a previous run's are kept unless --overwrite).
OUTPUTS = ("eval_stats.png", "eval_stats.md", "results.json")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag explained by ``--help``)."""
    p = _figures.ArgumentParser(
        description="Evaluate a batch-norm MLP or CNN with running, debiased and precise "
        "statistics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: 3 hidden layers of --hidden units; cnn: --channels blocks on 8x8x1 images",
    )
    p.add_argument("--steps", type=int, default=1600, help="training steps of each run")
    p.add_argument(
        "--chunk",
        type=int,
        default=25,
        help="steps per compiled lax.scan dispatch; evaluations at chunk * 2^k and at the end",
    )
    p.add_argument("--seeds", type=int, default=5, help="number of runs (seeds 0, 1, ...)")
    p.add_argument("--momentum", type=float, default=0.999, help="batch norm's momentum")
    p.add_argument("--batch-size", type=int, default=32, help="examples per step")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of SGD with momentum 0.9")
    p.add_argument("--hidden", type=int, default=100, help="units of each of 3 hidden layers")
    p.add_argument(
        "--channels",
        type=lambda v: tuple(int(c) for c in v.split(",")),
        default=(16, 32),
        metavar="C1,C2,...",
        help="--model cnn: channels of each block (3x3 conv, batch norm, ReLU, 2x2 max pool)",
    )
    _figures.add_out_flags(
        p, default_help="runs/study_eval_stats, with _cnn appended for --model cnn"
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def eval_steps(steps: int, chunk: int) -> list[int]:
    """The steps evaluated at: ``chunk * 2^k`` up to ``steps``, and ``steps``."""
    out, s = [], chunk
    while s < steps:
        out.append(s)
        s *= 2
    return [*out, steps]


def make_chunk(model: MLP | CNN, debiased: MLP | CNN, optimizer, batch_size: int):
    """``chunk(carry, key, x, labels, start, length=...)``: ``length`` steps in one scan."""
    train_step = make_train_step(model, optimizer)

    @functools.partial(jax.jit, static_argnames="length")
    def chunk(carry, key, x, labels, start, *, length):
        def body(carry, t):
            params, state, dstate, opt_state = carry
            idx = batch_indices(key, t, num_examples=x.shape[0], batch_size=batch_size)
            batch = (x[idx], labels[idx])
            # The debiased averages: the same batch, the same params as the step.
            _, dstate = debiased.apply(params, dstate, batch[0], training=True)
            params, state, opt_state, _ = train_step(params, state, opt_state, batch)
            return (params, state, dstate, opt_state), None

        return jax.lax.scan(body, carry, start + jnp.arange(length))[0]

    return chunk


def run_seed(seed: int, data, args, bar, nets) -> dict[str, list[float]]:
    """Trains one network; returns the test accuracy of each method at each eval step."""
    model, debiased, optimizer, chunk = nets
    init_key, data_key, stats_key = jax.random.split(jax.random.key(seed), 3)
    params, state = model.init(init_key)
    _, dstate = debiased.init(init_key)
    x, labels = jnp.asarray(inputs(args, data.x_train)), jnp.asarray(data.y_train)
    x_test = inputs(args, data.x_test)
    n = x.shape[0]

    carry = (params, state, dstate, optimizer.init(params))
    results = {m: [] for m in METHODS}
    step = 0
    for target in eval_steps(args.steps, args.chunk):
        while step < target:
            length = min(args.chunk, target - step)
            carry = chunk(carry, data_key, x, labels, step, length=length)
            step += length
            bar.update(length)
        params, state, dstate, _ = carry
        precise = precise_stats_from_data(
            model,
            params,
            state,
            x,
            batch_size=args.batch_size,
            num_batches=n // args.batch_size,
            key=stats_key,
        )
        for name, net, st in (
            ("running", model, state),
            ("debiased", debiased, dstate),
            ("precise", model, precise),
        ):
            acc = evaluate(net, params, st, x_test, data.y_test)["accuracy"]
            results[name].append(float(acc))
    return results


def inputs(args, x) -> np.ndarray:
    """The digits as the model takes them: ``[n, 64]`` or ``[n, 8, 8, 1]`` images."""
    x = np.asarray(x, np.float32)
    return x.reshape(-1, 8, 8, 1) if args.model == "cnn" else x


def network(args) -> str:
    """The network, in words (for the figure and the table)."""
    if args.model == "cnn":
        blocks = "-".join(map(str, args.channels))
        return f"CNN {blocks} (3x3 conv, ReLU, 2x2 max pool)"
    return f"MLP 3x{args.hidden} ReLU"


def make_model(args, data) -> MLP | CNN:
    """The network trained by the study, with the running statistics' ``momentum``."""
    if args.model == "cnn":
        return CNN(
            1,
            args.channels,
            data.num_classes,
            pooling="max",
            activation="relu",
            momentum=args.momentum,
        )
    sizes = (data.num_features, *([args.hidden] * 3), data.num_classes)
    return MLP(sizes, activation="relu", momentum=args.momentum)


def _table(steps: list[int], acc: dict[str, np.ndarray], seeds: int) -> list[str]:
    picks = sorted({steps[0], steps[len(steps) // 2], steps[-1]})
    head = " | ".join(f"step {s}" for s in picks)
    lines = [
        f"| statistics | {head} |",
        "| --- |" + " ---: |" * len(picks),
    ]
    for name in METHODS:
        cells = []
        for s in picks:
            a = acc[name][:, steps.index(s)]
            cells.append(f"{a.mean():.3f} ± {a.std():.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(f"\nTest accuracy, mean ± std over {seeds} seeds.")
    return lines


def _band(ax, steps, values: np.ndarray, j: int, label: str) -> None:
    """Mean over seeds of ``values`` (``[seeds, steps]``) and a min-to-max band, colour ``j``."""
    ax.plot(steps, values.mean(0), "o-", color=f"C{j}", label=label)
    ax.fill_between(steps, values.min(0), values.max(0), color=f"C{j}", alpha=0.2)


def _plot(steps, acc, path, args) -> None:
    fig, axes = _figures.new_figure(2, figsize=(11, 4))
    ax_a, ax_b = axes
    for j, name in enumerate(METHODS):
        _band(ax_a, steps, acc[name], j, name)
    ax_a.set(xscale="log", xlabel="training steps", ylabel="test accuracy", ylim=(0.0, 1.0))
    ax_a.set_title("test accuracy (mean over seeds; band: min to max)")
    ax_a.legend(loc="lower right")
    for j, name in enumerate(METHODS[:2]):
        _band(ax_b, steps, acc["precise"] - acc[name], j, f"precise - {name}")
    ax_b.axhline(0.0, color="k", lw=0.8)
    ax_b.set(xscale="log", xlabel="training steps", ylabel="accuracy gap")
    ax_b.set_title("gap to precise statistics")
    ax_b.legend(loc="upper right")
    for ax in axes:
        ax.minorticks_off()  # the log axis' minor labels overlap
        ax.set_xticks(steps, [str(s) for s in steps])
    title = (
        f"digits, {network(args)}, batch norm momentum {args.momentum}, "
        f"batch {args.batch_size}, SGD+momentum lr={args.lr}, {args.seeds} seeds"
    )
    _figures.save_figure(fig, axes, path, title=title, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Runs the study; writes the figure, the table and the results.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{"config", "steps", "accuracy", "table", "png", "markdown"}``;
        ``accuracy[method]`` is ``[seeds][len(steps)]`` test accuracies.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "chunk", "seeds", "batch_size", "hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.out is None:  # each model's study in a folder of its own
        args.out = "runs/study_eval_stats" + ("_cnn" if args.model == "cnn" else "")
    _figures.check_out(parser, args.out, OUTPUTS, overwrite=args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    data = load_digits()
    steps = eval_steps(args.steps, args.chunk)
    model = make_model(args, data)
    debiased = dataclasses.replace(model, debias=True)
    optimizer = optax.sgd(args.lr, momentum=0.9)
    nets = (model, debiased, optimizer, make_chunk(model, debiased, optimizer, args.batch_size))
    runs = []
    with tqdm(total=args.seeds * args.steps, desc="eval stats", disable=args.no_progress) as bar:
        for seed in range(args.seeds):
            runs.append(run_seed(seed, data, args, bar, nets))
    acc = {m: np.array([r[m] for r in runs]) for m in METHODS}
    lines = _table(steps, acc, args.seeds)
    lines.append(f"{network(args)}, momentum {args.momentum}, batch {args.batch_size}.")
    results = {
        "config": vars(args),
        "steps": steps,
        "accuracy": {m: acc[m].tolist() for m in METHODS},
        "table": lines,
        "png": os.path.join(args.out, "eval_stats.png"),
        "markdown": os.path.join(args.out, "eval_stats.md"),
    }
    return _figures.write_study(
        results, lines, lambda path: _plot(steps, acc, path, args), args.out
    )


if __name__ == "__main__":
    main()

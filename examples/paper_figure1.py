"""Ioffe & Szegedy (2015), Figure 1, on the 8x8 digits bundled with scikit-learn.

The paper trains an MLP of 3 hidden layers of 100 sigmoid units on MNIST with
mini-batches of 60 examples, with and without batch norm, and plots (a) the test
accuracy over training and (b, c) the 15th, 50th and 85th percentiles of the input
to one sigmoid of the last hidden layer over training. Here the same two networks
(same seed, hence the same initial kernels; same batches, same steps) are trained
on the digits with plain SGD, in chunks of ``--eval-every`` steps compiled with
``lax.scan``. After each chunk, the test accuracy (inference mode: running
statistics) and the percentiles over a fixed evaluation batch (the test split)
of the chosen unit's pre-activation are recorded. The pre-activation is taken as
the network computes it in training (batch statistics of the evaluation batch),
which is the distribution the sigmoid sees while it learns.

Writes ``figure1.png``, ``figure1.md`` (test accuracy at a few steps) and
``results.json`` to ``--out`` (a previous run's outputs there are kept: the run is refused unless
``--overwrite`` is given); ``main`` returns the results.

    python examples/paper_figure1.py
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxbn.data import load_digits
from jaxbn.mlp import MLP
from jaxbn.train import evaluate, fit, init_train_state

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared helpers beside this script
    sys.path.insert(0, _HERE)

import _figures  # noqa: E402

PERCENTILES = (15, 50, 85)


#: What the script writes to --out (a previous run's are kept unless --overwrite).
OUTPUTS = ("figure1.png", "figure1.md", "results.json")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag explained by ``--help``)."""
    p = _figures.ArgumentParser(
        description="Reproduce Ioffe & Szegedy (2015) Figure 1 on the bundled 8x8 digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=10_000, help="training steps of each network")
    p.add_argument(
        "--eval-every",
        type=int,
        default=100,
        help="steps per compiled chunk; accuracy and percentiles are recorded after each",
    )
    p.add_argument("--batch-size", type=int, default=60, help="examples per step (paper: 60)")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of plain SGD")
    p.add_argument(
        "--hidden",
        type=int,
        nargs=2,
        default=(3, 100),
        metavar=("LAYERS", "UNITS"),
        help="number of hidden layers and their width (paper: 3 100)",
    )
    p.add_argument(
        "--unit", type=int, default=0, help="index of the plotted unit of the last hidden layer"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and batches")
    _figures.add_out_flags(p, default_help="runs/paper_figure1")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@functools.partial(jax.jit, static_argnums=0)
def unit_percentiles(model: MLP, params, state, x, unit) -> jax.Array:
    """Percentiles ``PERCENTILES`` over ``x`` of the input to sigmoid ``unit`` of the
    last hidden layer (batch norm with the statistics of ``x``, as in training)."""
    pre = model.pre_activations(params, state, x, training=True)[-1]
    return jnp.percentile(pre[:, unit], jnp.asarray(PERCENTILES, jnp.float32))


def train_and_record(model: MLP, data, args, bar) -> dict:
    """Trains ``model``; returns the test accuracy and percentiles after every chunk."""
    optimizer = optax.sgd(args.lr)
    key = jax.random.key(args.seed)
    record = {"step": [], "test_accuracy": [], "percentiles": []}

    def observe(ts):
        record["step"].append(int(ts.step))
        acc = evaluate(model, ts.params, ts.state, data.x_test, data.y_test)["accuracy"]
        record["test_accuracy"].append(float(acc))
        pct = unit_percentiles(model, ts.params, ts.state, data.x_test, args.unit)
        record["percentiles"].append([float(v) for v in pct])

    observe(init_train_state(model, optimizer, key))  # step 0: what fit starts from

    def on_chunk(ts, chunk):
        observe(ts)
        bar.update(len(chunk["step"]))
        bar.set_postfix(test_acc=f"{record['test_accuracy'][-1]:.3f}")

    fit(
        model,
        optimizer,
        data.x_train,
        data.y_train,
        steps=args.steps,
        batch_size=args.batch_size,
        key=key,
        chunk_size=args.eval_every,
        callback=on_chunk,
    )
    return record


def table_steps(steps: list[int]) -> list[int]:
    """A few recorded steps spread over the run, roughly 1/40, 1/20, 1/10, 1/4, 1/2, 1."""
    last = steps[-1]
    picks = []
    for frac in (1 / 40, 1 / 20, 1 / 10, 1 / 4, 1 / 2, 1):
        s = min(steps[1:] or steps, key=lambda t, target=frac * last: abs(t - target))
        if s not in picks:
            picks.append(s)
    return picks


def _plot(results: dict, path: str, args) -> None:
    fig, axes = _figures.new_figure(3, figsize=(13, 3.8))
    ax_a, ax_b, ax_c = axes
    for name, style in (("without_batch_norm", "--"), ("with_batch_norm", "-")):
        r = results[name]
        label = name.replace("_", " ")
        ax_a.plot(r["step"], r["test_accuracy"], style, label=label)
    ax_a.set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy")
    ax_a.set_ylim(0.0, 1.0)
    ax_a.legend(loc="lower right")
    lims = []
    for ax, name, title in (
        (ax_b, "without_batch_norm", "(b) without batch norm"),
        (ax_c, "with_batch_norm", "(c) with batch norm"),
    ):
        r = results[name]
        pct = np.asarray(r["percentiles"])
        for j, q in enumerate(PERCENTILES):
            ax.plot(r["step"], pct[:, j], label=f"{q}th percentile", color=f"C{j}")
        ax.set(
            xlabel="training step",
            ylabel=f"input to sigmoid (unit {args.unit}, last hidden layer)",
            title=title,
        )
        ax.legend(loc="best")
        lims += [pct.min(), pct.max()]
    for ax in (ax_b, ax_c):
        ax.set_ylim(min(lims) - 0.2, max(lims) + 0.2)
    layers, width = args.hidden
    title = (
        f"Ioffe & Szegedy (2015) Figure 1 on the 8x8 digits: MLP {layers}x{width} sigmoid, "
        f"batch {args.batch_size}, SGD lr={args.lr}, seed {args.seed}"
    )
    _figures.save_figure(fig, axes, path, title=title, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    """Trains both networks, writes the figure, the table and the results.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{"config", "with_batch_norm", "without_batch_norm", "table", "png",
        "markdown"}``; each network's entry holds ``step``, ``test_accuracy`` and
        ``percentiles`` (one ``[p15, p50, p85]`` per recorded step).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    layers, width = args.hidden
    if args.steps < 1 or args.eval_every < 1:
        raise ValueError(
            f"--steps and --eval-every must be >= 1, got {args.steps} and {args.eval_every}"
        )
    if not 0 <= args.unit < width:
        raise ValueError(f"--unit must be in [0, {width}), got {args.unit}")
    if args.out is None:
        args.out = os.path.join("runs", "paper_figure1")
    _figures.check_out(parser, args.out, OUTPUTS, overwrite=args.overwrite)
    os.makedirs(args.out, exist_ok=True)
    data = load_digits()
    sizes = (data.num_features, *([width] * layers), data.num_classes)
    results = {"config": vars(args) | {"layer_sizes": list(sizes)}}
    with tqdm(total=2 * args.steps, desc="figure 1", disable=args.no_progress) as bar:
        for name, use_bn in (("without_batch_norm", False), ("with_batch_norm", True)):
            model = MLP(sizes, activation="sigmoid", use_batch_norm=use_bn)
            results[name] = train_and_record(model, data, args, bar)

    steps = results["with_batch_norm"]["step"]
    rows = []
    for s in table_steps(steps):
        i = steps.index(s)
        rows.append(
            {
                "step": s,
                "without_batch_norm": results["without_batch_norm"]["test_accuracy"][i],
                "with_batch_norm": results["with_batch_norm"]["test_accuracy"][i],
            }
        )
    results["table"] = rows
    lines = [
        "| training step | test accuracy without batch norm | test accuracy with batch norm |",
        "| ---: | ---: | ---: |",
        *(
            f"| {r['step']} | {r['without_batch_norm']:.3f} | {r['with_batch_norm']:.3f} |"
            for r in rows
        ),
    ]
    results["png"] = os.path.join(args.out, "figure1.png")
    results["markdown"] = os.path.join(args.out, "figure1.md")
    return _figures.write_study(results, lines, lambda path: _plot(results, path, args), args.out)


if __name__ == "__main__":
    main()

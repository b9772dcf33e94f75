"""Draws bench_op.py's and bench_train.py's JSON results as bar charts (run_all.py does).

Left: each op contender's time over jaxbn's, with the bandwidth floor (lower is
faster); right: training steps per second over jaxbn's scan loop (higher is faster).
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

OP_CONTENDERS = ("jaxbn", "reference", "flax", "torch")
TRAIN_CONTENDERS = ("jaxbn-scan", "jaxbn-jit", "reference-jit", "flax-jit", "torch-eager")


def _bars(ax, groups, series, values, *, ylabel, title, log=False):
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for i, name in enumerate(series):
        v = [values.get((g, name), np.nan) for g in groups]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, v, width, label=name)
    ax.set_xticks(x, groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def main(argv=None) -> str:
    """Draws the charts; returns the path of the PNG."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", required=True, help="JSON written by bench_op.py --json")
    p.add_argument("--train", required=True, help="JSON written by bench_train.py --json")
    p.add_argument("--out", default="benchmarks/results.png", help="PNG to write")
    args = p.parse_args(argv)
    with open(args.op) as f:
        op = json.load(f)
    with open(args.train) as f:
        train = json.load(f)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    groups, values = [], {}
    for case in op["cases"]:
        groups.append(case["name"].replace("batch_norm_", ""))
        for name in OP_CONTENDERS:
            ratio = case["contenders"].get(name, {}).get("ratio_to_jaxbn")
            if ratio is not None:
                values[(groups[-1], name)] = ratio
        values[(groups[-1], "floor")] = 1.0 / case["jaxbn_over_floor"]
    _bars(
        ax1,
        groups,
        [*OP_CONTENDERS, "floor"],
        values,
        ylabel="time / jaxbn (lower is faster)",
        title="batch-norm training step (forward + backward)",
        log=True,
    )
    groups, values = [], {}
    for model in train["models"]:
        groups.append(model["name"])
        for name in TRAIN_CONTENDERS:
            ratio = model["contenders"].get(name, {}).get("speed_ratio")
            if ratio is not None:
                values[(groups[-1], name)] = ratio
    _bars(
        ax2,
        groups,
        TRAIN_CONTENDERS,
        values,
        ylabel="steps/s / jaxbn-scan (higher is faster)",
        title="MLP training steps per second",
    )
    machine = op.get("machine", {})
    when = machine.get("date", "")[:10]
    fig.suptitle(f"{machine.get('cpu', '')}, {machine.get('cores', '')} cores, {when}", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()

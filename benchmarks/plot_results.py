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

OP_CONTENDERS = ("jaxbn", "reference", "flax", "torch", "floor")
TRAIN_CONTENDERS = ("jaxbn-scan", "jaxbn-jit", "reference-jit", "flax-jit", "torch-eager")


def _bars(ax, groups: dict[str, dict], series, *, ylabel: str, title: str, log=False):
    """One bar per series in each group; ``groups[group][series]`` is its height."""
    width, x = 0.8 / len(series), np.arange(len(groups))
    for i, name in enumerate(series):
        heights = [values.get(name) or np.nan for values in groups.values()]
        ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
    ax.set_xticks(x, list(groups), rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title, yscale="log" if log else "linear")
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
    op_groups = {}
    for case in op["cases"]:
        ratios = {name: e.get("ratio_to_jaxbn") for name, e in case["contenders"].items()}
        ratios["floor"] = 1.0 / case["jaxbn_over_floor"]
        op_groups[case["name"].removeprefix("batch_norm_")] = ratios
    train_groups = {
        m["name"]: {name: e.get("speed_ratio") for name, e in m["contenders"].items()}
        for m in train["models"]
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    _bars(
        ax1,
        op_groups,
        OP_CONTENDERS,
        ylabel="time / jaxbn (lower is faster)",
        title="batch-norm training step (forward + backward)",
        log=True,
    )
    _bars(
        ax2,
        train_groups,
        TRAIN_CONTENDERS,
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

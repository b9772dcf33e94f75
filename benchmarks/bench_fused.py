"""Batch norm fused with its activation (In-Place ABN): memory and speed of a training step.

``--model mlp``: ``bench_train.py``'s wide MLP, ``--model cnn``: ``bench_cnn.py``'s
CNN, both with leaky ReLU. ``jaxbn-fused`` (``fuse_activation=True``),
``jaxbn-unfused`` and ``flax``, one step per call, by ``bench_train.py``'s
builders; ``rel err`` against unfused (the fused layer scales by
``|scale| + eps``). Fused/unfused speed: the median of the per-round ratios.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import _common
import bench_cnn
import bench_train

BUILDERS = {
    "jaxbn-fused": lambda wl, opt: bench_train.build_jit(wl, opt, fuse_activation=True),
    "jaxbn-unfused": bench_train.build_jit,
    "flax": bench_train.build_flax,
}


def fused_vs_unfused(entries: dict) -> float | None:
    """Median over the rounds of fused steps/s over unfused steps/s."""
    a, b = entries["jaxbn-fused"], entries["jaxbn-unfused"]
    if "times_s" not in a or "times_s" not in b:
        return None
    ratios = [
        (a["steps_per_run"] / ta) / (b["steps_per_run"] / tb)
        for ta, tb in zip(a["times_s"], b["times_s"], strict=True)
    ]
    return statistics.median(ratios)


def _parser():
    """The command-line flags."""
    p = _common.parser(
        "Training-step memory and speed of batch norm fused with leaky ReLU.",
        reps=7,
        warmup=2,
        min_time=0.5,
    )
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables; returns the results."""
    from jaxbn import MLP, data

    args = _parser().parse_args(argv)
    if args.quick:  # a tiny network, short runs
        args.reps, args.warmup, args.min_time = min(args.reps, 2), 1, 0.01
    info = _common.machine_info(__file__, argv)
    if args.model == "cnn":
        sizes = {"channels": (4, 4), "image_size": 6, "batch_size": 8} if args.quick else {}
        wl = bench_cnn.make_workload(activation="leaky_relu", **sizes)
    elif args.quick:
        ds = data.make_blobs(num_examples=256, num_features=16, num_classes=4)
        model = MLP((16, 32, 32, 4), activation="leaky_relu", momentum=0.99, eps=1e-5)
        wl = bench_train.workload("tiny", model, ds.x_train, ds.y_train, batch_size=16, lr=0.1)
    else:
        wl = bench_train.make_workload("wide", activation="leaky_relu")
    res = bench_train.run_model(
        wl,
        BUILDERS,
        False,
        timing=_common.timing(args),
        check_against="jaxbn-unfused",
        baseline="jaxbn-unfused",
    )
    ratio = fused_vs_unfused(res["contenders"])
    print(bench_train.tables([res]))
    print(f"\nfused / unfused steps/s (median of paired rounds): {_common.fmt(ratio, '.3f')}")
    out = {
        "machine": info,
        "model": args.model,
        "case": wl.label,
        "results": res,
        "fused_vs_unfused_steps": ratio,
    }
    return _common.finish(args, out)


if __name__ == "__main__":
    main()

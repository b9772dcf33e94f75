"""Batch norm fused with its activation (In-Place ABN): memory and speed of a training step.

``--model mlp`` (default): the wide MLP of ``bench_train.py`` (784-1024x4-10,
batch 512, synthetic blobs); ``--model cnn``: the CNN of ``bench_cnn.py``; both
with leaky ReLU. One SGD step per call, by ``bench_train.py``'s builders, from
the same start: ``jaxbn-fused`` (``fuse_activation=True``: every batch norm
runs :func:`jaxbn.batch_norm_act`, whose backward keeps only its output),
``jaxbn-unfused`` and ``flax`` (``nn.BatchNorm`` then ``nn.leaky_relu``).
``rel err`` is against jaxbn unfused (the fused layer multiplies by
``|scale| + eps``). The fused/unfused speed is the median of the per-round
ratios of the interleaved runs.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Sequence

try:
    import _common
    import bench_cnn
    import bench_train
except ImportError:  # imported as part of a package
    from benchmarks import _common, bench_cnn, bench_train

_common.use_checkout()

MEMORY_TARGET = 0.5  # fused temp memory at most this times Flax's
SPEED_TARGET = 0.9  # fused steps/s at least this times unfused (within 10%)
WIDE = (784, 1024, 1024, 1024, 1024, 10)
BUILDERS = {
    "jaxbn-fused": lambda wl, opt: bench_train.build_jit(wl, opt, fuse_activation=True),
    "jaxbn-unfused": bench_train.build_jit,
    "flax": bench_train.build_flax,
}


def make_workload(sizes, *, batch_size: int, num_examples: int, lr: float):
    """The unfused leaky-ReLU MLP on synthetic blobs, its batches and start."""
    from jaxbn import MLP, data

    ds = data.make_blobs(num_examples=num_examples, num_features=sizes[0], num_classes=sizes[-1])
    model = MLP(sizes, activation="leaky_relu", momentum=0.99, eps=1e-5)
    name = "wide" if tuple(sizes) == WIDE else "custom"
    return bench_train.workload(name, model, ds.x_train, ds.y_train, batch_size=batch_size, lr=lr)


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
    p.add_argument(
        "--layer-sizes",
        type=lambda s: tuple(int(v) for v in s.split("-")),
        default=WIDE,
        metavar="SIZES",
        help="mlp: inputs-hidden...-classes",
    )
    p.add_argument("--examples", type=int, default=10240, help="mlp: training examples")
    p.add_argument(
        "--channels",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=(64, 64, 64, 64),
        help="cnn: channels of each block",
    )
    p.add_argument("--image-size", type=int, default=32, help="cnn: image height and width")
    p.add_argument("--batch-size", type=int, help="examples per step (default: 512 mlp, 128 cnn)")
    p.add_argument("--lr", type=float, help="SGD learning rate (default: 0.1 mlp, 0.01 cnn)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the table and targets; returns the results."""
    args = _parser().parse_args(argv)
    cnn = args.model == "cnn"
    batch, lr = args.batch_size or (128 if cnn else 512), args.lr or (0.01 if cnn else 0.1)
    if args.quick:
        args.reps, args.warmup, args.min_time = min(args.reps, 2), 1, 0.01
        args.layer_sizes, args.examples, args.channels, args.image_size = (
            (16, 32, 32, 4),
            256,
            (4, 4),
            6,
        )
        batch = 8 if cnn else 16
    info = _common.machine_info(__file__, argv)
    if cnn:
        wl = bench_cnn.make_workload(
            channels=args.channels,
            image_size=args.image_size,
            batch_size=batch,
            lr=lr,
            activation="leaky_relu",
        )
    else:
        wl = make_workload(args.layer_sizes, batch_size=batch, num_examples=args.examples, lr=lr)
    print(f"network  {wl.label} leaky_relu, optax.sgd({lr})\n")
    timing = _common.timing(args)
    res = bench_train.run_model(
        wl, BUILDERS, [], timing=timing, check_against="jaxbn-unfused", baseline="jaxbn-unfused"
    )
    ratio = fused_vs_unfused(res["contenders"])
    print(bench_train.tables([res]))
    print(f"\nfused / unfused steps/s (median of paired rounds): {_common.fmt(ratio, '.3f')}")
    mem = (res["contenders"]["jaxbn-fused"].get("memory") or {}).get("temp_vs_flax")
    targets = [
        _common.target(
            f"fused temp memory <= {MEMORY_TARGET}x Flax", mem, lambda v: v <= MEMORY_TARGET
        ),
        _common.target(
            f"fused steps/s within {round(100 * (1 - SPEED_TARGET))}% of unfused",
            ratio,
            lambda v: v >= SPEED_TARGET,
        ),
    ]
    _common.print_targets(targets)
    out = {
        "machine": info,
        "model": args.model,
        "case": wl.label,
        "results": res,
        "fused_vs_unfused_steps": ratio,
        "targets": targets,
    }
    return _common.finish(args, out)


if __name__ == "__main__":
    main()
    sys.exit(0)

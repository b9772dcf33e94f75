"""Batch norm fused with its activation (In-Place ABN): memory and speed of a training step.

``--model mlp`` (default): the wide MLP of ``bench_train.py`` (784-1024x4-10,
batch 512, on synthetic Gaussian blobs) with leaky ReLU. ``--model cnn``: the
CNN of ``bench_cnn.py`` (4 blocks of 3x3 convolutions with 64 channels on
32x32x3 synthetic images, batch 128) with leaky ReLU. One SGD step per call,
three ways:

- ``jaxbn-fused``: ``jaxbn.MLP`` / ``jaxbn.CNN`` with ``fuse_activation=True``:
  every batch norm runs :func:`jaxbn.batch_norm_act`, whose backward keeps only
  its output;
- ``jaxbn-unfused``: the same network with ``jaxbn.batch_norm`` then leaky ReLU;
- ``flax``: ``flax.linen`` with ``nn.BatchNorm`` then ``nn.leaky_relu`` (and
  ``nn.Conv`` for the CNN).

All three are built by ``bench_train.py``'s (``bench_cnn.py``'s) builders from
the same initial parameters. The ``rel err`` column compares the loss and parameters after one
step with jaxbn unfused. The fused network multiplies by ``|scale| + eps``
rather than ``scale``: on the wide network that moves one pre-activation across
leaky ReLU's kink, and one batch-norm bias gradient by 2e-3 of the largest (the
unfused network given the same effective scale takes the same step, and both
match a float64 computation to 1e-7 away from that element).

Memory: ``temp_size_in_bytes`` of ``jax.jit(step).lower(...).compile()
.memory_analysis()``, exact for the compiled step; the output size is printed
next to it (the new parameters; XLA may keep activations in those buffers
before it writes the parameters there, for every contender alike).

Speed: the steps per run are calibrated so that a run lasts ``--min-time``; the
contenders' runs are then interleaved (one run of each in turn, ``--reps``
rounds), so that load from other processes affects them alike. The fused/unfused
ratio is the median of the per-round ratios.

On the CNN, what decides the memory is the convolution's backward rather than
batch norm: its gradient for the kernel reads a transposed copy of the block's
input, which depends on that input alone, and XLA made it in the forward pass
and kept it until the backward (every block's input held twice; the fused
network then kept exactly as much as the unfused one, 0.69x Flax). The
backward of :func:`jaxbn.cnn.conv` ties that copy to the incoming cotangent,
and computes the input's gradient after the kernel's, so that the copies are
freed first (``tests/test_cnn.py::test_fused_step_keeps_one_activation_per_block``).

Targets printed as MET / NOT MET: fused temporary memory at most 0.5x Flax's,
and fused steps/s within 10% of unfused (at least 0.9x).

Run ``python benchmarks/bench_fused.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

try:
    import _common
    import bench_cnn
    import bench_train
except ImportError:  # imported as part of a package
    from benchmarks import _common, bench_cnn, bench_train

_common.use_checkout()

__all__ = ["main", "make_cnn_workload", "make_workload"]

CONTENDERS = ("jaxbn-fused", "jaxbn-unfused", "flax")
MEMORY_TARGET = 0.5  # fused temp memory at most this times Flax's
SPEED_TARGET = 0.9  # fused steps/s at least this times unfused (within 10%)
WIDE = (784, 1024, 1024, 1024, 1024, 10)


def make_workload(
    layer_sizes: tuple[int, ...], *, batch_size: int, num_examples: int, lr: float
) -> bench_train.Workload:
    """The unfused leaky-ReLU MLP, its data and initial parameters.

    Args:
        layer_sizes: ``(inputs, hidden..., classes)``.
        batch_size: examples per step.
        num_examples: size of the synthetic training set.
        lr: SGD learning rate.

    Returns:
        A ``bench_train.Workload`` (its ``model`` is the unfused MLP).
    """
    import jax

    from jaxbn import MLP, data

    ds = data.make_blobs(
        num_examples=num_examples, num_features=layer_sizes[0], num_classes=layer_sizes[-1]
    )
    model = MLP(layer_sizes, activation="leaky_relu", momentum=0.99, eps=1e-5)
    params, state = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(bench_train.NUM_BATCHES):
        idx = rng.choice(ds.x_train.shape[0], batch_size, replace=False)
        batches.append((ds.x_train[idx], ds.y_train[idx]))
    return bench_train.Workload(
        "wide" if layer_sizes == WIDE else "custom",
        model,
        batch_size,
        lr,
        ds.x_train,
        ds.y_train,
        batches,
        params,
        state,
    )


def make_cnn_workload(
    *, channels: tuple[int, ...], image_size: int, batch_size: int, lr: float
) -> bench_cnn.CnnWorkload:
    """The unfused leaky-ReLU CNN of ``bench_cnn.py``, its data and initial parameters."""
    wl = bench_cnn.make_workload(
        channels=channels, image_size=image_size, batch_size=batch_size, lr=lr
    )
    # The same params and state: the activation is no parameter.
    return dataclasses.replace(wl, model=dataclasses.replace(wl.model, activation="leaky_relu"))


def build(name: str, wl, opt) -> bench_train.Contender:
    """One contender, by name, with ``bench_train``'s or ``bench_cnn``'s builders."""
    builders = bench_cnn if isinstance(wl, bench_cnn.CnnWorkload) else bench_train
    if name == "jaxbn-fused":
        fused = dataclasses.replace(wl, model=dataclasses.replace(wl.model, fuse_activation=True))
        return builders.build_jaxbn_jit(fused, opt)
    if name == "jaxbn-unfused":
        return builders.build_jaxbn_jit(wl, opt)
    return builders.build_flax_jit(wl, opt)


def _calibrate(c: bench_train.Contender, min_time: float, warmup: int) -> int:
    """Steps per run so that one run lasts about ``min_time`` seconds."""
    for _ in range(warmup):
        _common.block(c.run(1))
    n, rate = 1, 0.0
    while True:
        elapsed = _common._timed_run(c, n)
        rate = max(rate, n / max(elapsed, 1e-9))
        if elapsed >= min_time / 4 or n >= 1 << 20:
            break
        n *= 2
    return max(1, round(rate * min_time))


def time_interleaved(
    contenders: dict[str, bench_train.Contender], *, reps: int, warmup: int, min_time: float
) -> dict[str, dict[str, Any]]:
    """Times ``reps`` rounds, one run of each contender per round.

    Returns:
        Per contender: ``steps_per_s`` (steps per run / median run time),
        ``steps_per_run`` and ``times_s`` (every run's time, in round order).
    """
    steps = {k: _calibrate(c, min_time, warmup) for k, c in contenders.items()}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(reps):
        for k, c in contenders.items():
            times[k].append(_common._timed_run(c, steps[k]))
    return {
        k: {
            "steps_per_s": steps[k] / statistics.median(times[k]),
            "steps_per_run": steps[k],
            "times_s": times[k],
        }
        for k in contenders
    }


def _paired_ratio(speed: dict[str, dict[str, Any]], a: str, b: str) -> float | None:
    """Median over the rounds of ``a``'s steps/s over ``b``'s."""
    if a not in speed or b not in speed:
        return None
    ra = [speed[a]["steps_per_run"] / t for t in speed[a]["times_s"]]
    rb = [speed[b]["steps_per_run"] / t for t in speed[b]["times_s"]]
    return statistics.median(x / y for x, y in zip(ra, rb, strict=True))


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The two targets with their figures; ``met`` is ``None`` where not measured."""
    c = results["contenders"]
    mem = (c.get("jaxbn-fused", {}).get("memory") or {}).get("temp_vs_flax")
    speed = results.get("fused_vs_unfused_steps")
    return [
        {
            "target": f"fused temp memory <= {MEMORY_TARGET}x Flax",
            "value": mem,
            "met": None if mem is None else mem <= MEMORY_TARGET,
        },
        {
            "target": f"fused steps/s within {round(100 * (1 - SPEED_TARGET))}% of unfused",
            "value": speed,
            "met": None if speed is None else speed >= SPEED_TARGET,
        },
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Training-step memory and speed of batch norm fused with leaky ReLU "
        "(jaxbn fused, jaxbn unfused, Flax)."
    )
    p.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp: the wide MLP (--layer-sizes); cnn: bench_cnn.py's CNN (--channels)",
    )
    p.add_argument(
        "--channels",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        default=(64, 64, 64, 64),
        metavar="C1,C2,...",
        help="--model cnn: output channels of each block",
    )
    p.add_argument("--image-size", type=int, default=32, help="--model cnn: image height/width")
    p.add_argument(
        "--layer-sizes",
        type=lambda s: tuple(int(v) for v in s.split("-")),
        default=WIDE,
        metavar="SIZES",
        help="network as inputs-hidden...-classes (default: 784-1024-1024-1024-1024-10)",
    )
    p.add_argument("--batch-size", type=int, help="examples per step (default: 512 mlp, 128 cnn)")
    p.add_argument("--examples", type=int, default=10240, help="--model mlp: training examples")
    p.add_argument("--lr", type=float, help="SGD learning rate (default: 0.1 mlp, 0.01 cnn)")
    p.add_argument("--reps", type=int, default=7, help="interleaved timing rounds (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before calibration")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds each timed run lasts")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: a tiny network, short runs (numbers meaningless)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark; prints the tables and the targets; returns the results.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        A dict with ``machine``, the settings, ``contenders`` (per contender:
        ``memory`` with ``temp_bytes``, ``output_bytes``, ``temp_vs_flax``;
        ``steps_per_s``; ``rel_err`` against jaxbn unfused after one step; a
        ``note``), ``fused_vs_unfused_steps`` and ``targets``.
    """
    import optax

    args = _parser().parse_args(argv)
    cnn = args.model == "cnn"
    sizes, batch, examples = args.layer_sizes, args.batch_size, args.examples
    channels, image_size = args.channels, args.image_size
    batch = batch or (128 if cnn else 512)
    lr = args.lr or (0.01 if cnn else 0.1)
    reps, warmup, min_time = args.reps, args.warmup, args.min_time
    if args.quick:
        sizes, batch, examples = (16, 32, 32, 4), 16, 256
        channels, image_size, batch = ((4, 4), 6, 8) if cnn else (channels, image_size, batch)
        reps, warmup, min_time = min(reps, 2), 1, 0.01
    info = _common.machine_info(("jax", "jaxlib", "numpy", "optax", "flax"))
    _common.print_machine(info)
    if cnn:
        wl = make_cnn_workload(channels=channels, image_size=image_size, batch_size=batch, lr=lr)
        network = f"{wl.label} (conv 3x3 + batch norm + leaky_relu blocks)"
    else:
        wl = make_workload(sizes, batch_size=batch, num_examples=examples, lr=lr)
        network = f"{'-'.join(map(str, sizes))} leaky_relu"
    print(
        f"network  {network}, batch {batch}, optax.sgd({lr}); "
        f"{reps} interleaved rounds of >= {min_time} s per contender\n"
    )
    opt = optax.sgd(lr)
    built: dict[str, bench_train.Contender] = {}
    entries: dict[str, dict[str, Any]] = {}
    want = None
    for name in CONTENDERS:
        entry: dict[str, Any] = {"steps_per_s": None, "memory": None, "note": ""}
        entries[name] = entry
        try:
            c = build(name, wl, opt)
        except bench_train.Unavailable as e:
            entry["note"] = str(e)
            print(f"note     {name} skipped: {e}")
            continue
        built[name] = c
        entry["memory"] = bench_train.memory_of(c)
        if name == "jaxbn-unfused":
            want = c.check
    for name, c in built.items():
        if c.check is not None and want is not None:
            entries[name]["rel_err"] = bench_train._rel_err(c.check, want)
    speed = time_interleaved(built, reps=reps, warmup=warmup, min_time=min_time)
    for name, s in speed.items():
        entries[name].update(s)
    flax_temp = (entries["flax"].get("memory") or {}).get("temp_bytes")
    for entry in entries.values():
        mem = entry["memory"]
        if mem is not None:
            mem["temp_vs_flax"] = mem["temp_bytes"] / flax_temp if flax_temp else None
    results = {
        "machine": info,
        "model": args.model,
        **({"case": wl.label} if cnn else {"layer_sizes": list(sizes)}),
        "batch_size": batch,
        "reps": reps,
        "min_time_s": min_time,
        "contenders": entries,
        "fused_vs_unfused_steps": _paired_ratio(speed, "jaxbn-fused", "jaxbn-unfused"),
    }
    results["targets"] = targets(results)
    _print(results)
    _common.write_json(args.json, results)
    return results


def _print(results: dict[str, Any]) -> None:
    mib = _common.MiB
    rows = []
    for name, e in results["contenders"].items():
        mem = e["memory"] or {}
        ratio = mem.get("temp_vs_flax")
        rows.append(
            [
                name,
                "" if not mem else f"{mem['temp_bytes'] / mib:.2f}",
                "" if ratio is None else f"{ratio:.2f}",
                "" if not mem else f"{mem['output_bytes'] / mib:.2f}",
                "n/a" if e["steps_per_s"] is None else f"{e['steps_per_s']:,.1f}",
                "" if e.get("rel_err") is None else f"{e['rel_err']:.0e}",
                e["note"],
            ]
        )
    headers = ["contender", "temp MiB", "temp / flax", "outputs MiB", "steps/s", "rel err", "note"]
    print(_common.format_table(headers, rows))
    ratio = results["fused_vs_unfused_steps"]
    if ratio is not None:
        print(f"\nfused / unfused steps/s (median of paired rounds): {ratio:.3f}")
    print("\ntargets")
    for t in results["targets"]:
        status = {True: "MET", False: "NOT MET", None: "NOT CHECKED"}[t["met"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {status:<11} {t['target']}: {value}")
    print(
        f"\nload average (1 min) at start {results['machine']['load_avg_1min']:.2f}, "
        f"at end {_common.load_average():.2f} (timings are noisy on a shared machine)"
    )


if __name__ == "__main__":
    main()
    sys.exit(0)

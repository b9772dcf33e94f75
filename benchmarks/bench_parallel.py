"""Times data-parallel training of the batch-norm MLP over 1, 2, 4 and 8 devices.

For every case (a network and a global batch, on synthetic data) and device
count ``n`` it measures, on a mesh of the first ``n`` devices
(:func:`jaxbn.train.data_mesh`):

- ``scan``: :func:`jaxbn.train.make_train_loop`, many steps per dispatch
  (batches drawn on the device), time per step;
- ``step``: ``jax.jit(make_train_step(..., mesh=mesh))``, one step per call on a
  batch already sharded over the devices, time per call;
- ``local``: the same step where each device normalizes with its own shard's
  statistics (no ``axis_name`` on the model; loss and gradients still averaged
  over the devices). ``step - local`` is what synchronizing batch norm's
  statistics (its all-reduces) costs;
- the number of all-reduce ops in the compiled HLO of each step
  (``jax.jit(...).lower(...).compile().as_text()``; XLA may combine several
  reductions into one op, and counts each such op once).

With ``n = 1`` the rows are the plain single-device program (no ``shard_map``),
the reference the others are compared with.

The forced CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8``,
set by this script before JAX is imported unless already set) share the
machine's cores: on a machine with fewer cores than devices this shows the
overhead of data parallelism, not its scaling.

Run ``python benchmarks/bench_parallel.py --help`` for the flags.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import argparse
import dataclasses
import re
from collections.abc import Sequence

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

import jax  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxbn.data import make_blobs  # noqa: E402
from jaxbn.mlp import MLP  # noqa: E402
from jaxbn.train import data_mesh, init_train_state, make_train_loop, make_train_step  # noqa: E402

__all__ = ["Case", "count_all_reduces", "main"]


@dataclasses.dataclass(frozen=True)
class Case:
    """A network (``layer_sizes``, activation) trained at a global batch size."""

    name: str
    layer_sizes: tuple[int, ...]
    activation: str
    batch_size: int
    num_examples: int


CASES = (
    # Ioffe & Szegedy (2015), Section 4.1: 3 x 100 sigmoid units (here on 64 inputs).
    Case("mlp_64-100x3-10_sigmoid_b480", (64, 100, 100, 100, 10), "sigmoid", 480, 6000),
    Case("mlp_784-1024x4-10_relu_b512", (784, 1024, 1024, 1024, 1024, 10), "relu", 512, 5000),
)
QUICK_CASES = (Case("mlp_16-32x2-4_sigmoid_b48", (16, 32, 32, 4), "sigmoid", 48, 200),)
DEVICE_COUNTS = (1, 2, 4, 8)

_ALL_REDUCE = re.compile(r"\sall-reduce(?:-start)?\(")


def count_all_reduces(hlo_text: str) -> int:
    """The number of all-reduce ops (``all-reduce`` or ``all-reduce-start``) in HLO text."""
    return len(_ALL_REDUCE.findall(hlo_text))


def _compiled_all_reduces(fn, *args) -> int:
    return count_all_reduces(fn.lower(*args).compile().as_text())


def run_case(case: Case, counts: Sequence[int], *, steps: int, reps: int, warmup: int) -> dict:
    """Times one case for every device count; returns a dict with one row per count."""
    model = MLP(case.layer_sizes, activation=case.activation)
    opt = optax.sgd(0.01, momentum=0.9)
    data = make_blobs(
        num_examples=case.num_examples,
        num_features=case.layer_sizes[0],
        num_classes=case.layer_sizes[-1],
        test_fraction=0.1,
        seed=0,
    )
    x, labels = data.x_train, data.y_train
    ts0 = init_train_state(model, opt, jax.random.key(0))
    batch = (x[: case.batch_size], labels[: case.batch_size])
    rows = []
    for n in counts:
        mesh = None if n == 1 else data_mesh(n)
        row = {"devices": n}
        run = make_train_loop(model, opt, batch_size=case.batch_size, mesh=mesh)
        t = _common.time_calls(lambda run=run: run(ts0, x, labels, steps), reps=reps, warmup=warmup)
        row["scan_s_per_step"] = t.median / steps
        row["scan"] = t.summary()

        step = jax.jit(make_train_step(model, opt, mesh=mesh))
        args = (ts0.params, ts0.state, ts0.opt_state, batch)
        if mesh is not None:
            specs = (P(), P(), P(), P("data"))
            args = jax.device_put(args, tuple(NamedSharding(mesh, s) for s in specs))
        t = _common.time_calls(lambda step=step, args=args: step(*args), reps=reps, warmup=warmup)
        row["step_s"] = t.median
        row["step"] = t.summary()
        row["all_reduces_step"] = _compiled_all_reduces(step, *args)

        if mesh is not None:
            local_body = make_train_step(model, opt, axis_name="data")
            local = jax.jit(
                jax.shard_map(
                    local_body,
                    mesh=mesh,
                    in_specs=specs,
                    # Each device keeps its own running statistics (no reduction).
                    out_specs=(P(), P("data"), P(), P()),
                )
            )
            t = _common.time_calls(
                lambda local=local, args=args: local(*args), reps=reps, warmup=warmup
            )
            row["local_s"] = t.median
            row["local"] = t.summary()
            row["all_reduces_local"] = _compiled_all_reduces(local, *args)
            row["sync_cost_s"] = row["step_s"] - row["local_s"]
        rows.append(row)
        print(f"  {case.name}: {n} device(s) done", flush=True)
    base = rows[0]
    for row in rows:
        row["scan_ratio_to_1"] = row["scan_s_per_step"] / base["scan_s_per_step"]
        row["step_ratio_to_1"] = row["step_s"] / base["step_s"]
    return {
        "name": case.name,
        "layer_sizes": list(case.layer_sizes),
        "activation": case.activation,
        "batch_size": case.batch_size,
        "num_batch_norm_layers": len(case.layer_sizes) - 2,
        "rows": rows,
    }


def _ms(v):
    return None if v is None else f"{v * 1e3:.3f}"


def _table(results: list[dict]) -> str:
    headers = [
        "case",
        "devices",
        "scan ms/step",
        "x 1 dev",
        "step ms/call",
        "x 1 dev",
        "local-stats ms",
        "sync cost ms",
        "all-reduces (sync)",
        "all-reduces (local)",
    ]
    rows = []
    for res in results:
        for r in res["rows"]:
            rows.append(
                [
                    res["name"],
                    r["devices"],
                    _ms(r["scan_s_per_step"]),
                    f"{r['scan_ratio_to_1']:.2f}",
                    _ms(r["step_s"]),
                    f"{r['step_ratio_to_1']:.2f}",
                    _ms(r.get("local_s")),
                    _ms(r.get("sync_cost_s")),
                    r["all_reduces_step"],
                    r.get("all_reduces_local"),
                ]
            )
    return _common.format_table(headers, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time data-parallel training steps over forced CPU devices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=list(DEVICE_COUNTS),
        help="device counts to run (each must be <= the number of devices)",
    )
    p.add_argument("--steps", type=int, default=50, help="training steps per scan dispatch")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument(
        "--quick", action="store_true", help="a tiny case, few steps and repetitions (smoke test)"
    )
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    return p


NOTE = (
    "The {devices} devices are forced CPU devices sharing this machine's {cores} core(s): "
    "the numbers show the overhead of data parallelism (shard_map, per-device dispatch, "
    "all-reduces through memory), not scaling; real scaling needs one accelerator (or "
    "host) per device."
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; prints the table; returns (and optionally writes) results.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        A dict with ``machine``, ``device_count``, ``note``, the settings and
        ``cases``: per case, ``rows`` with, per device count, the median times
        (``scan_s_per_step``, ``step_s``, ``local_s``, ``sync_cost_s``), the
        ratios to one device and the all-reduce counts.
    """
    args = _parser().parse_args(argv)
    cases = QUICK_CASES if args.quick else CASES
    steps, reps, warmup = args.steps, args.reps, args.warmup
    if args.quick:
        steps, reps, warmup = min(steps, 5), min(reps, 3), 1
    available = jax.device_count()
    counts = sorted(set(args.devices))
    if counts[0] < 1 or counts[-1] > available:
        raise SystemExit(
            f"--devices {counts}: only {available} device(s) are available; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={counts[-1]} before starting"
        )
    info = _common.machine_info(("jax", "jaxlib", "numpy", "optax"))
    _common.print_machine(info)
    note = NOTE.format(devices=available, cores=info["cores"])
    print(f"devices  {available} x {jax.devices()[0].platform}")
    print(f"timing   median of {reps} reps after {warmup} warm-up calls; scan: {steps} steps\n")

    results = []
    for case in cases:
        for n in counts:
            if case.batch_size % n:
                raise SystemExit(
                    f"batch size {case.batch_size} of {case.name} is not divisible by {n}"
                )
        results.append(run_case(case, counts, steps=steps, reps=reps, warmup=warmup))
    print()
    print(_table(results))
    print(
        "\nall-reduces: ops in the compiled step (XLA may merge several reductions into one "
        "op). sync cost: step - local-stats, the price of synchronized batch norm."
    )
    print(f"note: {note}")
    print(
        f"load average (1 min) at start {info['load_avg_1min']:.2f}, "
        f"at end {_common.load_average():.2f} (other processes add noise)"
    )
    out = {
        "machine": info,
        "device_count": available,
        "note": note,
        "steps_per_dispatch": steps,
        "reps": reps,
        "warmup": warmup,
        "cases": results,
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()

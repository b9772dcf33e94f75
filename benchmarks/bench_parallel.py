"""Data-parallel training of the batch-norm MLP over 1, 2, 4 and 8 devices.

Per case and device count, interleaved: ``scan`` (:func:`jaxbn.train.make_train_loop`,
per step), ``step`` (``make_train_step(..., mesh=mesh)`` per call) and ``local``
(each device's own statistics: ``step - local`` is the cost of synchronizing),
with the all-reduces of each compiled step. Forced CPU devices (set here unless
``XLA_FLAGS`` sets them) share the cores: they show the overhead, not scaling.
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


def run_case(case: Case, counts: Sequence[int], *, steps: int, timing: dict) -> dict:
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
        loop = make_train_loop(model, opt, batch_size=case.batch_size, mesh=mesh)
        fns = {"step": jax.jit(make_train_step(model, opt, mesh=mesh))}
        args = (ts0.params, ts0.state, ts0.opt_state, batch)
        if mesh is not None:
            specs = (P(), P(), P(), P("data"))
            args = jax.device_put(args, tuple(NamedSharding(mesh, s) for s in specs))
            # Each device keeps its own running statistics (no reduction).
            local = make_train_step(model, opt, axis_name="data")
            out_specs = (P(), P("data"), P(), P())
            fns["local"] = jax.jit(
                jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs)
            )
        runs = {k: _common.calls(f, *args) for k, f in fns.items()}
        runs["scan"] = _common.calls(loop, ts0, x, labels, steps)
        t = _common.interleave(runs, **timing)
        row = {"devices": n, "scan_s_per_step": t["scan"]["median_s"] / steps, "timings": t}
        for k, f in fns.items():
            row[f"{k}_s"] = t[k]["median_s"]
            row[f"all_reduces_{k}"] = count_all_reduces(f.lower(*args).compile().as_text())
        if mesh is not None:
            row["sync_cost_s"] = row["step_s"] - row["local_s"]
        rows.append(row)
        print(f"  {case.name}: {n} device(s) done", flush=True)
    for row in rows:
        row["scan_ratio_to_1"] = row["scan_s_per_step"] / rows[0]["scan_s_per_step"]
        row["step_ratio_to_1"] = row["step_s"] / rows[0]["step_s"]
    return {"name": case.name, "num_batch_norm_layers": len(case.layer_sizes) - 2, "rows": rows}


COLUMNS = (
    ("case", "case"),
    ("devices", "devices"),
    ("scan ms/step", "scan_s_per_step", ".3f", 1e3),
    ("x 1 dev", "scan_ratio_to_1", ".2f"),
    ("step ms/call", "step_s", ".3f", 1e3),
    ("x 1 dev", "step_ratio_to_1", ".2f"),
    ("local-stats ms", "local_s", ".3f", 1e3),
    ("sync cost ms", "sync_cost_s", ".3f", 1e3),
    ("all-reduces (sync)", "all_reduces_step"),
    ("all-reduces (local)", "all_reduces_local"),
)


NOTE = (
    "The {devices} devices are forced CPU devices sharing this machine's {cores} core(s): "
    "the numbers show the overhead of data parallelism (shard_map, per-device dispatch, "
    "all-reduces through memory), not scaling; real scaling needs one accelerator (or "
    "host) per device."
)


def _parser():
    """The command-line flags."""
    p = _common.parser("Data-parallel training steps over forced CPU devices.", reps=15, warmup=2)
    p.add_argument("--devices", type=int, nargs="+", default=list(DEVICE_COUNTS))
    p.add_argument("--steps", type=int, default=50, help="training steps per scan dispatch")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the table; returns the results."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.steps, args.reps, args.warmup = min(args.steps, 5), min(args.reps, 3), 1
    available, counts = jax.device_count(), sorted(set(args.devices))
    if counts[0] < 1 or counts[-1] > available:
        raise SystemExit(
            f"--devices {counts}: only {available} device(s) are available; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={counts[-1]} before starting"
        )
    info = _common.machine_info(__file__, argv)
    note = NOTE.format(devices=available, cores=info["cores"])
    timing = _common.timing(args)
    results = []
    for case in QUICK_CASES if args.quick else CASES:
        if any(case.batch_size % n for n in counts):
            raise SystemExit(f"batch size {case.batch_size} of {case.name} is not divisible")
        results.append(run_case(case, counts, steps=args.steps, timing=timing))
    print(
        "\n" + _common.table([dict(r, case=c["name"]) for c in results for r in c["rows"]], COLUMNS)
    )
    print("\nsync cost: step - local-stats, the price of synchronized batch norm.")
    print(f"note: {note}")
    out = {"machine": info, "device_count": available, "note": note, "cases": results}
    return _common.finish(args, out)


if __name__ == "__main__":
    main()

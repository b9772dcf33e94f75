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

from collections.abc import Sequence

import _common
import jax
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn.data import make_blobs
from jaxbn.mlp import MLP
from jaxbn.train import data_mesh, init_train_state, make_train_loop, make_train_step

CASES = {  # name: (layer sizes, activation, global batch, training examples)
    # Ioffe & Szegedy (2015), Section 4.1: 3 x 100 sigmoid units (here on 64 inputs).
    "mlp_64-100x3-10_sigmoid_b480": ((64, 100, 100, 100, 10), "sigmoid", 480, 6000),
    "mlp_784-1024x4-10_relu_b512": ((784, 1024, 1024, 1024, 1024, 10), "relu", 512, 5000),
}
QUICK_CASES = {"mlp_16-32x2-4_sigmoid_b48": ((16, 32, 32, 4), "sigmoid", 48, 200)}
DEVICE_COUNTS = (1, 2, 4, 8)


def run_case(name: str, case: tuple, counts: Sequence[int], *, steps: int, timing: dict) -> dict:
    """Times one case of :data:`CASES` for every device count; one row per count."""
    sizes, activation, batch_size, n = case
    model, opt = MLP(sizes, activation=activation), optax.sgd(0.01, momentum=0.9)
    data = make_blobs(
        num_examples=n, num_features=sizes[0], num_classes=sizes[-1], test_fraction=0.1
    )
    x, labels = data.x_train, data.y_train
    ts0 = init_train_state(model, opt, jax.random.key(0))
    batch = (x[:batch_size], labels[:batch_size])
    rows = []
    for n in counts:
        mesh = None if n == 1 else data_mesh(n)
        loop = make_train_loop(model, opt, batch_size=batch_size, mesh=mesh)
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
            row[f"all_reduces_{k}"] = _common.count_all_reduces(f.lower(*args).compile().as_text())
        if mesh is not None:
            row["sync_cost_s"] = row["step_s"] - row["local_s"]
        rows.append(row)
        print(f"  {name}: {n} device(s) done", flush=True)
    for row in rows:
        row["scan_ratio_to_1"] = row["scan_s_per_step"] / rows[0]["scan_s_per_step"]
        row["step_ratio_to_1"] = row["step_s"] / rows[0]["step_s"]
    return {"name": name, "num_batch_norm_layers": len(sizes) - 2, "rows": rows}


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
    for name, case in (QUICK_CASES if args.quick else CASES).items():
        if any(case[2] % n for n in counts):
            raise SystemExit(f"batch size {case[2]} of {name} is not divisible by {counts}")
        results.append(run_case(name, case, counts, steps=args.steps, timing=timing))
    rows = [dict(row, case=c["name"]) for c in results for row in c["rows"]]
    print("\n" + _common.table(rows, COLUMNS))
    print("\nsync cost: step - local-stats, the price of synchronized batch norm.")
    print(f"note: {note}")
    out = {"machine": info, "device_count": available, "note": note, "cases": results}
    return _common.finish(args, out)


if __name__ == "__main__":
    main()

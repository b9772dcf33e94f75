"""What crossing processes costs: 1 process x 4 devices against 2 processes x 2 devices.

The paper's MLP, synchronized batch norm, a global batch of 240 over four CPU
devices: in one process, then in two on this machine (``jaxbn.distributed``,
``gloo``). Each reports the time per step of the scan loop (chunks of
``--steps-per-chunk`` steps) and the all-reduces in the compiled step.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
from collections.abc import Sequence

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

BATCH_SIZE = 240
LAYERS = (64, 100, 100, 100, 10)


def worker(spec: dict) -> dict:
    """One process of a configuration: its timing and all-reduce count.

    ``spec``: ``coordinator``, ``processes``, ``process_id``, ``devices`` (per
    process), ``steps_per_chunk`` and ``repeats``.
    """
    from jaxbn import distributed

    if spec["processes"] > 1:
        distributed.initialize(
            spec["coordinator"],
            spec["processes"],
            spec["process_id"],
            local_device_count=spec["devices"],
        )
    else:
        import jax

        jax.config.update("jax_num_cpu_devices", spec["devices"])
    import jax
    import numpy as np
    import optax

    import jaxbn
    from jaxbn.data import load_digits
    from jaxbn.train import data_mesh, init_train_state, make_train_loop, make_train_step

    data = load_digits()
    model, opt, mesh = jaxbn.MLP(LAYERS), optax.sgd(0.01, momentum=0.9), data_mesh()
    loop = make_train_loop(model, opt, batch_size=BATCH_SIZE, mesh=mesh)
    ts = [init_train_state(model, opt, jax.random.key(0))]

    def chunk(n):
        for _ in range(n):
            ts[0], metrics = loop(ts[0], data.x_train, data.y_train, spec["steps_per_chunk"])
        return metrics

    # Every process makes the same calls (the collectives pair up): no idle waits.
    timing = _common.interleave({"scan": chunk}, reps=spec["repeats"], warmup=1, quiet=False)
    # The all-reduces of one compiled step, on a global batch of this process's rows.
    xs, ys = distributed.global_batches(
        mesh, np.arange(BATCH_SIZE)[None], data.x_train, data.y_train
    )
    batch = (xs.reshape(xs.shape[1:]), ys.reshape(ys.shape[1:]))
    step = jax.jit(make_train_step(model, opt, mesh=mesh))
    params, state = model.init(jax.random.key(0))
    hlo = step.lower(params, state, opt.init(params), batch).compile().as_text()
    times = [1e3 * t / spec["steps_per_chunk"] for t in timing["scan"]["times_s"]]
    return {"ms_per_step": times, "all_reduces": len(re.findall(r"\ball-reduce(?:-start)?\(", hlo))}


def configuration(processes: int, devices: int, args) -> list[dict]:
    """Runs one configuration in fresh processes; returns each process's report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    spec = {
        "coordinator": coordinator,
        "processes": processes,
        "devices": devices,
        "steps_per_chunk": args.steps_per_chunk,
        "repeats": args.repeats,
    }
    procs = []
    for pid in range(processes):
        flag = json.dumps(dict(spec, process_id=pid))
        cmd = [sys.executable, __file__, "--worker", flag]
        procs.append(
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def _parser():
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-per-chunk", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--worker", type=json.loads, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs both configurations, prints their timings; returns the results."""
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker)), flush=True)
        return {}
    info = _common.machine_info(__file__, argv)
    print(f"paper MLP {'-'.join(map(str, LAYERS))}, global batch {BATCH_SIZE}, 4 CPU devices")
    results, rows = {"machine": info}, []
    for name, (processes, devices) in {"1x4": (1, 4), "2x2": (2, 2)}.items():
        reports = configuration(processes, devices, args)
        times, all_reduces = sorted(reports[0]["ms_per_step"]), reports[0]["all_reduces"]
        median = statistics.median(times)
        results[name] = {
            "ms_per_step_median": median,
            "ms_per_step": times,
            "all_reduces_per_step": all_reduces,
        }
        label = f"{processes} process(es) x {devices} devices"
        spread = f"{times[0]:.2f}-{times[-1]:.2f}"
        rows.append([label, f"{median:.2f}", spread, all_reduces])
    columns = (("configuration", 0), ("ms/step median", 1), ("min-max", 2), ("all-reduces", 3))
    print(_common.table([dict(enumerate(row)) for row in rows], columns))
    ratio = results["2x2"]["ms_per_step_median"] / results["1x4"]["ms_per_step_median"]
    print(f"crossing processes: {ratio:.2f}x the time per step of one process")
    results["ratio_2x2_over_1x4"] = ratio
    return _common.finish(args, results)


if __name__ == "__main__":
    main()

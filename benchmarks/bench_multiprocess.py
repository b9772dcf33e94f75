"""What crossing processes costs: 1 process x 4 devices against 2 processes x 2 devices.

The same data-parallel training (the paper's MLP, synchronized batch norm, a global
batch split over four CPU devices) runs once in one process holding all four devices
and once in two processes on this machine holding two each (``jaxbn.distributed``:
a coordinator on localhost, ``gloo`` collectives between the processes). Each
configuration reports the median time per training step of the scan loop (chunks of
``--chunk`` steps, after a warm-up chunk) and the number of all-reduces in the
compiled training step, read from its HLO.

    python benchmarks/bench_multiprocess.py [--steps-per-chunk 50] [--repeats 5]

This script starts its workers itself (it runs itself with ``--worker``); the two
configurations run one after the other, each alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

BATCH_SIZE = 240
LAYERS = (64, 100, 100, 100, 10)


def worker(args) -> dict:
    """One process of a configuration: returns its timings and all-reduce count."""
    from jaxbn import distributed

    if args.num_processes > 1:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            local_device_count=args.local_devices,
        )
    else:
        import jax

        jax.config.update("jax_num_cpu_devices", args.local_devices)
    import jax
    import numpy as np
    import optax

    import jaxbn
    from jaxbn.data import load_digits
    from jaxbn.train import data_mesh, init_train_state, make_train_loop, make_train_step

    data = load_digits()
    model, opt = jaxbn.MLP(LAYERS), optax.sgd(0.01, momentum=0.9)
    mesh = data_mesh()
    run = make_train_loop(model, opt, batch_size=BATCH_SIZE, mesh=mesh)
    ts = init_train_state(model, opt, jax.random.key(0))

    def chunk(ts):
        ts, metrics = run(ts, data.x_train, data.y_train, args.steps_per_chunk)
        jax.block_until_ready(metrics)
        return ts

    ts = chunk(ts)  # compile and warm up
    times = []
    for _ in range(args.repeats):
        began = time.perf_counter()
        ts = chunk(ts)
        times.append((time.perf_counter() - began) / args.steps_per_chunk * 1e3)

    # The all-reduces of one compiled data-parallel step (its HLO), on a global batch
    # of which this process provides its own rows.
    xs, ys = distributed.global_batches(
        mesh, np.arange(BATCH_SIZE)[None], data.x_train, data.y_train
    )
    batch = (xs.reshape(xs.shape[1:]), ys.reshape(ys.shape[1:]))
    step = jax.jit(make_train_step(model, opt, mesh=mesh))
    params, state = model.init(jax.random.key(0))
    hlo = step.lower(params, state, opt.init(params), batch).compile().as_text()
    return {
        "process": jax.process_index(),
        "ms_per_step": times,
        "all_reduces": len(re.findall(r"\ball-reduce(?:-start)?\(", hlo)),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configuration(num_processes: int, local_devices: int, args) -> list[dict]:
    """Runs one configuration in fresh processes; returns each process's report."""
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                "--coordinator",
                address,
                "--num-processes",
                str(num_processes),
                "--process-id",
                str(pid),
                "--local-devices",
                str(local_devices),
                "--steps-per-chunk",
                str(args.steps_per_chunk),
                "--repeats",
                str(args.repeats),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for pid in range(num_processes)
    ]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode:
            raise RuntimeError(f"worker failed:\n{err[-3000:]}")
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def main(argv=None) -> dict:
    """Runs both configurations and prints their timings and all-reduce counts.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``{"1x4": report, "2x2": report}`` with each configuration's median
        milliseconds per step (process 0's), their spread, and all-reduces per step.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-per-chunk", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--local-devices", type=int, default=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return {}

    import numpy as np

    results = {}
    for name, (num_processes, local_devices) in {"1x4": (1, 4), "2x2": (2, 2)}.items():
        reports = configuration(num_processes, local_devices, args)
        times = np.asarray(reports[0]["ms_per_step"])
        results[name] = {
            "processes": num_processes,
            "devices_per_process": local_devices,
            "ms_per_step_median": float(np.median(times)),
            "ms_per_step_min": float(times.min()),
            "ms_per_step_max": float(times.max()),
            "all_reduces_per_step": next(
                (r["all_reduces"] for r in reports if r["all_reduces"] is not None), None
            ),
        }
    print(f"paper MLP {'-'.join(map(str, LAYERS))}, global batch {BATCH_SIZE}, 4 CPU devices")
    print(f"{'configuration':<26}{'ms/step median':>16}{'min-max':>16}{'all-reduces':>13}")
    for r in results.values():
        label = f"{r['processes']} process(es) x {r['devices_per_process']} devices"
        spread = f"{r['ms_per_step_min']:.2f}-{r['ms_per_step_max']:.2f}"
        print(
            f"{label:<26}{r['ms_per_step_median']:>16.2f}{spread:>16}"
            f"{r['all_reduces_per_step'] or '-':>13}"
        )
    ratio = results["2x2"]["ms_per_step_median"] / results["1x4"]["ms_per_step_median"]
    print(f"crossing processes: {ratio:.2f}x the time per step of one process")
    results["ratio_2x2_over_1x4"] = ratio
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()

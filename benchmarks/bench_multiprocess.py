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
import socket
import subprocess
import sys
from collections.abc import Sequence

import _common

BATCH_SIZE = 240
LAYERS = (64, 100, 100, 100, 10)


def worker(spec: dict) -> dict:
    """One process of a configuration (``spec``): its timing and all-reduce count."""
    from jaxbn import distributed

    processes, devices = spec["processes"], spec["devices"]
    if processes > 1:
        coordinator, pid = spec["coordinator"], spec["process_id"]
        distributed.initialize(coordinator, processes, pid, local_device_count=devices)
    else:
        import jax

        jax.config.update("jax_num_cpu_devices", devices)
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

    def steps(n):
        ts[0], metrics = loop(ts[0], data.x_train, data.y_train, n)
        return metrics

    # Every process makes the same calls (the collectives pair up): no idle waits.
    chunk = {"scan": spec["steps_per_chunk"]}
    timing = _common.interleave(
        {"scan": steps}, reps=spec["repeats"], warmup=1, quiet=False, granularity=chunk
    )["scan"]
    # The all-reduces of one compiled step, on a global batch of this process's rows.
    xs, ys = distributed.global_batches(
        mesh, np.arange(BATCH_SIZE)[None], data.x_train, data.y_train
    )
    batch = (xs.reshape(xs.shape[1:]), ys.reshape(ys.shape[1:]))
    step = jax.jit(make_train_step(model, opt, mesh=mesh))
    params, state = model.init(jax.random.key(0))
    hlo = step.lower(params, state, opt.init(params), batch).compile().as_text()
    return dict(timing, all_reduces=_common.count_all_reduces(hlo))


def configuration(processes: int, devices: int, args) -> list[dict]:
    """Runs one configuration in fresh processes; returns each process's report."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    # Each worker sets its own device count; XLA's other flags are passed on.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags))
    spec = dict(vars(args), coordinator=coordinator, processes=processes, devices=devices)
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
    results = {"machine": info}
    for name, (processes, devices) in {"1x4": (1, 4), "2x2": (2, 2)}.items():
        report = configuration(processes, devices, args)[0]
        results[name] = dict(report, configuration=f"{processes} process(es) x {devices} devices")
    columns = (
        ("configuration", "configuration"),
        ("ms/step", "median_s", ".2f", 1e3),
        ("±IQR/2", "iqr_rel", ".0%"),
        ("all-reduces", "all_reduces"),
    )
    print(_common.table([results["1x4"], results["2x2"]], columns))
    ratio = results["2x2"]["median_s"] / results["1x4"]["median_s"]
    print(f"crossing processes: {ratio:.2f}x the time per step of one process")
    results["ratio_2x2_over_1x4"] = ratio
    return _common.finish(args, results)


if __name__ == "__main__":
    main()

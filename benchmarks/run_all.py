"""Runs every benchmark behind ``benchmarks/RESULTS.md`` and draws the chart.

    python benchmarks/run_all.py            # the CPU figures (about 45 min on 2 cores)
    python benchmarks/run_all.py --gpu      # on a GPU: the op, training, fused and CNN runs
    python benchmarks/run_all.py --quick    # tiny sizes: checks the wiring only

Each benchmark's printed output goes to ``<out>/<name>.txt`` and its numbers to
``<out>/<name>.json`` (``benchmarks/results``, or ``results/gpu``); a benchmark
that fails is reported and the others still run. On a GPU, ``JAX_PLATFORMS=cuda`` pins JAX
to it, the op's floor is the device's bandwidth, and the PyTorch contenders of
the training benchmarks (CPU only here) and the forced-CPU-device benchmarks
are left out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_JAX = [
    "jaxbn-scan",
    "jaxbn-scan-pregen",
    "jaxbn-jit",
    "jaxbn-remat-jit",
    "reference-jit",
    "flax-jit",
]
RUNS = {  # name: (script, flags on the CPU, flags on a GPU or None to leave it out)
    "op": ("bench_op.py", [], ["--platform", "gpu"]),
    "train": ("bench_train.py", [], ["--contenders", *TRAIN_JAX]),
    "cnn": (
        "bench_cnn.py",
        ["--conv-diagnostic"],
        ["--contenders", "jaxbn-scan", "jaxbn-jit", "flax-jit"],
    ),
    "fused": ("bench_fused.py", [], []),
    "fused_cnn": ("bench_fused.py", ["--model", "cnn"], ["--model", "cnn"]),
    "frameworks": ("bench_frameworks.py", [], []),
    "parallel": ("bench_parallel.py", [], None),
    "multiprocess": ("bench_multiprocess.py", [], None),
}
QUICK = {"multiprocess": ["--steps-per-chunk", "2", "--repeats", "1"]}


def commands(gpu: bool, quick: bool, out: str) -> dict[str, list[str]]:
    """``{name: argv}`` of every benchmark to run."""
    cmds = {}
    for name, (script, cpu_flags, gpu_flags) in RUNS.items():
        flags = gpu_flags if gpu else cpu_flags
        if flags is None:
            continue
        if quick:
            flags = [*flags, *QUICK.get(name, ["--quick"])]
        json_path = os.path.join(out, f"{name}.json")
        cmds[name] = [sys.executable, os.path.join(HERE, script), *flags, "--json", json_path]
    return cmds


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks; returns the number that failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="run on the GPU (refuses without one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (numbers meaningless)")
    p.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    p.add_argument("--out", help="results folder (default: benchmarks/results, or its gpu/)")
    args = p.parse_args(argv)
    args.out = args.out or os.path.join(HERE, "results", "gpu" if args.gpu else "")
    env = dict(os.environ, JAX_PLATFORMS="cuda" if args.gpu else "cpu")
    if args.gpu:
        check = [sys.executable, "-c", "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"]
        if subprocess.run(check, env=env, capture_output=True).returncode:
            print(
                "no GPU visible to JAX (JAX_PLATFORMS=cuda failed): nothing run.", file=sys.stderr
            )
            return 1
    os.makedirs(args.out, exist_ok=True)
    failed = []
    for name, cmd in commands(args.gpu, args.quick, args.out).items():
        if args.only and name not in args.only:
            continue
        print(f"+ {' '.join(cmd[1:])}", flush=True)
        with open(os.path.join(args.out, f"{name}.txt"), "w") as log:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            failed.append(name)
            print(f"  FAILED (exit {proc.returncode}): see {log.name}", flush=True)
    op, train = (os.path.join(args.out, f"{n}.json") for n in ("op", "train"))
    if os.path.exists(op) and os.path.exists(train):
        plot = [
            sys.executable,
            os.path.join(HERE, "plot_results.py"),
            "--op",
            op,
            "--train",
            train,
            "--out",
            os.path.join(
                HERE if args.out == os.path.join(HERE, "results", "") else args.out, "results.png"
            ),
        ]
        failed += [] if subprocess.run(plot).returncode == 0 else ["plot"]
    print(f"failed: {' '.join(failed)}" if failed else "all ran", file=sys.stderr)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

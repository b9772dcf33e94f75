"""Runs every benchmark behind ``benchmarks/RESULTS.md`` and draws the chart.

    python benchmarks/run_all.py            # the CPU figures (30-45 min on 2 cores, estimated)
    python benchmarks/run_all.py --gpu      # on a GPU: op, training, fused, CNN, frameworks
    python benchmarks/run_all.py --quick    # tiny sizes: checks the wiring only

Each benchmark's output goes to ``<out>/<name>.txt`` and ``<out>/<name>.json``
(``benchmarks/results``, or ``results/gpu``). On a GPU the op's floor is the
device's bandwidth; PyTorch's training (CPU here) and the forced-CPU-device
benchmarks are left out.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = {  # name: (the command on the CPU, on a GPU or None to leave it out)
    "op": ("bench_op.py", "bench_op.py --platform gpu"),
    "train": (
        "bench_train.py",
        "bench_train.py --contenders jaxbn-scan jaxbn-jit jaxbn-remat-jit reference-jit flax-jit",
    ),
    "cnn": (
        "bench_cnn.py --conv-diagnostic",
        "bench_cnn.py --contenders jaxbn-scan jaxbn-jit flax-jit",
    ),
    "fused": ("bench_fused.py", "bench_fused.py"),
    "fused_cnn": ("bench_fused.py --model cnn", "bench_fused.py --model cnn"),
    "frameworks": ("bench_frameworks.py", "bench_frameworks.py"),
    "parallel": ("bench_parallel.py", None),
    "multiprocess": ("bench_multiprocess.py", None),
}
QUICK = {"multiprocess": "--steps-per-chunk 2 --repeats 1"}


def commands(gpu: bool, quick: bool, out: str) -> dict[str, list[str]]:
    """``{name: argv}`` of every benchmark to run."""
    cmds = {}
    for name, (cpu, accelerator) in RUNS.items():
        command = accelerator if gpu else cpu
        if command is not None:
            script, *flags = command.split()
            flags += QUICK.get(name, "--quick").split() if quick else []
            json_path = os.path.join(out, f"{name}.json")
            cmds[name] = [sys.executable, os.path.join(HERE, script), *flags, "--json", json_path]
    return cmds


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmarks; returns the number that failed."""
    args = _parser().parse_args(argv)
    default_out = os.path.join(HERE, "results")
    out = args.out or (os.path.join(default_out, "gpu") if args.gpu else default_out)
    env = dict(os.environ, JAX_PLATFORMS="cuda" if args.gpu else "cpu")
    check = [sys.executable, "-c", "import jax, sys; sys.exit(jax.default_backend() != 'gpu')"]
    if args.gpu and subprocess.run(check, env=env, capture_output=True).returncode:
        print("no GPU visible to JAX (JAX_PLATFORMS=cuda failed): nothing run.", file=sys.stderr)
        return 1
    os.makedirs(out, exist_ok=True)
    failed = []
    for name, cmd in commands(args.gpu, args.quick, out).items():
        if args.only and name not in args.only:
            continue
        print(f"+ {' '.join(cmd[1:])}", flush=True)
        with open(os.path.join(out, f"{name}.txt"), "w") as log:
            if subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode:
                failed.append(name)
                print(f"  FAILED: see {log.name}", flush=True)
    op, train = (os.path.join(out, f"{n}.json") for n in ("op", "train"))
    if os.path.exists(op) and os.path.exists(train):
        import plot_results

        png = os.path.join(HERE if out == default_out else out, "results.png")
        plot_results.main(["--op", op, "--train", train, "--out", png])
    print(f"failed: {' '.join(failed)}" if failed else "all ran", file=sys.stderr)
    return len(failed)


def _parser():
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="run on the GPU (refuses without one)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (numbers meaningless)")
    p.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    p.add_argument("--out", help="results folder (default: benchmarks/results, or its gpu/)")
    return p


if __name__ == "__main__":
    sys.exit(main())

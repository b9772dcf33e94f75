"""The harness of every benchmark: machine, timing, own processes, memory, results.

A script builds one ``run(n)`` per contender (``n`` steps, inputs captured)
for :func:`interleave`: each is calibrated, then timed in rounds, one run of
each per round, so that a slow spell of the machine hits all alike, each run
started on idle CPUs right after an untimed one (no thread pool is timed
waking up); medians with the interquartile spread. PyTorch runs in its own
process (:func:`in_own_process`): its OpenMP threads spin after a call.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))


class Unavailable(Exception):
    """A contender cannot run here (the message says why)."""


# Importing the harness makes the checkout's jaxbn importable where none is installed.
if importlib.util.find_spec("jaxbn") is None:
    sys.path.insert(0, os.path.dirname(HERE))


def optional_import(name: str):
    """Imports a module, or returns ``None`` if it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cpu_count() -> int:
    """Number of CPU cores this process may run on (the harness reads Linux's ``/proc``)."""
    return len(os.sched_getaffinity(0))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


PACKAGES = ("jax", "jaxlib", "numpy", "optax", "flax", "equinox", "dm-haiku", "torch")


def machine_info(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """Prints and returns the date, the command (``script``'s), CPU, device, versions and load."""
    import jax

    device = jax.devices()[0]
    argv = sys.argv[1:] if argv is None else argv
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{os.path.basename(script)}", *argv]),
        "cpu": _cpu_model(),
        "cores": cpu_count(),
        "device": f"{device.platform}: {device.device_kind}",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
        "load_avg_1min": os.getloadavg()[0],
    }
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v is not None)
    print(f"date     {info['date']}\nmachine  {info['cpu']}, {info['cores']} cores, {info['os']}")
    print(f"device   {info['device']}\nsoftware python {info['python']}, {vers}")
    return info


def block(out: Any) -> Any:
    """Waits until every JAX array in the pytree ``out`` is computed; returns it."""
    if "jax" in sys.modules:
        return sys.modules["jax"].block_until_ready(out)
    return out


def _cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _own_ticks() -> float:
    """CPU time of every thread of this process so far, in ``/proc/stat`` jiffies."""
    return time.process_time() * os.sysconf("SC_CLK_TCK")


def wait_for_idle(*, busy_cores: float = 0.25, window: float = 0.05, timeout: float = 3.0) -> bool:
    """Sleeps until other processes keep under ``busy_cores`` cores busy (``False``: timed out).

    This process's own CPU time is not counted: its thread pools may keep
    spinning after a call, and counting them would make it wait for itself.
    """
    deadline = time.perf_counter() + timeout
    while True:
        t0, own0 = _cpu_ticks(), _own_ticks()
        if t0 is None:
            return False
        time.sleep(window)
        t1, own1 = _cpu_ticks(), _own_ticks()
        total = t1[1] - t0[1]
        others = max(t1[0] - t0[0] - (own1 - own0), 0)
        if total > 0 and others / total * cpu_count() < busy_cores:
            return True
        if time.perf_counter() > deadline:
            return False


def _summary(steps: int, times: list[float], busy_starts: int) -> dict[str, Any]:
    """Seconds per step and steps per second (medians of the runs) and the spread.

    ``iqr_rel``: half the interquartile range over the median (``None`` under 4
    runs); ``busy_starts``: runs that started while others kept the CPUs busy.
    """
    median, spread = statistics.median(times), None
    if len(times) >= 4:
        q1, _, q3 = statistics.quantiles(times, n=4)
        spread = (q3 - q1) / 2 / median
    return {
        "median_s": median / steps,
        "steps_per_s": steps / median,
        "steps_per_run": steps,
        "iqr_rel": spread,
        "reps": len(times),
        "busy_starts": busy_starts,
        "times_s": times,
    }


def calls(fn: Callable, *args) -> Callable[[int], Any]:
    """``run(n)``: ``n`` calls of ``fn(*args)``, returning the last result."""

    def run(n):
        for _ in range(n):
            out = fn(*args)
        return out

    return run


def _calibrate(run: Callable[[int], Any], granularity: int, min_time: float) -> int:
    """Steps (a multiple of ``granularity``) for a run of ``min_time`` s at the fastest rate seen.

    (A run slowed by another process must not make the timed runs short.)
    """
    n, rate = granularity, 0.0
    while True:
        t0 = time.perf_counter()
        block(run(n))
        elapsed = time.perf_counter() - t0
        rate = max(rate, n / max(elapsed, 1e-9))
        if elapsed >= min_time / 4 or n >= 1 << 24:
            break
        n *= 2
    return max(granularity, math.ceil(rate * min_time / granularity) * granularity)


def interleave(
    runs: dict[str, Callable[[int], Any]],
    *,
    reps: int,
    warmup: int,
    quiet: bool,
    min_time: float | None = None,
    granularity: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times every contender in ``reps`` rounds, one run of each per round; :func:`_summary` each.

    ``run(n)`` takes ``n`` more steps (calls) of a contender and returns
    something to wait for; ``granularity[name]`` is the number of steps its run
    needs (a scan loop's steps per dispatch; default 1). ``warmup`` untimed runs
    first; with ``quiet`` each timed run starts on idle CPUs right after an
    untimed run, so that the thread pools (XLA's, PyTorch's) that slept during
    the wait are awake, as steps follow each other in training. A timed run
    lasts ``min_time`` seconds (steps calibrated per contender) or one step.
    """
    granularity = granularity or {}
    steps, times, busy = {}, {name: [] for name in runs}, dict.fromkeys(runs, 0)
    for name, run in runs.items():
        g = granularity.get(name, 1)
        for _ in range(warmup):
            block(run(g))
        steps[name] = g if min_time is None else _calibrate(run, g, min_time)
    for _ in range(reps):
        for name, run in runs.items():
            if quiet:
                busy[name] += not wait_for_idle()
                block(run(granularity.get(name, 1)))
            t0 = time.perf_counter()
            block(run(steps[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: _summary(steps[name], times[name], busy[name]) for name in runs}


def in_own_process(worker: Callable, spec: dict, arrays: dict) -> tuple[dict, dict]:
    """Runs ``worker(spec, arrays) -> (result, arrays)`` in a new Python process.

    ``worker`` is a module-level function of a script; the spec and the result
    go as JSON, the arrays as ``.npz``. A failure raises :class:`Unavailable`.
    """
    folder, file = os.path.split(worker.__code__.co_filename)
    module = os.path.splitext(file)[0]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        np.savez(os.path.join(tmp, "in.npz"), **arrays)
        code = (
            f"import sys; sys.path[:0] = [{HERE!r}, {folder!r}]; import _common, {module}; "
            f"_common._serve({module}.{worker.__name__}, {tmp!r})"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"failed: {err[:80]}")
        with open(os.path.join(tmp, "out.json")) as f:
            result = json.load(f)
        with np.load(os.path.join(tmp, "out.npz")) as saved:
            return result, dict(saved)


def _serve(worker: Callable, folder: str) -> None:
    """The child side of :func:`in_own_process`."""
    with open(os.path.join(folder, "spec.json")) as f:
        spec = json.load(f)
    with np.load(os.path.join(folder, "in.npz")) as saved:
        result, arrays = worker(spec, dict(saved))
    np.savez(os.path.join(folder, "out.npz"), **arrays)
    with open(os.path.join(folder, "out.json"), "w") as f:
        json.dump(result, f)


def memory_of(step: Callable, *args) -> dict[str, int] | None:
    """Sizes in bytes from ``memory_analysis()`` of ``jax.jit(step)`` compiled for ``args``."""
    import jax

    mem = jax.jit(step).lower(*args).compile().memory_analysis()
    if mem is None:
        return None
    return {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
    }


def count_all_reduces(hlo_text: str) -> int:
    """The all-reduce ops (``all-reduce`` or ``all-reduce-start``) in compiled HLO text."""
    return len(re.findall(r"\sall-reduce(?:-start)?\(", hlo_text))


def rel_err(got: Sequence, want: Sequence) -> float:
    """Largest ``max |got - want| / max |want|`` over matching arrays (or numbers)."""
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        errs.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errs)


def fresh_buffer_cost(nbytes: int, *, reps: int = 7) -> float:
    """Extra seconds a copy of ``nbytes`` takes when its destination is newly allocated.

    A new large allocation comes as unmapped pages, each faulted on its first
    write; every jitted function returning new arrays pays that on each call.
    """
    src = np.ones(max(nbytes // 4, 1), np.float32)
    runs = {"fresh": calls(np.copy, src), "reused": calls(np.copyto, np.empty_like(src), src)}
    t = interleave(runs, reps=reps, warmup=1, quiet=False)
    return max(t["fresh"]["median_s"] - t["reused"]["median_s"], 0.0)


def parser(description: str, *, reps: int, warmup: int, min_time: float | None = None):
    """An argument parser with the flags every benchmark has."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=reps, help="timed rounds (median)")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed runs first")
    if min_time is not None:
        p.add_argument("--min-time", type=float, default=min_time, help="seconds per timed run")
    p.add_argument("--no-wait-idle", action="store_true", help="do not wait for idle CPUs")
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (numbers meaningless)")
    return p


def timing(args) -> dict[str, Any]:
    """:func:`interleave`'s settings from the flags of :func:`parser`.

    Timed runs start on idle CPUs unless ``--no-wait-idle`` or ``--quick``.
    """
    out = {"reps": args.reps, "warmup": args.warmup, "quiet": not (args.quick or args.no_wait_idle)}
    return dict(out, min_time=args.min_time) if hasattr(args, "min_time") else out


def fmt(value, spec: str = "", *, scale: float = 1.0, missing: str = "") -> str:
    """``format(value * scale, spec)``, ``str(value)`` without ``spec``, or ``missing``."""
    if value is None:
        return missing
    return format(value * scale, spec) if spec else str(value)


def table(rows: Sequence[dict], columns: Sequence[tuple]) -> str:
    """A Markdown table of dicts; a column ``(header, key, spec[, scale])`` shows ``fmt``'s cell."""
    cells = [[h for h, *_ in columns]]
    cells += [
        [fmt(r.get(key), *rest[:1], scale=(rest[1:] or [1])[0]) for _, key, *rest in columns]
        for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def finish(args, results: dict) -> dict:
    """Prints the load average, writes ``results`` to ``--json`` (if given); returns them."""
    start = results["machine"]["load_avg_1min"]
    print(f"\nload average (1 min) at start {start:.2f}, at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=lambda o: o.item())
            f.write("\n")
        print(f"wrote {args.json}")
    return results

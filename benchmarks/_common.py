"""Helpers shared by the benchmark scripts: machine description, timing, bandwidth.

Nothing here knows about batch normalization. A benchmark script builds a
zero-argument callable per contender (inputs captured once, outside the timing),
hands it to :func:`time_calls`, and reports medians with :func:`format_table`,
next to :func:`machine_info` and, for memory-bound ops, the copy bandwidth of
:func:`copy_bandwidth`.

Timing rules followed here: the callable is run ``warmup`` times first (so jit
compilation and first-touch page faults are excluded), every timed result is
waited for with ``block_until_ready()`` (through :func:`block`), and the
statistic reported is the median of the repetitions, with the spread kept too.
"""

from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Contender",
    "Timing",
    "Unavailable",
    "block",
    "copy_bandwidth",
    "cpu_count",
    "format_table",
    "fresh_buffer_cost",
    "host_loop",
    "load_average",
    "machine_info",
    "memory_of",
    "optional_import",
    "print_machine",
    "rel_err",
    "sgd_step",
    "time_calls",
    "time_steps",
    "use_checkout",
    "wait_for_idle",
    "write_json",
]

MiB = 1 << 20


def cpu_count() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _l3_cache() -> str | None:
    """Size of the last-level cache as the kernel reports it, e.g. ``'32768K'``."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        best = None
        for entry in sorted(os.listdir(base)):
            if not entry.startswith("index"):
                continue
            with open(os.path.join(base, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(base, entry, "size")) as f:
                size = f.read().strip()
            if best is None or level > best[0]:
                best = (level, size)
        return None if best is None else f"L{best[0]} {best[1]}"
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(packages: Iterable[str] = ("jax", "jaxlib", "numpy")) -> dict[str, Any]:
    """Describes the machine and software the numbers were measured on.

    Args:
        packages: distribution names whose installed versions to report
            (``None`` for one that is not installed).

    Returns:
        A JSON-serializable dict: date (UTC, ISO 8601), host CPU model, core
        count, last-level cache, OS, Python, the package versions and the load average.
    """
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": cpu_count(),
        "cache": _l3_cache(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in packages},
        "load_avg_1min": load_average(),
    }


def load_average() -> float:
    """One-minute load average (NaN where unavailable): other work adds noise."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def print_machine(info: dict[str, Any]) -> None:
    """Prints :func:`machine_info`'s dict in a few lines."""
    print(f"date     {info['date']}")
    print(f"machine  {info['cpu']}, {info['cores']} cores, {info['cache']}, {info['os']}")
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v is not None)
    print(f"software python {info['python']}, {vers}")


def use_checkout() -> None:
    """Makes ``import jaxbn`` work from a checkout that is not pip-installed.

    Puts the repository root (the parent of ``benchmarks/``) on ``sys.path``
    when no installed ``jaxbn`` is found; an installed one is left in charge.
    """
    if importlib.util.find_spec("jaxbn") is None:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def optional_import(name: str):
    """Imports a module, or returns ``None`` if it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def block(out: Any) -> Any:
    """Waits until every array in the pytree ``out`` is computed; returns it.

    JAX arrays are waited for with ``block_until_ready()``; anything else
    (NumPy or PyTorch CPU tensors, ``None``) is already computed.
    """
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


def wait_for_idle(*, busy_cores: float = 0.25, window: float = 0.05, timeout: float = 10.0) -> bool:
    """Sleeps until the other processes leave the CPUs (nearly) idle.

    On a machine shared with other work, a repetition that starts while
    another process computes measures that process too. This samples
    ``/proc/stat`` over ``window`` seconds until fewer than ``busy_cores``
    cores were busy with other processes' work, or ``timeout`` seconds have
    passed. This process's own CPU time is subtracted: its thread pools may
    keep spinning after a call (PyTorch's OpenMP threads do), and counting
    them would make it wait for itself.

    Returns:
        ``True`` if the machine was idle, ``False`` on timeout (or where
        ``/proc/stat`` does not exist).
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


@dataclass
class Timing:
    """Wall-clock times of the repetitions of one callable, in seconds."""

    times: list[float] = field(default_factory=list)
    busy_starts: int = 0

    @property
    def median(self) -> float:
        """Median time in seconds."""
        return statistics.median(self.times)

    @property
    def spread(self) -> float | None:
        """Relative half-width of the interquartile range (noise estimate).

        ``None`` with fewer than 4 repetitions.
        """
        if len(self.times) < 4:
            return None
        q1, _, q3 = statistics.quantiles(self.times, n=4)
        return (q3 - q1) / 2 / self.median

    def summary(self) -> dict[str, float | None]:
        """Median, minimum, interquartile spread and count, for JSON output."""
        return {
            "median_s": self.median,
            "min_s": min(self.times),
            "iqr_rel": self.spread,
            "reps": len(self.times),
            "busy_starts": self.busy_starts,
        }


def time_calls(
    fn: Callable[[], Any],
    *,
    reps: int = 15,
    warmup: int = 3,
    sync: Callable[[Any], Any] = block,
    quiet: bool = False,
    warm: Callable[[], Any] | None = None,
) -> Timing:
    """Times ``reps`` calls of ``fn`` after ``warmup`` untimed ones.

    Args:
        fn: zero-argument callable running the work once (inputs captured).
        reps: number of timed repetitions.
        warmup: untimed calls first (compilation, caches, page faults).
        sync: applied to each result inside the timed region, so that
            asynchronous work is finished before the clock stops
            (``block_until_ready`` for JAX).
        quiet: before each repetition, wait (up to 3 s) for other processes
            to leave the CPUs idle (:func:`wait_for_idle`); repetitions that
            had to start anyway are counted in ``Timing.busy_starts``. After
            the wait one untimed call runs first and the timed call follows it
            at once, as in a training loop: a thread pool that went to sleep
            during the wait (XLA's, PyTorch's OpenMP threads) is awake again,
            so its wake-up is not what is measured.
        warm: the untimed call of a quiet repetition (default ``fn``; a
            shorter one where ``fn`` is long, e.g. one step of a training run).

    Returns:
        A :class:`Timing` with one wall-clock time per repetition.
    """
    for _ in range(warmup):
        sync(fn())
    timing = Timing()
    for _ in range(reps):
        if quiet:
            if not wait_for_idle(timeout=3.0):
                timing.busy_starts += 1
            sync((fn if warm is None else warm)())
        t0 = time.perf_counter()
        sync(fn())
        timing.times.append(time.perf_counter() - t0)
    return timing


def copy_bandwidth(nbytes: int = 256 * MiB, *, reps: int = 7, quiet: bool = False) -> float:
    """Memory bandwidth of a large NumPy copy, in bytes per second.

    Copies an array of ``nbytes`` (far beyond any cache) with ``np.copyto`` and
    counts both the bytes read and the bytes written; returns the median over
    ``reps`` copies (after one untimed copy that faults the pages in). This is
    the speed a memory-bound kernel can hope for on one pass of streaming.

    Args:
        nbytes: size of the source array (256 MiB or more to defeat caches).
        reps: timed copies.
        quiet: start each copy on idle CPUs (see :func:`time_calls`).

    Returns:
        ``2 * nbytes / median_seconds``.
    """
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    timing = time_calls(
        lambda: np.copyto(dst, src), reps=reps, warmup=1, sync=lambda o: o, quiet=quiet
    )
    return 2 * src.nbytes / timing.median


def fresh_buffer_cost(nbytes: int, *, reps: int = 7) -> float:
    """Extra seconds a copy takes when its destination is newly allocated.

    A large allocation comes from the operating system as unmapped pages; the
    first write to each page faults. Functions that return new arrays (every
    jitted JAX function without buffer donation) pay this on every call, on top
    of the bandwidth cost; a copy into a reused buffer does not. Measured as
    ``median(np.copy(src)) - median(np.copyto(dst, src))`` for ``nbytes``.
    """
    src = np.ones(max(nbytes // 4, 1), np.float32)
    dst = np.empty_like(src)
    ident = lambda o: o  # noqa: E731
    fresh = time_calls(lambda: np.copy(src), reps=reps, warmup=1, sync=ident).median
    reused = time_calls(lambda: np.copyto(dst, src), reps=reps, warmup=1, sync=ident).median
    return max(fresh - reused, 0.0)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Formats rows as a plain-text table with aligned columns (Markdown pipes)."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(path: str | os.PathLike | None, results: Any) -> None:
    """Writes results (dicts, lists, dataclasses, numbers) as indented JSON.

    ``path=None`` (no ``--json`` given) writes nothing.
    """
    if path is None:
        return

    def default(o):
        if hasattr(o, "__dataclass_fields__"):
            return asdict(o)
        if isinstance(o, (np.floating, np.integer)):
            return o.item()
        raise TypeError(f"cannot serialize {type(o).__name__}")

    with open(path, "w") as f:
        json.dump(results, f, indent=2, default=default)
        f.write("\n")
    print(f"\nwrote {path}")


# --------------------------------------------------------------------------- training contenders
# A training benchmark builds one Contender per library: ``run(n)`` takes ``n``
# training steps (continuing from where the previous call stopped) and returns
# something to block on; ``check`` is ``(loss, canonical params)`` after one step
# from the shared initial parameters on the first batch; ``step_fn`` and
# ``step_args`` (JAX only) are the jittable step and its arguments, for
# :func:`memory_of`.


class Unavailable(Exception):
    """A contender cannot run (the message says why)."""


@dataclass
class Contender:
    """A ready-to-time training loop and what it is checked with."""

    run: Callable[[int], Any]
    granularity: int = 1
    check: tuple[float, list[np.ndarray]] | None = None
    step_fn: Callable | None = None
    step_args: tuple | None = None
    note: str = ""


def host_loop(step: Callable, carry: list, batches: Sequence) -> Callable[[int], Any]:
    """``run(n)``: ``n`` calls of the jitted ``step(*carry, batch)``, cycling through ``batches``.

    ``step`` returns ``(*new_carry, metrics)`` with a carry of three values
    (params, state, optimizer state); ``carry`` is a one-element list holding
    the current carry, updated in place.
    """
    pos = [0]

    def run(n):
        c = carry[0]
        for _ in range(n):
            out = step(*c, batches[pos[0] % len(batches)])
            c = out[:3]
            pos[0] += 1
        carry[0] = c
        return c

    return run


def sgd_step(loss_fn: Callable, opt) -> Callable:
    """The training step of ``jaxbn.train.make_train_step`` around any ``loss_fn``.

    ``loss_fn(params, state, x, labels) -> (loss, (new_state, logits))``; the
    step is ``(params, state, opt_state, (x, labels)) -> (params, state,
    opt_state, {"loss", "accuracy"})``, for peers whose state is not jaxbn's.
    """
    import jax
    import jax.numpy as jnp
    import optax

    def step(params, state, opt_state, batch):
        x, labels = batch
        (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, labels
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        acc = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        return params, new_state, opt_state, {"loss": loss, "accuracy": acc}

    return step


def rel_err(got, want) -> float:
    """Largest ``max |got - want| / max |want|`` over the loss and every parameter."""
    (loss_g, params_g), (loss_w, params_w) = got, want
    errs = [abs(loss_g - loss_w) / max(abs(loss_w), 1e-30)]
    for g, w in zip(params_g, params_w, strict=True):
        errs.append(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30)))
    return max(errs)


def _timed_run(c: Contender, n: int) -> float:
    t0 = time.perf_counter()
    block(c.run(n))
    return time.perf_counter() - t0


def _steps_for(rate: float, min_time: float, g: int) -> int:
    """Steps (a multiple of ``g``) that last ``min_time`` at ``rate`` steps per second."""
    return max(g, math.ceil(rate * min_time / g) * g)


def time_steps(
    c: Contender, *, reps: int, warmup: int, min_time: float, quiet: bool
) -> dict[str, Any]:
    """Calibrates the steps per run so a run lasts ``min_time``; times ``reps`` runs.

    Returns:
        A dict with ``steps_per_s`` (steps per run / median run time), the steps
        per run and :meth:`Timing.summary` of the run times.
    """
    g = c.granularity
    for _ in range(warmup):  # compilation, caches, first-touch pages
        block(c.run(g))
    # Steps per second from the fastest calibration run: a run slowed down by
    # another process must not make the timed runs short.
    n, rate = g, 0.0
    while True:  # double until one run is long enough to estimate from
        elapsed = _timed_run(c, n)
        rate = max(rate, n / max(elapsed, 1e-9))
        if elapsed >= min_time / 4 or n >= 1 << 24:
            break
        n *= 2
    for _ in range(2):  # runs at the estimate refine it
        elapsed = _timed_run(c, _steps_for(rate, min_time, g))
        rate = max(rate, _steps_for(rate, min_time, g) / max(elapsed, 1e-9))
    steps = _steps_for(rate, min_time, g)
    timing = time_calls(
        lambda: c.run(steps), reps=reps, warmup=0, quiet=quiet, warm=lambda: c.run(g)
    )
    out = {"steps_per_s": steps / timing.median, "steps_per_run": steps}
    out.update(timing.summary())
    return out


def memory_of(c: Contender) -> dict[str, int] | None:
    """Sizes from the compiled step's ``memory_analysis()``, in bytes."""
    import jax

    if c.step_fn is None:
        return None
    mem = jax.jit(c.step_fn).lower(*c.step_args).compile().memory_analysis()
    if mem is None:
        return None
    return {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "output_bytes": int(mem.output_size_in_bytes),
        "alias_bytes": int(mem.alias_size_in_bytes),
    }

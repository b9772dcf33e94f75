"""Times one batch-norm training step (forward and backward) against its peers.

For every case (a shape and a dtype, named ``batch_norm_<shape>_<dtype>``) each
contender runs, on the same inputs, the forward ``y`` and the gradients
``(dx, dscale, dbias)`` for a fixed upstream ``dy``:

- ``jaxbn``: ``jax.jit`` of ``jax.vjp`` of :func:`jaxbn.batch_norm` (its custom
  VJP), the vjp applied to ``dy`` inside the same jitted function;
- ``reference``: the same harness around :func:`jaxbn.reference.batch_norm`,
  differentiated by JAX autodiff;
- ``flax``: ``flax.linen.BatchNorm(use_running_average=False)`` with its other
  defaults (running statistics updated through the mutable ``batch_stats``),
  ``jax.vjp`` over ``x`` and the params; for low-precision ``x`` it is given
  ``dtype=x.dtype`` so that ``y`` keeps ``x``'s dtype like the others;
- ``torch``: ``torch.nn.functional.batch_norm(training=True)`` forward and
  ``y.backward(dy)`` on the CPU, all cores (on CUDA where the JAX contenders
  run on a GPU and PyTorch has CUDA; otherwise not timed there); a 4-D input is
  tried NCHW-contiguous and channels-last, and the faster layout is kept.
  PyTorch runs in a child process of its own, after the JAX contenders of the
  case: its OpenMP threads keep spinning after a call and would slow whatever
  runs next in the same process, so neither side disturbs the other's timing.

The **floor** of a case is the time to stream 8 arrays of ``x``'s size at the
copy bandwidth measured in the same run (``np.copyto`` on the CPU; on an
accelerator, a jitted elementwise negation of a large array on the device,
read + write: its memory bandwidth, HBM on a GPU): what an implementation with two passes
per direction must move (forward: read ``x`` for the statistics, read ``x`` and
write ``y``; backward: read ``x`` and ``dy`` for the sums, read both again and
write ``dx``). Every contender also returns two new x-sized arrays (``y``,
``dx``) and pays the page faults of fresh buffers on each call, which a copy
into a reused buffer does not: ``floor + 2 fresh outputs`` adds that cost,
measured with NumPy, as a second, attainable reference (on an accelerator,
whose allocator reuses device buffers, that cost is taken as 0).

``--platform gpu`` (or ``tpu``, ``cpu``) places the inputs and runs the JAX
contenders on that platform's first device; by default they run on JAX's
default backend.

Before each timed repetition the script waits (up to 3 s) until other
processes leave the CPUs idle, so a shared machine disturbs fewer samples, then
makes one untimed call and times the call right after it: steps follow each
other in training, and a thread pool that slept during the wait would
otherwise be timed waking up (XLA's pool, PyTorch's OpenMP threads).

Every contender's outputs are also compared with the first contender's (jaxbn
by default): ``max rel err`` is the largest ``max |diff| / max |value|`` over
``y``, ``dx``, ``dscale`` and ``dbias``, a check that all compute the same step.

Run ``python benchmarks/bench_op.py --help`` for the flags; ``--json`` writes
every number (with the machine description) to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

__all__ = ["Case", "main", "parse_case"]

OP = "batch_norm"
DEFAULT_CASES = (
    "4096x1024:float32",
    "256x256:float32",
    "128x32x32x64:float32",
    "16384x1024:float32",
    "4096x1024:bfloat16",
)
QUICK_CASES = ("64x16:float32", "4x4x4x8:bfloat16")
CONTENDERS = ("jaxbn", "reference", "flax", "torch")
ABSENT_PEERS = {"equinox": "equinox", "haiku": "dm-haiku"}  # module -> distribution
FLOOR_PASSES = 8


@dataclass(frozen=True)
class Case:
    """One benchmark case: a shape (features last) and a dtype name."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def name(self) -> str:
        """``op_shape_dtype``, e.g. ``batch_norm_4096x1024_float32``."""
        return f"{OP}_{'x'.join(map(str, self.shape))}_{self.dtype}"


def parse_case(text: str) -> Case:
    """Parses ``'4096x1024'`` or ``'128x32x32x64:bfloat16'`` (float32 by default).

    Examples:
        >>> parse_case("128x32x32x64:bfloat16").name
        'batch_norm_128x32x32x64_bfloat16'
    """
    shape_text, _, dtype = text.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {shape_text!r}, expected e.g. 4096x1024"
        ) from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"dtype must be float32, bfloat16 or float16: {dtype!r}")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs rank >= 2 and positive sizes: {shape}")
    return Case(shape, dtype)


class Unavailable(Exception):
    """A contender cannot run a case (the message says why)."""


# --------------------------------------------------------------------------- inputs


def make_inputs(case: Case, device=None) -> dict[str, Any]:
    """Builds the shared inputs of a case with a fixed key: x, dy, scale, bias.

    ``x`` and ``dy`` have the case's dtype; ``scale`` and ``bias`` stay float32
    (parameters kept in full precision, as Flax's ``param_dtype`` does). They
    are placed on ``device`` (JAX's default device when ``None``).
    """
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(case.dtype)
    c = case.shape[-1]
    arrays = {
        "x": (2.0 * rng.standard_normal(case.shape, np.float32) + 0.5).astype(dtype),
        "dy": rng.standard_normal(case.shape, np.float32).astype(dtype),
        "scale": 1.0 + 0.1 * rng.standard_normal(c, np.float32),
        "bias": 0.1 * rng.standard_normal(c, np.float32),
    }
    return jax.block_until_ready(jax.device_put(arrays, device))


# --------------------------------------------------------------------------- contenders
# Each builder returns (run, outputs_fn, note): ``run()`` does one timed step,
# ``outputs_fn(result)`` maps its result to NumPy (y, dx, dscale, dbias) in the
# (N..., C) layout for the cross-check against jaxbn.


def _jax_step(bn: Callable) -> Callable:
    import jax

    def step(x, scale, bias, dy):
        y, vjp = jax.vjp(lambda x, s, b: bn(x, s, b)[0], x, scale, bias)
        return y, vjp(dy)

    return jax.jit(step)


def _jax_outputs(out):
    y, (dx, ds, db) = out
    return tuple(np.asarray(v, np.float32) for v in (y, dx, ds, db))


def build_jaxbn(inp):
    """jaxbn's custom VJP under ``jax.jit(jax.vjp(...))``."""
    import jaxbn

    step = _jax_step(jaxbn.batch_norm)
    args = (inp["x"], inp["scale"], inp["bias"], inp["dy"])
    return (lambda: step(*args)), _jax_outputs, ""


def build_reference(inp):
    """The plain-jnp reference differentiated by JAX autodiff, same harness."""
    from jaxbn import reference

    step = _jax_step(reference.batch_norm)
    args = (inp["x"], inp["scale"], inp["bias"], inp["dy"])
    return (lambda: step(*args)), _jax_outputs, ""


def build_flax(inp):
    """``flax.linen.BatchNorm`` in training mode, vjp over ``x`` and params."""
    import jax
    import jax.numpy as jnp

    nn = _common.optional_import("flax.linen")
    if nn is None:
        raise Unavailable("flax not installed")
    x = inp["x"]
    low = jnp.dtype(x.dtype).itemsize < 4
    bn = nn.BatchNorm(use_running_average=False, dtype=x.dtype if low else None)
    variables = bn.init(jax.random.key(0), x)
    params = {"scale": inp["scale"], "bias": inp["bias"]}

    @jax.jit
    def step(x, params, batch_stats, dy):
        def f(x, params):
            v = {"params": params, "batch_stats": batch_stats}
            return bn.apply(v, x, mutable=["batch_stats"])

        y, vjp, updates = jax.vjp(f, x, params, has_aux=True)
        dx, dparams = vjp(dy)
        return y, (dx, dparams["scale"], dparams["bias"]), updates

    args = (x, params, variables["batch_stats"], inp["dy"])
    note = "dtype=x.dtype" if low else ""
    return (lambda: step(*args)), (lambda out: _jax_outputs(out[:2])), note


def _torch_dtype(torch, name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _torch_worker(spec_path: str, out_path: str) -> None:
    """Times PyTorch on the inputs in ``spec_path`` (run in a child process).

    Writes the timing summary (JSON) to ``out_path`` and the outputs
    ``(y, dx, dscale, dbias)`` in the ``(N..., C)`` layout beside it (``.npz``).
    """
    with open(spec_path) as f:
        spec = json.load(f)
    arrays = np.load(spec["arrays"])
    torch = _common.optional_import("torch")
    import torch.nn.functional as F

    torch.set_num_threads(_common.cpu_count())
    dev = spec["device"]
    sync = (lambda o: torch.cuda.synchronize()) if dev == "cuda" else (lambda o: o)
    dtype = _torch_dtype(torch, spec["dtype"])
    x_np = arrays["x"]
    ndim = x_np.ndim
    # torch wants channels at dim 1: (N, C, *spatial) from our (N, *spatial, C).
    perm = (0, ndim - 1, *range(1, ndim - 1))
    inv = tuple(int(i) for i in np.argsort(perm))
    x_log = torch.from_numpy(x_np).permute(perm).to(dev, dtype)
    dy_log = torch.from_numpy(arrays["dy"]).permute(perm).to(dev, dtype)
    layouts = {"NCHW": torch.contiguous_format}
    if ndim == 4:
        layouts["channels_last"] = torch.channels_last

    def make(fmt):
        xt = x_log.contiguous(memory_format=fmt).requires_grad_()
        dyt = dy_log.contiguous(memory_format=fmt)
        w = torch.from_numpy(arrays["scale"]).to(dev).requires_grad_()
        b = torch.from_numpy(arrays["bias"]).to(dev).requires_grad_()
        rm, rv = torch.zeros_like(w), torch.ones_like(w)
        rm.requires_grad_(False)
        rv.requires_grad_(False)

        def run():
            xt.grad = w.grad = b.grad = None
            y = F.batch_norm(xt, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
            y.backward(dyt)
            return y, xt.grad, w.grad, b.grad

        return run

    out: dict[str, Any] = {}
    runs = {}
    for name, fmt in layouts.items():
        run = make(fmt)
        try:
            run()
        except RuntimeError as e:  # e.g. a dtype without a kernel on this device
            out["unavailable"] = f"n/a: {str(e).splitlines()[0][:60]}"
            break
        runs[name] = run
    if runs:
        timings = {
            k: _common.time_calls(
                r, reps=spec["reps"], warmup=spec["warmup"], sync=sync, quiet=spec["quiet"]
            )
            for k, r in runs.items()
        }
        best = min(timings, key=lambda k: timings[k].median)
        out["best"] = best
        out["summary"] = {k: t.summary() for k, t in timings.items()}
        y, dx, dw, db = (t.detach().float().cpu().numpy() for t in runs[best]())
        np.savez(out_path + ".npz", y=y.transpose(inv), dx=dx.transpose(inv), ds=dw, db=db)
    with open(out_path, "w") as f:
        json.dump(out, f)


def build_torch(inp):
    """``torch.nn.functional.batch_norm`` forward + ``backward``, in a child process.

    Returns ``(timings, outputs, note)``: unlike the JAX builders the timing is
    done here (in the child), so ``run_case`` takes ``timings`` as they are.
    """
    if _common.optional_import("torch") is None:
        raise Unavailable("torch not installed")
    platform = inp["x"].devices().pop().platform if hasattr(inp["x"], "devices") else "cpu"
    device = "cpu"
    if platform != "cpu":
        torch = _common.optional_import("torch")
        if not torch.cuda.is_available():
            raise Unavailable(f"n/a: PyTorch has no {platform} device here")
        device = "cuda"
    spec = dict(inp["_timing"], device=device, dtype=str(inp["x"].dtype))
    with tempfile.TemporaryDirectory() as tmp:
        spec["arrays"] = os.path.join(tmp, "arrays.npz")
        np.savez(
            spec["arrays"],
            **{k: np.asarray(inp[k], np.float32) for k in ("x", "dy", "scale", "bias")},
        )
        spec_path, out_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", spec_path, out_path],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise Unavailable(f"failed: {err[:80]}")
        with open(out_path) as f:
            out = json.load(f)
        if "unavailable" in out:
            raise Unavailable(out["unavailable"])
        saved = np.load(out_path + ".npz")
        outputs = tuple(saved[k] for k in ("y", "dx", "ds", "db"))
    return out, outputs, f"own process, {device}"


BUILDERS = {
    "jaxbn": build_jaxbn,
    "reference": build_reference,
    "flax": build_flax,
    "torch": build_torch,
}


# --------------------------------------------------------------------------- running


def _max_rel_err(got, want) -> float:
    """max |got - want| / max |want| over the four outputs (y, dx, dscale, dbias)."""
    return max(
        float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
        for g, w in zip(got, want, strict=True)
    )


def run_case(
    case: Case,
    contenders: Sequence[str],
    *,
    reps: int,
    warmup: int,
    quiet: bool = False,
    device=None,
) -> dict:
    """Times every contender on one case (JAX on ``device``); returns a JSON-ready dict."""
    inp = make_inputs(case, device)
    inp["_timing"] = {"reps": reps, "warmup": warmup, "quiet": quiet}
    result: dict[str, Any] = {
        "name": case.name,
        "shape": list(case.shape),
        "dtype": case.dtype,
        "x_bytes": int(inp["x"].nbytes),
        "contenders": {},
    }
    want = None
    for name in contenders:
        entry: dict[str, Any] = {"median_s": None, "note": ""}
        try:
            run, outputs, note = BUILDERS[name](inp)
        except Unavailable as e:
            entry["note"] = str(e)
            result["contenders"][name] = entry
            continue
        entry["note"] = note
        if name == "torch":  # timed in its own process: (summaries, outputs) come back
            summaries, best = run["summary"], run["best"]
            got = outputs
        else:
            timings = {"": _common.time_calls(run, reps=reps, warmup=warmup, quiet=quiet)}
            summaries, best = {k: t.summary() for k, t in timings.items()}, ""
            got = outputs(run())
        if len(summaries) > 1:
            others = ", ".join(f"{k} {t['median_s'] * 1e3:.3g} ms" for k, t in summaries.items())
            entry["note"] = f"{best} (faster; {others}); {note}"
            entry["layouts"] = summaries
        entry.update(summaries[best])
        if want is None:
            want = got
        entry["max_rel_err"] = _max_rel_err(got, want)
        result["contenders"][name] = entry
    # The page faults of fresh output buffers: host memory only (an accelerator's
    # allocator reuses device buffers).
    on_cpu = device is None or device.platform == "cpu"
    result["fresh_output_s"] = _common.fresh_buffer_cost(result["x_bytes"]) if on_cpu else 0.0
    return result


def device_copy_bandwidth(device, nbytes: int, *, reps: int = 7, quiet: bool = False) -> float:
    """Memory bandwidth of ``device`` in bytes per second (read + write).

    A jitted elementwise negation of a float32 array of ``nbytes`` on the
    device (one read and one write of every element, as a copy; XLA cannot turn
    it into an alias of its input), waited for with ``block_until_ready``.
    """
    import jax
    import jax.numpy as jnp

    a = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device)
    neg = jax.jit(jnp.negative)
    timing = _common.time_calls(lambda: neg(a), reps=reps, warmup=2, quiet=quiet)
    return 2 * a.nbytes / timing.median


def _fill_ratios(result: dict, bandwidth: float) -> None:
    floor = FLOOR_PASSES * result["x_bytes"] / bandwidth
    result["floor_s"] = floor
    # The step returns two new x-sized arrays (y, dx): the page faults of two
    # fresh buffers come on top of the bandwidth floor for every contender.
    result["floor_fresh_s"] = floor + 2 * result["fresh_output_s"]
    base = result["contenders"].get("jaxbn", {}).get("median_s")
    for entry in result["contenders"].values():
        t = entry["median_s"]
        entry["ratio_to_jaxbn"] = None if t is None or base is None else t / base
    result["jaxbn_over_floor"] = None if base is None else base / floor


def _table(cases: list[dict]) -> str:
    rows = []
    for res in cases:
        for name, e in res["contenders"].items():
            t = e["median_s"]
            rows.append(
                [
                    res["name"],
                    name,
                    "n/a" if t is None else f"{t * 1e3:.3f}",
                    "" if e.get("iqr_rel") is None else f"{100 * e['iqr_rel']:.0f}%",
                    "" if e["ratio_to_jaxbn"] is None else f"{e['ratio_to_jaxbn']:.2f}",
                    "" if t is None else f"{e['max_rel_err']:.0e}",
                    e["note"],
                ]
            )
        jf = res["jaxbn_over_floor"]
        rows.append(
            [
                res["name"],
                f"floor ({FLOOR_PASSES} passes)",
                f"{res['floor_s'] * 1e3:.3f}",
                "",
                "",
                "",
                "" if jf is None else f"jaxbn = {jf:.2f} x floor",
            ]
        )
        rows.append(
            [
                res["name"],
                "floor + 2 fresh outputs",
                f"{res['floor_fresh_s'] * 1e3:.3f}",
                "",
                "",
                "",
                "page faults of new y, dx buffers (np.copy - np.copyto)",
            ]
        )
    headers = ["case", "contender", "median ms", "±IQR/2", "time / jaxbn", "max rel err", "note"]
    return _common.format_table(headers, rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Batch-norm training step (fwd + bwd): jaxbn against its peers.",
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_case,
        metavar="SHAPE[:DTYPE]",
        help="cases such as 4096x1024 or 128x32x32x64:bfloat16 (features last; "
        f"default: {' '.join(DEFAULT_CASES)})",
    )
    p.add_argument("--reps", type=int, default=21, help="timed repetitions (median; >= 15)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(CONTENDERS),
        help="which implementations to time (jaxbn is the baseline of the ratios)",
    )
    p.add_argument(
        "--no-wait-idle",
        action="store_true",
        help="do not wait (up to 3 s per repetition) for other processes to leave "
        "the CPUs idle before each timed repetition",
    )
    p.add_argument("--copy-mib", type=int, default=512, help="array size for copy bandwidth")
    p.add_argument(
        "--platform",
        choices=("cpu", "gpu", "tpu"),
        help="run the JAX contenders on this platform's first device (default: JAX's "
        "default backend); the floor then uses that device's memory bandwidth",
    )
    p.add_argument("--torch-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke run: small shapes, 3 reps, small copy (numbers meaningless)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; prints the table; returns (and optionally writes) results.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        A dict with ``machine``, ``copy_bandwidth_Bps``, ``skipped`` (peers not
        installed) and ``cases``: one dict per case with the ``floor_s``,
        ``jaxbn_over_floor``, ``floor_fresh_s`` (the floor plus the page faults
        of two new x-sized outputs) and, per contender, ``median_s``,
        ``ratio_to_jaxbn``, the spread and ``busy_starts`` (repetitions that
        started while other processes were busy).
    """
    args = _parser().parse_args(argv)
    if args.torch_worker:
        _torch_worker(*args.torch_worker)
        return {}
    cases = args.shapes or [parse_case(c) for c in (QUICK_CASES if args.quick else DEFAULT_CASES)]
    reps, warmup, copy_mib = args.reps, args.warmup, args.copy_mib
    if args.quick:
        reps, warmup, copy_mib = min(reps, 3), 1, min(copy_mib, 16)

    info = _common.machine_info(("jax", "jaxlib", "numpy", "flax", "torch"))
    _common.print_machine(info)
    skipped = {}
    for module, dist in ABSENT_PEERS.items():
        if _common.optional_import(module) is None:
            skipped[module] = "not installed"
            print(f"note     {module} is not installed: skipped ({dist})")

    import jax

    device = jax.devices(args.platform)[0] if args.platform else jax.devices()[0]
    info["device"] = f"{device.platform}: {device.device_kind}"
    print(f"device   {info['device']} (JAX contenders)")
    quiet = not (args.quick or args.no_wait_idle)
    copy_reps = 3 if args.quick else 7
    if device.platform == "cpu":
        bandwidth = _common.copy_bandwidth(copy_mib * _common.MiB, reps=copy_reps, quiet=quiet)
        how = "np.copyto"
    else:
        bandwidth = device_copy_bandwidth(
            device, copy_mib * _common.MiB, reps=copy_reps, quiet=quiet
        )
        how = f"jitted negation on the {device.platform}"
    print(f"copy     {bandwidth / 1e9:.2f} GB/s ({how} of {copy_mib} MiB, read + write)")
    wait = "" if args.quick or args.no_wait_idle else ", each started on idle CPUs"
    print(f"timing   median of {reps} reps after {warmup} warm-up calls{wait}\n")

    results = []
    for case in cases:
        res = run_case(case, args.contenders, reps=reps, warmup=warmup, quiet=quiet, device=device)
        _fill_ratios(res, bandwidth)
        results.append(res)
    print(_table(results))
    print(
        f"\nload average (1 min) at start {info['load_avg_1min']:.2f}, "
        f"at end {_common.load_average():.2f} (other processes add noise)"
    )
    out = {
        "machine": info,
        "copy_bandwidth_Bps": bandwidth,
        "copy_mib": copy_mib,
        "reps": reps,
        "warmup": warmup,
        "floor_passes": FLOOR_PASSES,
        "device": info["device"],
        "skipped": skipped,
        "cases": results,
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)

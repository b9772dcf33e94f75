"""One batch-norm training step (forward and backward): jaxbn against its peers.

Per case (a shape, features last, and a dtype): ``jaxbn`` (``jax.vjp`` of
:func:`jaxbn.batch_norm`, jitted), ``reference`` (the same around
:func:`jaxbn.reference.batch_norm`, JAX autodiff), ``flax``
(``flax.linen.BatchNorm``) and ``torch`` (``F.batch_norm`` and ``backward``, in
its own process). The floor streams 8 x-sized arrays at the copy bandwidth
measured in the same run; ``floor + 2 fresh outputs`` adds the page faults of
the two new outputs (``y``, ``dx``) on the CPU. RESULTS.md says more.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import _common
import numpy as np

DEFAULT_CASES = ("4096x1024", "256x256", "128x32x32x64", "16384x1024", "4096x1024:bfloat16")
QUICK_CASES = ("64x16", "4x4x4x8:bfloat16")
CONTENDERS = ("jaxbn", "reference", "flax", "torch")
FLOOR_PASSES = 8


def parse_case(text: str) -> tuple[tuple[int, ...], str]:
    """Parses ``'4096x1024'`` or ``'128x32x32x64:bfloat16'`` into (shape, dtype)."""
    shape_text, _, dtype = text.partition(":")
    try:
        shape = tuple(int(d) for d in shape_text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {shape_text!r}, e.g. 4096x1024") from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise argparse.ArgumentTypeError(f"dtype must be float32, bfloat16 or float16: {dtype!r}")
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs rank >= 2 and positive sizes: {shape}")
    return shape, dtype


def jax_step(name: str, x):
    """A contender's jitted ``(x, scale, bias, dy) -> (y, (dx, dscale, dbias), statistics)``."""
    import jax

    from jaxbn import batch_norm, reference

    if name == "flax":
        nn = _common.optional_import("flax.linen")
        if nn is None:
            raise _common.Unavailable("flax not installed")
        low = x.dtype.itemsize < 4
        module = nn.BatchNorm(use_running_average=False, dtype=x.dtype if low else None)
        stats = module.init(jax.random.key(0), x)["batch_stats"]

        def bn(x, scale, bias):  # y and the new running statistics
            variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": stats}
            return module.apply(variables, x, mutable=["batch_stats"])
    else:
        op = batch_norm if name == "jaxbn" else reference.batch_norm

        def bn(x, scale, bias):  # y and the batch statistics
            y, mean, var = op(x, scale, bias)
            return y, (mean, var)

    def step(x, scale, bias, dy):
        y, vjp, statistics = jax.vjp(bn, x, scale, bias, has_aux=True)
        return y, vjp(dy), statistics

    return jax.jit(step)


def torch_worker(spec: dict, arrays: dict) -> tuple[dict, dict]:
    """Times ``F.batch_norm`` + ``backward`` per layout (run by :func:`_common.in_own_process`)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(_common.cpu_count())
    dev, dtype = spec["device"], getattr(torch, spec["dtype"])
    ndim = arrays["x"].ndim
    perm = (0, ndim - 1, *range(1, ndim - 1))  # channels at dim 1: (N, C, *spatial)
    layouts = {"NCHW": torch.contiguous_format}
    if ndim == 4:
        layouts["channels_last"] = torch.channels_last

    def make(fmt):
        x, dy = (torch.from_numpy(arrays[k]).permute(perm).to(dev, dtype) for k in ("x", "dy"))
        x, dy = x.contiguous(memory_format=fmt).requires_grad_(), dy.contiguous(memory_format=fmt)
        w, b = (torch.from_numpy(arrays[k]).to(dev).requires_grad_() for k in ("scale", "bias"))
        stats = torch.zeros_like(w).detach(), torch.ones_like(w).detach()

        def run(n):
            for _ in range(n):
                x.grad = w.grad = b.grad = None
                y = F.batch_norm(x, *stats, w, b, training=True, momentum=0.1, eps=1e-5)
                y.backward(dy)
            if dev == "cuda":
                torch.cuda.synchronize()
            return y, x.grad, w.grad, b.grad

        return run

    runs = {name: make(fmt) for name, fmt in layouts.items()}
    timings = _common.interleave(runs, **spec["timing"])
    best = min(timings, key=lambda k: timings[k]["median_s"])
    out = [t.detach().float().cpu().numpy() for t in runs[best](1)]
    inv = tuple(int(i) for i in np.argsort(perm))
    outputs = {"y": out[0].transpose(inv), "dx": out[1].transpose(inv), "ds": out[2], "db": out[3]}
    return {"best": best, "timings": timings}, outputs


def run_torch(inputs: dict, dtype: str, platform: str, timing: dict):
    """PyTorch's timing summary, note and outputs, from its own process."""
    torch = _common.optional_import("torch")
    if torch is None:
        raise _common.Unavailable("torch not installed")
    device = "cpu"
    if platform != "cpu":
        if not torch.cuda.is_available():
            raise _common.Unavailable(f"n/a: PyTorch has no {platform} device here")
        device = "cuda"
    spec = {"device": device, "dtype": dtype, "timing": timing}
    # A dtype without a kernel on the device fails there: Unavailable, with its error.
    res, out = _common.in_own_process(torch_worker, spec, inputs)
    timings, best = res["timings"], res["best"]
    note = f"own process, {device}"
    if len(timings) > 1:
        others = ", ".join(f"{k} {t['median_s'] * 1e3:.3g} ms" for k, t in timings.items())
        note = f"{best} (faster; {others}); {note}"
    return timings[best], note, [out[k] for k in ("y", "dx", "ds", "db")]


def run_case(shape, dtype: str, contenders, *, device, bandwidth_Bps: float, timing: dict) -> dict:
    """Times every contender on one case; returns a JSON-ready dict."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = 2.0 * rng.standard_normal(shape, np.float32) + 0.5
    dy = rng.standard_normal(shape, np.float32)
    scale = 1.0 + 0.1 * rng.standard_normal(shape[-1], np.float32)
    bias = 0.1 * rng.standard_normal(shape[-1], np.float32)
    inputs = {"x": x, "scale": scale, "bias": bias, "dy": dy}  # float32 NumPy
    args = [jnp.asarray(v, dtype if k in ("x", "dy") else "float32") for k, v in inputs.items()]
    args = jax.device_put(args, device)
    entries: dict[str, dict[str, Any]] = {}
    runs, outputs = {}, {}
    for name in (c for c in contenders if c != "torch"):
        try:
            step = jax_step(name, args[0])
        except _common.Unavailable as e:
            entries[name] = {"median_s": None, "note": str(e)}
            continue
        runs[name] = _common.calls(step, *args)
        y, grads = runs[name](1)[:2]
        outputs[name] = [y, *grads]
        entries[name] = {"note": "dtype=x.dtype" if name == "flax" and dtype != "float32" else ""}
    for name, summary in _common.interleave(runs, **timing).items():
        entries[name].update(summary)
    if "torch" in contenders:  # last, so its spinning threads slow no JAX contender
        try:
            summary, note, outputs["torch"] = run_torch(inputs, dtype, device.platform, timing)
            entries["torch"] = dict(summary, note=note)
        except _common.Unavailable as e:
            entries["torch"] = {"median_s": None, "note": str(e)}
    want = outputs.get("jaxbn") or next(iter(outputs.values()), None)
    for name, out in outputs.items():
        entries[name]["max_rel_err"] = _common.rel_err(out, want)
    base = entries.get("jaxbn", {}).get("median_s")
    for e in entries.values():
        e["ratio_to_jaxbn"] = e["median_s"] / base if e["median_s"] and base else None
    x_bytes = int(args[0].nbytes)
    floor = FLOOR_PASSES * x_bytes / bandwidth_Bps
    # The page faults of the new y and dx; an accelerator's allocator reuses its buffers.
    fresh = _common.fresh_buffer_cost(x_bytes) if device.platform == "cpu" else 0.0
    return {
        "name": f"batch_norm_{'x'.join(map(str, shape))}_{dtype}",
        "dtype": dtype,
        "x_bytes": x_bytes,
        "floor_s": floor,
        "floor_fresh_s": floor + 2 * fresh,
        "jaxbn_over_floor": base / floor if base else None,
        "contenders": entries,
    }


def bandwidth(device, nbytes: int, *, reps: int, quiet: bool) -> float:
    """Bytes per second (read + write) of a copy of ``nbytes``: the streaming speed.

    ``np.copyto`` on the CPU; on an accelerator a jitted negation on the device
    (one read and one write per element, which XLA cannot turn into an alias).
    """
    import jax
    import jax.numpy as jnp

    if device.platform == "cpu":
        src = np.ones(nbytes // 4, np.float32)
        copy = _common.calls(np.copyto, np.empty_like(src), src)
    else:
        src = jax.device_put(jnp.ones(nbytes // 4, jnp.float32), device)
        copy = _common.calls(jax.jit(jnp.negative), src)
    t = _common.interleave({"copy": copy}, reps=reps, warmup=2, quiet=quiet)["copy"]
    return 2 * src.nbytes / t["median_s"]


COLUMNS = (
    ("case", "case"),
    ("contender", "contender"),
    ("median ms", "median_s", ".3f", 1e3),
    ("±IQR/2", "iqr_rel", ".0%"),
    ("time / jaxbn", "ratio_to_jaxbn", ".2f"),
    ("max rel err", "max_rel_err", ".0e"),
    ("note", "note"),
)


def _rows(case: dict) -> list[dict]:
    """The contenders' rows of a case, then its floors'."""
    rows = [dict(e, contender=name) for name, e in case["contenders"].items()]
    note = f"jaxbn = {_common.fmt(case['jaxbn_over_floor'], '.2f')} x floor"
    rows.append({"contender": "floor (8 passes)", "median_s": case["floor_s"], "note": note})
    rows.append({"contender": "floor + 2 fresh outputs", "median_s": case["floor_fresh_s"]})
    return [dict(r, case=case["name"]) for r in rows]


def _parser() -> argparse.ArgumentParser:
    p = _common.parser(
        "Batch-norm training step (fwd + bwd): jaxbn and its peers.", reps=21, warmup=3
    )
    p.add_argument(
        "--shapes",
        nargs="+",
        type=parse_case,
        metavar="SHAPE[:DTYPE]",
        help=f"cases, features last (default: {' '.join(DEFAULT_CASES)})",
    )
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--copy-mib", type=int, default=512, help="array size for the bandwidth")
    p.add_argument("--platform", choices=("cpu", "gpu", "tpu"), help="device of the JAX contenders")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the table; returns (and with ``--json`` writes) the results."""
    import jax

    args = _parser().parse_args(argv)
    cases = args.shapes or [parse_case(c) for c in (QUICK_CASES if args.quick else DEFAULT_CASES)]
    if args.quick:
        args.reps, args.warmup, args.copy_mib = min(args.reps, 3), 1, min(args.copy_mib, 16)
    info = _common.machine_info(__file__, argv)
    device = jax.devices(args.platform)[0]
    info["device"] = f"{device.platform}: {device.device_kind}"
    timing = _common.timing(args)
    bandwidth_Bps = bandwidth(
        device, args.copy_mib * _common.MiB, reps=3 if args.quick else 7, quiet=timing["quiet"]
    )
    print(f"copy     {bandwidth_Bps / 1e9:.2f} GB/s ({args.copy_mib} MiB, read + write)")
    print(f"timing   median of {args.reps} interleaved rounds after {args.warmup} warm-up calls\n")
    results = []
    for shape, dtype in cases:
        kwargs = {"device": device, "bandwidth_Bps": bandwidth_Bps, "timing": timing}
        results.append(run_case(shape, dtype, args.contenders, **kwargs))
    print(_common.table([r for case in results for r in _rows(case)], COLUMNS))
    skipped = [m for m in ("equinox", "haiku") if _common.optional_import(m) is None]
    for module in skipped:
        print(f"note     {module} is not installed: skipped")
    out = {
        "machine": info,
        "copy_bandwidth_Bps": bandwidth_Bps,
        "skipped": skipped,
        "cases": results,
    }
    return _common.finish(args, out)


if __name__ == "__main__":
    main()

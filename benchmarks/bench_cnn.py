"""CNN training steps/s and compiled-step memory: jaxbn against Flax and PyTorch.

4 blocks of ``conv 3x3 (64, no bias) -> batch norm -> relu`` on 32x32x3
synthetic images, mean pooling, a dense head; batch 128, SGD (lr 0.01).
``bench_train.py``'s contenders: ``jaxbn-scan``, ``jaxbn-jit``, ``flax-jit``,
``torch-eager`` (channels-last). ``--conv-diagnostic`` times a conv stack's
gradient step per call and in ``lax.scan``, with autodiff's convolution and
with :func:`jaxbn.cnn.conv`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import _common
import bench_train
import numpy as np

CONTENDERS = ("jaxbn-scan", "jaxbn-jit", "flax-jit", "torch-eager")


def make_workload(channels=(64,) * 4, image_size=32, batch_size=128, activation="relu"):
    """The CNN (Flax's momentum and eps) on ``4 * batch_size`` Gaussian images, random labels."""
    from jaxbn import CNN

    model = CNN(3, channels, 10, activation=activation, momentum=0.99, eps=1e-5)
    rng = np.random.default_rng(0)
    n = 4 * batch_size
    x = rng.standard_normal((n, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    return bench_train.workload("cnn", model, x, y, batch_size=batch_size, lr=0.01)


def conv_diagnostic(*, steps=20, batch_size=64, image_size=8, channels=(32, 64)) -> dict:
    """Milliseconds per gradient step of a conv stack: autodiff's conv and :func:`jaxbn.cnn.conv`.

    ``relu(conv(h, kernel))`` layers, one SGD step on ``sum(mean_pool(h) * ct)``,
    compiled as one jitted step per call and as ``steps`` steps in a
    ``lax.scan``; ``scan_conv_forms`` lists the ``dim_labels`` in the compiled
    scan (XLA:CPU runs only ``b01f_01io->b01f`` with its fast kernels).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxbn.cnn import conv

    def autodiff_conv(x, kernel):
        dims = ("NHWC", "HWIO", "NHWC")
        return lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=dims)

    keys = jax.random.split(jax.random.key(0), len(channels) + 2)
    widths = (1, *channels)
    kernels = [
        jax.random.normal(k, (3, 3, a, b)) / (3 * a**0.5)
        for k, a, b in zip(keys, widths[:-1], widths[1:], strict=False)
    ]
    xs = jax.random.normal(keys[-2], (4, batch_size, image_size, image_size, 1))
    cts = jax.random.normal(keys[-1], (4, batch_size, channels[-1]))
    out: dict[str, Any] = {"shape": f"{batch_size}x{image_size}x{image_size}x1, {channels}"}
    for name, conv_fn in (("autodiff", autodiff_conv), ("jaxbn", conv)):

        def step(kernels, i, conv_fn=conv_fn):
            def loss(kernels):
                h = xs[i % 4]
                for k in kernels:
                    h = jax.nn.relu(conv_fn(h, k))
                return jnp.sum(h.mean(axis=(1, 2)) * cts[i % 4])

            return [k - 0.01 * g for k, g in zip(kernels, jax.grad(loss)(kernels), strict=True)]

        per_call = jax.jit(step)

        @jax.jit
        def scan(kernels, step=step):
            return lax.scan(lambda ks, i: (step(ks, i), None), kernels, jnp.arange(steps))[0]

        def calls(n, per_call=per_call):
            ks = kernels
            for i in range(steps * n):
                ks = per_call(ks, i)
            return ks

        hlo = scan.lower(kernels).compile().as_text()
        runs = {"per_call": calls, "scan": _common.calls(scan, kernels)}
        timing = _common.interleave(runs, reps=3, warmup=1, quiet=False)
        out[name] = {f"{k}_ms": 1e3 * t["median_s"] / steps for k, t in timing.items()}
        forms = re.findall(r"convolution\([^)]*\).*?dim_labels=([^,\s]+)", hlo)
        out[name]["scan_conv_forms"] = sorted(set(forms))
        out[name]["scan_over_per_call"] = out[name]["scan_ms"] / out[name]["per_call_ms"]
    return out


def _diagnostic_table(diag: dict) -> str:
    rows = [dict(diag[k], conv=k) for k in ("autodiff", "jaxbn")]
    columns = (
        ("conv", "conv"),
        ("ms/step per call", "per_call_ms", ".2f"),
        ("ms/step in scan", "scan_ms", ".2f"),
        ("scan / per call", "scan_over_per_call", ".1f"),
        ("forms in scan", "scan_conv_forms"),
    )
    return f"conv gradient steps, {diag['shape']} (diagnostic)\n{_common.table(rows, columns)}"


def _parser():
    """The command-line flags."""
    p = _common.parser(
        "CNN training step: jaxbn (scan loop, per call) vs Flax and PyTorch.",
        reps=5,
        warmup=1,
        min_time=2.0,
    )
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--steps-per-call", type=int, default=5, help="scan loop: steps per dispatch")
    p.add_argument("--conv-diagnostic", action="store_true", help="also time a conv stack")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables; returns the results."""
    args = _parser().parse_args(argv)
    sizes = {}
    if args.quick:  # a tiny network, short runs
        args.reps, args.warmup, args.min_time = min(args.reps, 2), 1, 0.01
        args.steps_per_call = min(args.steps_per_call, 2)
        sizes = {"channels": (4, 4), "image_size": 6, "batch_size": 8}
    info = _common.machine_info(__file__, argv)
    wl = make_workload(**sizes)
    wl.steps_per_call = args.steps_per_call
    builders = {k: bench_train.BUILDERS[k] for k in args.contenders if k != "torch-eager"}
    res = bench_train.run_model(
        wl,
        builders,
        "torch-eager" in args.contenders,
        timing=_common.timing(args),
        check_against="jaxbn-jit",
        baseline="flax-jit",
    )
    print(bench_train.tables([res]))
    diag = None
    if args.conv_diagnostic:
        diag = conv_diagnostic(steps=2, **sizes) if args.quick else conv_diagnostic()
        print("\n" + _diagnostic_table(diag))
    return _common.finish(args, {"machine": info, "results": res, "conv_diagnostic": diag})


if __name__ == "__main__":
    main()

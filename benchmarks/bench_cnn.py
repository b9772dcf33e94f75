"""CNN training throughput and compiled-step memory: jaxbn against Flax and PyTorch.

The network: 4 blocks of ``conv 3x3 (64 channels, no bias) -> batch norm ->
relu`` on 32x32x3 images, global average pooling and a dense head (10
classes); batch 128, float32, plain SGD (lr 0.01); synthetic Gaussian images
with random labels (the speed does not depend on the data).

Contenders (each does forward + backward + SGD update + running-statistics
update and computes the batch's loss and accuracy, from the same initial
parameters):

- ``jaxbn-scan``: :func:`jaxbn.train.make_train_loop` with :class:`jaxbn.CNN`,
  ``--steps-per-call`` steps per dispatch in one ``lax.scan``, batches drawn on
  the device;
- ``jaxbn-jit``: ``jax.jit(make_train_step(cnn, opt))``, one step per call over
  pre-generated batches on the device;
- ``flax-jit``: the same network in ``flax.linen`` (``nn.Conv`` +
  ``nn.BatchNorm``, momentum and epsilon matched), ``mutable=["batch_stats"]``,
  one step per call;
- ``torch-eager``: ``nn.Sequential(Conv2d(bias=False), BatchNorm2d, ReLU, ...)``
  in channels-last memory format with ``torch.optim.SGD``, run in a separate
  process after every JAX timing, with ``OMP_WAIT_POLICY=PASSIVE`` (PyTorch's
  OpenMP threads otherwise keep spinning after a call and slow whatever runs
  next) and ``torch.set_num_threads`` set to the cores available.

The ``rel err`` column compares the loss and every parameter after one step on
the same batch with ``jaxbn-jit``. Memory: ``memory_analysis()`` of one compiled
training step (no donation) for the JAX per-call contenders. Targets, printed
as MET / NOT MET: ``jaxbn-jit`` steps/s at least ``flax-jit``'s, and its
temporary memory at most 0.75x Flax's.

``--conv-diagnostic`` adds the measurement behind :func:`jaxbn.cnn.conv`: a
conv stack's gradient step per call and inside ``lax.scan``, with autodiff's
convolution and with jaxbn's (see :func:`conv_diagnostic`).

Run ``python benchmarks/bench_cnn.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

__all__ = ["CnnWorkload", "main", "make_workload"]

CONTENDERS = ("jaxbn-scan", "jaxbn-jit", "flax-jit", "torch-eager")
MEMORY_CONTENDERS = ("jaxbn-jit", "flax-jit")
NUM_BATCHES = 4
SPEED_TARGET = 1.0  # jaxbn-jit steps/s at least this times Flax's
MEMORY_TARGET = 0.75  # jaxbn-jit temporary memory at most this times Flax's


@dataclass
class CnnWorkload:
    """The network, its data and the shared starting point of every contender.

    Attributes:
        model: the :class:`jaxbn.CNN` config.
        image_size: height and width of the square images.
        batch_size: examples per step.
        lr: SGD learning rate.
        x_train: ``[n, size, size, channels]`` float32 images (NumPy).
        y_train: ``[n]`` int32 labels.
        batches: ``NUM_BATCHES`` pairs ``(x, labels)`` for the per-call loops.
        params: initial params in jaxbn's layout (JAX arrays).
        state: initial running statistics.
    """

    model: Any
    image_size: int
    batch_size: int
    lr: float
    x_train: np.ndarray
    y_train: np.ndarray
    batches: list[tuple[np.ndarray, np.ndarray]]
    params: Any
    state: Any

    @property
    def label(self) -> str:
        """``cnn_4x64_32x32x3_b128_float32``-style case name."""
        m, s = self.model, self.image_size
        depth = f"{len(m.channels)}x{m.channels[0]}"
        return f"cnn_{depth}_{s}x{s}x{m.in_channels}_b{self.batch_size}_float32"


def make_workload(
    *,
    channels: tuple[int, ...] = (64, 64, 64, 64),
    image_size: int = 32,
    batch_size: int = 128,
    lr: float = 0.01,
) -> CnnWorkload:
    """Builds the synthetic data, the config and the initial parameters."""
    import jax

    from jaxbn import CNN

    model = CNN(3, channels, 10, momentum=0.99, eps=1e-5)
    params, state = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    n = NUM_BATCHES * batch_size
    x = rng.standard_normal((n, image_size, image_size, 3), dtype=np.float32)
    y = rng.integers(0, 10, n).astype(np.int32)
    batches = [
        (x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size])
        for i in range(NUM_BATCHES)
    ]
    return CnnWorkload(model, image_size, batch_size, lr, x, y, batches, params, state)


def _canonical(kernels, scales, biases, head) -> list[np.ndarray]:
    """The parameters in one order (HWIO kernels), for the cross-check."""
    return [np.array(a, np.float32) for a in (*kernels, *scales, *biases, *head)]


def _jaxbn_canonical(params) -> list[np.ndarray]:
    blocks = params["blocks"]
    return _canonical(
        [b["conv"]["kernel"] for b in blocks],
        [b["batch_norm"]["scale"] for b in blocks],
        [b["batch_norm"]["bias"] for b in blocks],
        [params["head"]["kernel"], params["head"]["bias"]],
    )


# --------------------------------------------------------------------------- contenders


def _jax_contender(step, params, state, opt_state, wl: CnnWorkload, to_canonical):
    import jax

    jstep = jax.jit(step)
    batches = [jax.device_put(b) for b in wl.batches]
    args = (params, state, opt_state, batches[0])
    new_params, _, _, metrics = jstep(*args)
    check = (float(metrics["loss"]), to_canonical(new_params))
    run = _common.host_loop(jstep, [(params, state, opt_state)], batches)
    return _common.Contender(run, check=check, step_fn=step, step_args=args)


def build_jaxbn_scan(wl: CnnWorkload, opt, *, steps_per_call: int):
    """jaxbn's ``lax.scan`` loop: ``steps_per_call`` steps per dispatch."""
    import jax
    import jax.numpy as jnp

    from jaxbn.train import TrainState, make_train_loop

    loop = make_train_loop(wl.model, opt, batch_size=wl.batch_size)
    x, y = jax.device_put((wl.x_train, wl.y_train))
    ts = [
        TrainState(
            wl.params, wl.state, opt.init(wl.params), jax.random.key(1), jnp.zeros((), jnp.int32)
        )
    ]

    def run(n):
        for _ in range(n // steps_per_call):
            ts[0], _ = loop(ts[0], x, y, steps_per_call)
        return ts[0]

    return _common.Contender(
        run, granularity=steps_per_call, note=f"{steps_per_call} steps/dispatch"
    )


def build_jaxbn_jit(wl: CnnWorkload, opt, **_):
    """``jax.jit(jaxbn.train.make_train_step(cnn, opt))``, one step per call."""
    from jaxbn.train import make_train_step

    step = make_train_step(wl.model, opt)
    return _jax_contender(step, wl.params, wl.state, opt.init(wl.params), wl, _jaxbn_canonical)


def _flax_module(nn, model):
    activation = getattr(nn, model.activation)  # nn.relu, nn.leaky_relu (slope 0.01), ...

    class FlaxCNN(nn.Module):
        """``nn.Conv(no bias) -> nn.BatchNorm -> activation`` blocks, mean pooling, ``nn.Dense``."""

        @nn.compact
        def __call__(self, x, train: bool):
            for width in model.channels:
                x = nn.Conv(width, (3, 3), padding="SAME", use_bias=False)(x)
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=model.momentum, epsilon=model.eps
                )(x)
                x = activation(x)
            return nn.Dense(model.num_classes)(x.mean(axis=(1, 2)))

    return FlaxCNN()


def _to_flax(params, state):
    fp = {f"Conv_{i}": dict(b["conv"]) for i, b in enumerate(params["blocks"])}
    fp.update({f"BatchNorm_{i}": dict(b["batch_norm"]) for i, b in enumerate(params["blocks"])})
    fp["Dense_0"] = dict(params["head"])
    fs = {f"BatchNorm_{i}": dict(s["batch_norm"]) for i, s in enumerate(state["blocks"])}
    return fp, fs


def _flax_canonical(fp) -> list[np.ndarray]:
    n = sum(k.startswith("Conv_") for k in fp)
    return _canonical(
        [fp[f"Conv_{i}"]["kernel"] for i in range(n)],
        [fp[f"BatchNorm_{i}"]["scale"] for i in range(n)],
        [fp[f"BatchNorm_{i}"]["bias"] for i in range(n)],
        [fp["Dense_0"]["kernel"], fp["Dense_0"]["bias"]],
    )


def build_flax_jit(wl: CnnWorkload, opt, **_):
    """``flax.linen`` CNN with ``nn.Conv`` and ``nn.BatchNorm``."""
    import jax

    from jaxbn.train import cross_entropy

    nn = _common.optional_import("flax.linen")
    if nn is None:
        raise _common.Unavailable("flax not installed")
    module = _flax_module(nn, wl.model)
    variables = module.init(jax.random.key(0), wl.batches[0][0], train=False)
    fp, fs = _to_flax(wl.params, wl.state)
    if jax.tree.structure({"params": fp, "batch_stats": fs}) != jax.tree.structure(variables):
        raise _common.Unavailable("flax variable layout differs from the expected one")

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = module.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, labels), (updates["batch_stats"], logits)

    step = _common.sgd_step(loss_fn, opt)
    return _jax_contender(step, fp, fs, opt.init(fp), wl, _flax_canonical)


BUILDERS = {
    "jaxbn-scan": build_jaxbn_scan,
    "jaxbn-jit": build_jaxbn_jit,
    "flax-jit": build_flax_jit,
}


# --------------------------------------------------------------------------- PyTorch (own process)


def _torch_worker(spec_path: str) -> dict[str, Any]:
    """Builds and times the PyTorch contender from ``spec_path`` (run in a child process)."""
    with open(spec_path) as f:
        spec = json.load(f)
    torch = _common.optional_import("torch")
    if torch is None:
        return {"steps_per_s": None, "note": "torch not installed"}
    import torch.nn.functional as F

    torch.set_num_threads(_common.cpu_count())
    arrays = np.load(spec["arrays"])
    kernels = [arrays[f"kernel_{i}"] for i in range(spec["blocks"])]
    nn = torch.nn
    layers = []
    for k in kernels:
        layers += [
            nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1, bias=False),
            # PyTorch's momentum weighs the new batch: 1 - ours.
            nn.BatchNorm2d(k.shape[3], eps=spec["eps"], momentum=1.0 - spec["momentum"]),
            nn.ReLU(),
        ]
    head = nn.Linear(*arrays["head_kernel"].shape)
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    norms = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for conv, k in zip(convs, kernels, strict=True):
            conv.weight.copy_(torch.from_numpy(k).permute(3, 2, 0, 1))  # HWIO -> OIHW
        head.weight.copy_(torch.from_numpy(arrays["head_kernel"].T.copy()))
        head.bias.copy_(torch.from_numpy(arrays["head_bias"]))
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=spec["lr"])
    batches = []
    for i in range(spec["num_batches"]):
        x = torch.from_numpy(arrays[f"x_{i}"]).permute(0, 3, 1, 2)  # NHWC data: channels-last
        batches.append((x.contiguous(memory_format=torch.channels_last), arrays[f"y_{i}"]))
    batches = [(x, torch.from_numpy(y.astype(np.int64))) for x, y in batches]

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        return loss.detach(), (logits.argmax(1) == y).float().mean()

    loss0, _ = train_step(*batches[0])
    check = (
        float(loss0),
        _canonical(
            [c.weight.detach().permute(2, 3, 1, 0).numpy() for c in convs],
            [b.weight.detach().numpy() for b in norms],
            [b.bias.detach().numpy() for b in norms],
            [head.weight.detach().numpy().T, head.bias.detach().numpy()],
        ),
    )
    pos = [1]

    def run(n):
        out = None
        for _ in range(n):
            out = train_step(*batches[pos[0] % len(batches)])
            pos[0] += 1
        return out

    contender = _common.Contender(
        run, note=f"{torch.get_num_threads()} threads, channels-last, own process"
    )
    out = _common.time_steps(
        contender,
        reps=spec["reps"],
        warmup=spec["warmup"],
        min_time=spec["min_time"],
        quiet=spec["quiet"],
    )
    out["note"] = contender.note
    out["check_loss"] = check[0]
    out["check_params"] = [a.tolist() for a in check[1]]
    return out


def _run_torch(wl: CnnWorkload, *, reps, warmup, min_time, quiet) -> dict[str, Any]:
    """Runs :func:`_torch_worker` in a child process with ``OMP_WAIT_POLICY=PASSIVE``."""
    if _common.optional_import("torch") is None:
        return {"steps_per_s": None, "note": "torch not installed"}
    with tempfile.TemporaryDirectory() as tmp:
        arrays = {
            f"kernel_{i}": np.asarray(b["conv"]["kernel"])
            for i, b in enumerate(wl.params["blocks"])
        }
        arrays["head_kernel"] = np.asarray(wl.params["head"]["kernel"])
        arrays["head_bias"] = np.asarray(wl.params["head"]["bias"])
        for i, (x, y) in enumerate(wl.batches):
            arrays[f"x_{i}"], arrays[f"y_{i}"] = x, y
        spec = {
            "arrays": os.path.join(tmp, "arrays.npz"),
            "blocks": len(wl.params["blocks"]),
            "num_batches": len(wl.batches),
            "eps": wl.model.eps,
            "momentum": wl.model.momentum,
            "lr": wl.lr,
            "reps": reps,
            "warmup": warmup,
            "min_time": min_time,
            "quiet": quiet,
        }
        np.savez(spec["arrays"], **arrays)
        spec_path = os.path.join(tmp, "spec.json")
        out_path = os.path.join(tmp, "out.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--torch-worker", spec_path, out_path],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"steps_per_s": None, "note": f"failed: {err[:80]}"}
        with open(out_path) as f:
            return json.load(f)


# --------------------------------------------------------------------------- conv diagnostic


def conv_diagnostic(
    *, steps: int = 20, batch_size: int = 64, image_size: int = 8, channels=(32, 64)
) -> dict[str, Any]:
    """Milliseconds per gradient step of a conv stack: autodiff conv vs :func:`jaxbn.cnn.conv`.

    A stack of ``relu(conv(h, kernel))`` layers (no batch norm), one SGD step on
    ``sum(mean_pool(h) * ct)`` with a random cotangent ``ct``, compiled two ways:
    one jitted step per call, and ``steps`` steps in one ``lax.scan``. Also lists
    the convolution forms (``dim_labels``) in the compiled scan: XLA:CPU runs only
    ``b01f_01io->b01f`` with its fast kernels, and brings other forms to it only
    outside loops.
    """
    import re

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
    out: dict[str, Any] = {
        "shape": f"{batch_size}x{image_size}x{image_size}x1, channels {list(channels)}",
        "steps": steps,
    }
    for name, conv_fn in (("autodiff", autodiff_conv), ("jaxbn", conv)):

        def loss(kernels, x, ct, conv_fn=conv_fn):
            h = x
            for k in kernels:
                h = jax.nn.relu(conv_fn(h, k))
            return jnp.sum(h.mean(axis=(1, 2)) * ct)

        def step(kernels, i, loss=loss):
            grads = jax.grad(loss)(kernels, xs[i % 4], cts[i % 4])
            return [k - 0.01 * g for k, g in zip(kernels, grads, strict=True)]

        per_call = jax.jit(step)

        @jax.jit
        def scan(kernels, step=step):
            return lax.scan(lambda k, i: (step(k, i), None), kernels, jnp.arange(steps))[0]

        def calls(per_call=per_call):
            ks = kernels
            for i in range(steps):
                ks = per_call(ks, i)
            return ks

        forms = re.findall(
            r"convolution\([^)]*\).*?dim_labels=([^,\s]+)", scan.lower(kernels).compile().as_text()
        )
        _common.block(per_call(kernels, 0))
        _common.block(scan(kernels))
        t_call = _common.time_calls(calls, reps=3, warmup=0)
        t_scan = _common.time_calls(lambda scan=scan: scan(kernels), reps=3, warmup=0)
        out[name] = {
            "per_call_ms": 1e3 * t_call.median / steps,
            "scan_ms": 1e3 * t_scan.median / steps,
            "scan_conv_forms": sorted(set(forms)),
        }
    return out


def _diagnostic_table(diag: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{diag[name]['per_call_ms']:.2f}",
            f"{diag[name]['scan_ms']:.2f}",
            f"{diag[name]['scan_ms'] / diag[name]['per_call_ms']:.1f}",
            " ".join(diag[name]["scan_conv_forms"]),
        ]
        for name in ("autodiff", "jaxbn")
    ]
    table = _common.format_table(
        ["conv", "ms/step per call", "ms/step in scan", "scan / per call", "convolutions in scan"],
        rows,
    )
    return f"conv gradient steps, {diag['shape']} (diagnostic)\n{table}"


# --------------------------------------------------------------------------- running


def run_benchmark(
    wl: CnnWorkload,
    contenders: Sequence[str],
    *,
    reps: int,
    warmup: int,
    min_time: float,
    steps_per_call: int,
    quiet: bool,
) -> dict[str, Any]:
    """Builds, checks, times and measures every contender; PyTorch last, in its own process."""
    import optax

    opt = optax.sgd(wl.lr)
    res: dict[str, Any] = {
        "case": wl.label,
        "channels": list(wl.model.channels),
        "image_size": wl.image_size,
        "batch_size": wl.batch_size,
        "lr": wl.lr,
        "contenders": {},
    }
    want = None
    for name in contenders:
        if name == "torch-eager":
            continue
        entry: dict[str, Any] = {"steps_per_s": None, "note": ""}
        res["contenders"][name] = entry
        try:
            c = BUILDERS[name](wl, opt, steps_per_call=steps_per_call)
        except _common.Unavailable as e:
            entry["note"] = str(e)
            print(f"note     {name} skipped: {e}")
            continue
        entry["note"] = c.note
        if c.check is not None:
            want = want or c.check
            entry["check_loss"] = c.check[0]
            entry["rel_err"] = _common.rel_err(c.check, want)
        entry.update(
            _common.time_steps(c, reps=reps, warmup=warmup, min_time=min_time, quiet=quiet)
        )
        if name in MEMORY_CONTENDERS:
            entry["memory"] = _common.memory_of(c)
        print(f"  {name:<12} {entry['steps_per_s']:>10,.2f} steps/s", flush=True)
        del c
    if "torch-eager" in contenders:
        entry = _run_torch(wl, reps=reps, warmup=warmup, min_time=min_time, quiet=quiet)
        params = entry.pop("check_params", None)
        if params is not None and want is not None:
            check = (entry["check_loss"], [np.asarray(p, np.float32) for p in params])
            entry["rel_err"] = _common.rel_err(check, want)
        res["contenders"]["torch-eager"] = entry
        if entry["steps_per_s"] is not None:
            print(f"  {'torch-eager':<12} {entry['steps_per_s']:>10,.2f} steps/s", flush=True)
        else:
            print(f"note     torch-eager skipped: {entry['note']}")
    flax = res["contenders"].get("flax-jit", {})
    flax_speed = flax.get("steps_per_s")
    flax_mem = (flax.get("memory") or {}).get("temp_bytes")
    for entry in res["contenders"].values():
        s = entry["steps_per_s"]
        entry["speed_vs_flax"] = None if s is None or not flax_speed else s / flax_speed
        mem = entry.get("memory")
        if mem is not None:
            mem["temp_vs_flax"] = None if not flax_mem else mem["temp_bytes"] / flax_mem
    return res


def _targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    c = res["contenders"]
    speed = c.get("jaxbn-jit", {}).get("speed_vs_flax")
    mem = (c.get("jaxbn-jit", {}).get("memory") or {}).get("temp_vs_flax")
    return [
        {
            "target": f"jaxbn-jit steps/s >= {SPEED_TARGET:g}x Flax's",
            "value": speed,
            "met": None if speed is None else speed >= SPEED_TARGET,
        },
        {
            "target": f"jaxbn-jit step temp memory <= {MEMORY_TARGET}x Flax's",
            "value": mem,
            "met": None if mem is None else mem <= MEMORY_TARGET,
        },
    ]


def _tables(res: dict[str, Any]) -> str:
    rows, mem_rows = [], []
    for name, e in res["contenders"].items():
        rows.append(
            [
                name,
                "n/a" if e["steps_per_s"] is None else f"{e['steps_per_s']:.2f}",
                "" if e.get("iqr_rel") is None else f"{100 * e['iqr_rel']:.0f}%",
                "" if e.get("speed_vs_flax") is None else f"{e['speed_vs_flax']:.2f}",
                "" if e.get("rel_err") is None else f"{e['rel_err']:.0e}",
                e["note"],
            ]
        )
        mem = e.get("memory")
        if mem is not None:
            mib = _common.MiB
            vs = "" if mem["temp_vs_flax"] is None else f"{mem['temp_vs_flax']:.2f}"
            mem_rows.append([name, f"{mem['temp_bytes'] / mib:.1f}", vs])
    speed = _common.format_table(
        ["contender", "steps/s", "±IQR/2", "speed / flax", "rel err", "note"], rows
    )
    memory = _common.format_table(["contender", "temp MiB", "temp / flax"], mem_rows)
    return (
        f"steps per second (higher is better), {res['case']}\n{speed}\n\n"
        f"peak temporary memory of one compiled training step (memory_analysis)\n{memory}"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="CNN training step: jaxbn (scan loop, per-call) vs Flax and PyTorch."
    )
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, help="subset to run")
    p.add_argument("--reps", type=int, default=5, help="timed runs per contender (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--min-time", type=float, default=2.0, help="seconds per timed run")
    p.add_argument("--steps-per-call", type=int, default=5, help="scan loop: steps per dispatch")
    p.add_argument("--batch-size", type=int, default=128, help="examples per step")
    p.add_argument("--image-size", type=int, default=32, help="height and width of the images")
    p.add_argument(
        "--channels", default="64,64,64,64", help="channels of each block, comma-separated"
    )
    p.add_argument(
        "--conv-diagnostic",
        action="store_true",
        help="also time a conv stack's gradient step per call and inside lax.scan, with "
        "autodiff's convolution and with jaxbn.cnn.conv (digits-sized images)",
    )
    p.add_argument("--no-wait-idle", action="store_true", help="do not wait for idle CPUs")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: tiny runs (numbers meaningless)"
    )
    p.add_argument("--torch-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; prints the tables and the targets; returns the results.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        A dict with ``machine``, the settings, ``results`` (per contender:
        ``steps_per_s``, ``speed_vs_flax``, the spread, ``rel_err`` and, for
        ``jaxbn-jit`` and ``flax-jit``, ``memory``), ``targets`` and, with
        ``--conv-diagnostic``, ``conv_diagnostic`` (:func:`conv_diagnostic`).
    """
    args = _parser().parse_args(argv)
    if args.torch_worker:
        spec, out = args.torch_worker
        result = _torch_worker(spec)
        with open(out, "w") as f:
            json.dump(result, f)
        return result
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise SystemExit(
            f"--channels: expected comma-separated ints, got {args.channels!r}"
        ) from None
    reps, warmup, min_time, spc = args.reps, args.warmup, args.min_time, args.steps_per_call
    if args.quick:
        reps, warmup, min_time, spc = min(reps, 2), 1, 0.01, min(spc, 2)
    quiet = not (args.quick or args.no_wait_idle)
    contenders = args.contenders or list(CONTENDERS)

    info = _common.machine_info(("jax", "jaxlib", "numpy", "optax", "flax", "torch"))
    _common.print_machine(info)
    print(
        f"timing   median of {reps} runs of >= {min_time} s each after compilation and "
        f"{warmup} warm-up run(s); scan loop: {spc} steps per dispatch; "
        f"optax.sgd({0.01}) / torch.optim.SGD, float32\n"
    )
    wl = make_workload(channels=channels, image_size=args.image_size, batch_size=args.batch_size)
    res = run_benchmark(
        wl, contenders, reps=reps, warmup=warmup, min_time=min_time, steps_per_call=spc, quiet=quiet
    )
    diag = None
    if args.conv_diagnostic:
        diag = conv_diagnostic(steps=2) if args.quick else conv_diagnostic()
    print()
    print(_tables(res))
    if diag is not None:
        print()
        print(_diagnostic_table(diag))
    targets = _targets(res)
    print("\ntargets")
    for t in targets:
        status = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        value = "" if t["value"] is None else f" ({t['value']:.2f}x)"
        print(f"  {status:<8} {t['target']}{value}")
    print(
        f"\nload average (1 min) at start {info['load_avg_1min']:.2f}, "
        f"at end {_common.load_average():.2f} (other processes add noise)"
    )
    out = {
        "machine": info,
        "reps": reps,
        "warmup": warmup,
        "min_time_s": min_time,
        "steps_per_call": spc,
        "results": res,
        "conv_diagnostic": diag,
        "targets": targets,
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)

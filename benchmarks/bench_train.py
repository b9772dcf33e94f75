"""Training steps/s and compiled-step memory of jaxbn's models against their peers.

``paper``: the 64-100x3-10 sigmoid MLP of Ioffe & Szegedy (2015), batch 60, on
the bundled digits; ``wide``: 784-1024x4-10 relu, batch 512, on synthetic blobs.
Float32, plain SGD. Every contender starts from ``model.init``'s parameters and
is checked against ``jaxbn-jit`` after one step (``rel err``): ``jaxbn-scan``
(:func:`jaxbn.train.make_train_loop`, batches drawn on the device),
``jaxbn-jit`` (``make_train_step``, one step per call; ``-remat``: with
``remat=True``), ``reference-jit`` (the same step with
:func:`jaxbn.reference.batch_norm`, JAX autodiff), ``flax-jit`` (``flax.linen``
with ``nn.BatchNorm``) and ``torch-eager`` (``BatchNorm1d``
or ``2d``, ``optim.SGD``, in its own process). ``bench_cnn.py`` and
``bench_fused.py`` run these builders on :class:`jaxbn.CNN` and fused layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import _common
import numpy as np

MODELS = ("paper", "wide")
NUM_BATCHES = 16  # distinct pre-generated batches the per-call loops cycle through
STEPS_PER_CALL = {"paper": 500, "wide": 20}  # scan loops: enough to amortize the dispatch


@dataclasses.dataclass
class Workload:
    """A jaxbn model (``MLP`` or ``CNN``), its data, batches and initial variables."""

    name: str
    model: Any
    batch_size: int
    lr: float
    x_train: np.ndarray
    y_train: np.ndarray
    batches: list[tuple[np.ndarray, np.ndarray]]
    params: Any
    state: Any
    steps_per_call: int = 1

    @property
    def label(self) -> str:
        """The case name, e.g. ``mlp_64-100-100-100-10_sigmoid_b60_float32``."""
        m = self.model
        if hasattr(m, "layer_sizes"):
            net = f"mlp_{'-'.join(map(str, m.layer_sizes))}_{m.activation}"
        else:
            s = self.x_train.shape[1]
            net = f"cnn_{len(m.channels)}x{m.channels[0]}_{s}x{s}x{m.in_channels}"
        return f"{net}_b{self.batch_size}_float32"


def workload(name, model, x_train, y_train, *, batch_size, lr, steps_per_call=1) -> Workload:
    """Initial variables from ``key(0)`` and ``NUM_BATCHES`` batches drawn with seed 0."""
    import jax

    params, state = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(x_train), batch_size, replace=False) for _ in range(NUM_BATCHES)]
    batches = [(x_train[i], y_train[i]) for i in picks]
    return Workload(
        name, model, batch_size, lr, x_train, y_train, batches, params, state, steps_per_call
    )


def make_workload(name: str, *, lr: float = 0.1, activation: str | None = None) -> Workload:
    """The ``paper`` or ``wide`` MLP (Flax's momentum and eps), its data and start."""
    from jaxbn import MLP, data

    if name == "paper":
        ds, sizes, act, batch = data.load_digits(), (64, 100, 100, 100, 10), "sigmoid", 60
    elif name == "wide":
        ds = data.make_blobs(num_examples=10240, num_features=784, num_classes=10)
        sizes, act, batch = (784, 1024, 1024, 1024, 1024, 10), "relu", 512
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    model = MLP(sizes, activation=activation or act, momentum=0.99, eps=1e-5)
    return workload(name, model, ds.x_train, ds.y_train, batch_size=batch, lr=lr)


@dataclasses.dataclass
class Contender:
    """``run(n)`` takes ``n`` more steps; ``check`` is ``{"loss", path: param}`` after one."""

    run: Callable[[int], Any]
    granularity: int = 1
    check: dict[str, np.ndarray] | None = None
    memory: dict[str, int] | None = None
    note: str = ""


def flat(tree, rename: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """``{"layers/0/dense/kernel": array}``; ``rename``: ``{"Dense_0": "layers/0/dense"}``."""
    import jax

    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        parts[0] = (rename or {}).get(parts[0], parts[0])
        out["/".join(parts)] = np.array(value, np.float32)
    return out


def _per_call(wl: Workload, step, opt, params, state, rename=None) -> Contender:
    """One jitted step per call, cycling through the batches on the device."""
    import jax

    jstep = jax.jit(step)
    batches = jax.device_put(wl.batches)
    args = (params, state, opt.init(params), batches[0])
    new_params, _, _, metrics = jstep(*args)
    check = {"loss": np.asarray(metrics["loss"]), **flat(new_params, rename)}
    carry, pos = [args[:3]], [0]

    def run(n):
        for _ in range(n):
            carry[0] = jstep(*carry[0], batches[pos[0] % len(batches)])[:3]
            pos[0] += 1
        return carry[0]

    return Contender(run, check=check, memory=_common.memory_of(step, *args))


def build_jit(wl: Workload, opt, **model_changes) -> Contender:
    """``jax.jit(make_train_step(model, opt))`` of the workload's model with ``model_changes``."""
    from jaxbn.train import make_train_step

    step = make_train_step(dataclasses.replace(wl.model, **model_changes), opt)
    return _per_call(wl, step, opt, wl.params, wl.state)


def build_reference(wl: Workload, opt) -> Contender:
    """The jaxbn step with :func:`jaxbn.reference.batch_norm` in every layer (autodiff)."""
    import jaxbn.layer
    from jaxbn import reference
    from jaxbn.train import make_train_step

    inner = make_train_step(wl.model, opt)

    def step(*args):  # traced under the patch: the compiled step has the reference op
        with mock.patch.object(jaxbn.layer, "batch_norm", reference.batch_norm):
            return inner(*args)

    return _per_call(wl, step, opt, wl.params, wl.state)


def build_scan(wl: Workload, opt) -> Contender:
    """:func:`jaxbn.train.make_train_loop`: ``steps_per_call`` steps per dispatch in a scan."""
    import jax

    from jaxbn.train import init_train_state, make_train_loop

    spc = wl.steps_per_call
    loop = make_train_loop(wl.model, opt, batch_size=wl.batch_size)
    data = jax.device_put((wl.x_train, wl.y_train))
    state = [init_train_state(wl.model, opt, jax.random.key(0))]

    def run(n):
        for _ in range(n // spc):
            state[0] = loop(state[0], *data, spc)[0]
        return state[0]

    return Contender(run, granularity=spc, note=f"{spc} steps/dispatch; batches drawn on device")


def _flax_names(model) -> list[tuple[tuple, str]]:
    """``(path in jaxbn's params, Flax module name)`` of every layer with parameters."""
    if hasattr(model, "layer_sizes"):
        n = len(model.layer_sizes) - 1
        dense = [(("layers", i, "dense"), f"Dense_{i}") for i in range(n)]
        return dense + [(("layers", i, "batch_norm"), f"BatchNorm_{i}") for i in range(n - 1)]
    convs = [(("blocks", i, "conv"), f"Conv_{i}") for i in range(len(model.channels))]
    norms = [(("blocks", i, "batch_norm"), f"BatchNorm_{i}") for i in range(len(model.channels))]
    return [*convs, *norms, (("head",), "Dense_0")]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def flax_module(nn, model):
    """The jaxbn model's network in ``flax.linen`` (layers named as :func:`_flax_names`)."""
    import jax

    act = getattr(jax.nn, model.activation)
    mlp = hasattr(model, "layer_sizes")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            for width in model.layer_sizes[1:-1] if mlp else model.channels:
                layer = (
                    nn.Dense(width, use_bias=False)
                    if mlp
                    else nn.Conv(width, (3, 3), use_bias=False)
                )
                bn = nn.BatchNorm(
                    use_running_average=not train, momentum=model.momentum, epsilon=model.eps
                )
                x = act(bn(layer(x)))
            if mlp:
                return nn.Dense(model.layer_sizes[-1])(x)
            return nn.Dense(model.num_classes)(x.mean(axis=(1, 2)))

    return Net()


@dataclasses.dataclass(frozen=True)
class FlaxModel:
    """A ``flax.linen`` module under jaxbn's model protocol, for ``make_train_step``."""

    module: Any

    def init(self, key):
        """Not used: every contender starts from the jaxbn model's parameters."""
        raise NotImplementedError

    def apply(self, params, state, x, *, training):
        """Logits and the new ``batch_stats`` (``mutable=["batch_stats"]``)."""
        variables = {"params": params, "batch_stats": state}
        logits, up = self.module.apply(variables, x, train=training, mutable=["batch_stats"])
        return logits, up["batch_stats"]


def build_flax(wl: Workload, opt) -> Contender:
    """The network in ``flax.linen`` with ``nn.BatchNorm``, trained by jaxbn's step."""
    from jaxbn.train import make_train_step

    nn = _common.optional_import("flax.linen")
    if nn is None:
        raise _common.Unavailable("flax not installed")
    names = _flax_names(wl.model)
    params = {name: dict(_get(wl.params, path)) for path, name in names}
    stats = {name: dict(_get(wl.state, path)) for path, name in names if "BatchNorm" in name}
    step = make_train_step(FlaxModel(flax_module(nn, wl.model)), opt)
    rename = {name: "/".join(map(str, path)) for path, name in names}
    return _per_call(wl, step, opt, params, stats, rename)


def _torch_net(torch, spec: dict, params: dict):
    """``nn.Sequential`` of the jaxbn model and ``{path: parameter}`` with jaxbn's values."""
    nn, mlp = torch.nn, spec["kind"] == "mlp"
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}[spec["activation"]]
    layers, tensors, i = [], {}, 0
    block, layer = ("layers", "dense") if mlp else ("blocks", "conv")
    while f"{block}/{i}/batch_norm/scale" in params:
        k = params[f"{block}/{i}/{layer}/kernel"]
        if mlp:
            lin, bn = nn.Linear(*k.shape, bias=False), nn.BatchNorm1d
        else:
            lin, bn = nn.Conv2d(k.shape[2], k.shape[3], 3, padding=1, bias=False), nn.BatchNorm2d
        # PyTorch's momentum weighs the new batch: 1 - ours.
        bn = bn(k.shape[-1], eps=spec["eps"], momentum=1.0 - spec["momentum"])
        layers += [lin, bn, act()]
        tensors[f"{block}/{i}/{layer}/kernel"] = lin.weight
        for leaf, tensor in (("scale", bn.weight), ("bias", bn.bias)):
            tensors[f"{block}/{i}/batch_norm/{leaf}"] = tensor
        i += 1
    head = f"layers/{i}/dense" if mlp else "head"
    linear = nn.Linear(*params[f"{head}/kernel"].shape)
    layers += [linear] if mlp else [nn.AdaptiveAvgPool2d(1), nn.Flatten(), linear]
    tensors[f"{head}/kernel"], tensors[f"{head}/bias"] = linear.weight, linear.bias
    with torch.no_grad():
        for path, t in tensors.items():
            t.copy_(torch.from_numpy(_torch_layout(params[path])))
    net = nn.Sequential(*layers).train()
    return (net if mlp else net.to(memory_format=torch.channels_last)), tensors


def _torch_layout(a: np.ndarray, back: bool = False) -> np.ndarray:
    """jaxbn's kernel layout to PyTorch's (``back``: the other way)."""
    if a.ndim == 2:
        return a.T.copy()
    if a.ndim == 4:  # HWIO <-> OIHW
        return a.transpose((2, 3, 1, 0) if back else (3, 2, 0, 1)).copy()
    return a.copy()  # not a view of a tensor that later steps change


def torch_worker(spec: dict, arrays: dict) -> tuple[dict, dict]:
    """Checks and times PyTorch training (run by :func:`_common.in_own_process`)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(_common.cpu_count())
    params = {k[2:]: v for k, v in arrays.items() if k.startswith("p:")}
    net, tensors = _torch_net(torch, spec, params)
    opt = torch.optim.SGD(net.parameters(), lr=spec["lr"])
    xs = torch.from_numpy(arrays["xs"])
    if xs.ndim == 5:  # NHWC images: channels-last in PyTorch's NCHW view
        xs = xs.permute(0, 1, 4, 2, 3)
    batches = [
        (x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x, y)
        for x, y in zip(xs, torch.from_numpy(arrays["ys"].astype(np.int64)), strict=True)
    ]

    pos = [0]

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            x, y = batches[pos[0] % len(batches)]
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            accuracy = (logits.argmax(1) == y).float().mean()
            pos[0] += 1
        return loss.detach(), accuracy

    loss = float(run(1)[0])
    check = {p: _torch_layout(t.detach().numpy(), back=True) for p, t in tensors.items()}
    timing = _common.interleave({"torch": run}, **spec["timing"])["torch"]
    return dict(timing, note=f"{torch.get_num_threads()} threads, own process", loss=loss), check


def build_torch(wl: Workload, timing: dict) -> tuple[dict, dict]:
    """PyTorch's entry (timed in its own process) and its check."""
    if _common.optional_import("torch") is None:
        raise _common.Unavailable("torch not installed")
    m = wl.model
    spec = {k: getattr(m, k) for k in ("activation", "eps", "momentum")}
    kind = "mlp" if hasattr(m, "layer_sizes") else "cnn"
    spec.update(kind=kind, lr=wl.lr, timing=timing)
    arrays = {f"p:{k}": v for k, v in flat(wl.params).items()}
    arrays["xs"], arrays["ys"] = (np.stack(a) for a in zip(*wl.batches, strict=True))
    entry, check = _common.in_own_process(torch_worker, spec, arrays)
    check["loss"] = np.asarray(entry.pop("loss"))
    return entry, check


BUILDERS = {
    "jaxbn-scan": build_scan,
    "jaxbn-jit": build_jit,
    "jaxbn-remat-jit": lambda wl, opt: build_jit(wl, opt, remat=True),
    "reference-jit": build_reference,
    "flax-jit": build_flax,
}
CONTENDERS = (*BUILDERS, "torch-eager")


def run_model(
    wl: Workload,
    builders: dict,
    torch: bool,
    *,
    timing: dict,
    check_against: str,
    baseline: str,
) -> dict:
    """Builds, checks and times ``builders``' contenders interleaved, then (``torch``) PyTorch.

    ``rel_err`` compares with ``check_against`` after one step; ``speed_ratio``
    is the steps/s over ``baseline``'s.
    """
    import optax

    opt = optax.sgd(wl.lr)
    entries, built, checks = {}, {}, {}
    for name, build in builders.items():
        try:
            c = built[name] = build(wl, opt)
        except _common.Unavailable as e:
            entries[name] = {"steps_per_s": None, "note": str(e)}
            print(f"note     {wl.name}: {name} skipped: {e}")
            continue
        entries[name] = {"note": c.note, "memory": c.memory}
        checks[name] = c.check
    runs = {k: c.run for k, c in built.items()}
    granularity = {k: c.granularity for k, c in built.items()}
    for name, summary in _common.interleave(runs, granularity=granularity, **timing).items():
        entries[name].update(summary)
    if torch:
        try:
            entries["torch-eager"], checks["torch-eager"] = build_torch(wl, timing)
        except _common.Unavailable as e:
            entries["torch-eager"] = {"steps_per_s": None, "note": str(e)}
    base = entries.get(baseline, {}).get("steps_per_s")
    flax = next((e for k, e in entries.items() if k.startswith("flax")), {})
    flax_mem = (flax.get("memory") or {}).get("temp_bytes")
    for name, e in entries.items():
        e["speed_ratio"] = e["steps_per_s"] / base if e["steps_per_s"] and base else None
        if checks.get(name) is not None and checks.get(check_against) is not None:
            want = checks[check_against]
            e["rel_err"] = _common.rel_err([checks[name][k] for k in want], want.values())
        if e.get("memory") and flax_mem:
            e["memory"]["temp_vs_flax"] = e["memory"]["temp_bytes"] / flax_mem
    return {"name": wl.name, "case": wl.label, "baseline": baseline, "contenders": entries}


SPEED = (
    ("case", "case"),
    ("contender", "contender"),
    ("steps/s", "steps_per_s", ",.2f"),
    ("±IQR/2", "iqr_rel", ".0%"),
    ("steps/run", "steps_per_run"),
    ("speed / baseline", "speed_ratio", ".2f"),
    ("rel err", "rel_err", ".0e"),
    ("note", "note"),
)
MEMORY = (
    ("case", "case"),
    ("contender", "contender"),
    ("temp MiB", "temp_bytes", ".3f", 1 / _common.MiB),
    ("temp / flax", "temp_vs_flax", ".2f"),
    ("outputs MiB", "output_bytes", ".3f", 1 / _common.MiB),
)


def tables(models: list[dict]) -> str:
    """The speed table and the memory table of :func:`run_model`'s results."""
    rows = [
        dict(e, case=m["case"], contender=k) for m in models for k, e in m["contenders"].items()
    ]
    memory = [dict(r, **r["memory"]) for r in rows if r.get("memory")]
    return (
        f"steps per second (higher is better; baseline {models[0]['baseline']})\n"
        f"{_common.table(rows, SPEED)}\n\n"
        f"temporary memory of one compiled training step (memory_analysis)\n"
        f"{_common.table(memory, MEMORY)}"
    )


def _parser():
    """The command-line flags."""
    p = _common.parser(
        "MLP training steps/s and step memory: jaxbn and its peers.", reps=7, warmup=2, min_time=0.5
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument("--steps-per-call", type=int, help=f"scan loops (default {STEPS_PER_CALL})")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables; returns the results."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.reps, args.warmup, args.min_time = min(args.reps, 3), 1, 0.01
    info = _common.machine_info(__file__, argv)
    print(f"timing   median of {args.reps} interleaved rounds of >= {args.min_time} s\n")
    builders = {k: BUILDERS[k] for k in args.contenders if k in BUILDERS}
    models = []
    for name in args.models:
        wl = make_workload(name, lr=args.lr)
        wl.steps_per_call = args.steps_per_call or (10 if args.quick else STEPS_PER_CALL[name])
        torch = "torch-eager" in args.contenders
        models.append(
            run_model(
                wl,
                builders,
                torch,
                timing=_common.timing(args),
                check_against="jaxbn-jit",
                baseline="jaxbn-scan",
            )
        )
    print(tables(models))
    return _common.finish(args, {"machine": info, "models": models})


if __name__ == "__main__":
    main()

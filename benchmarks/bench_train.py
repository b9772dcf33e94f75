"""Training throughput and compiled-step memory of jaxbn's models against their peers.

The networks (float32, plain SGD, batch norm before every hidden nonlinearity):
``paper``, 64-100-100-100-10 sigmoid, batch 60, on the bundled digits (Ioffe &
Szegedy 2015, Fig. 1), and ``wide``, 784-1024x4-10 relu, batch 512, on
synthetic blobs. ``bench_cnn.py`` and ``bench_fused.py`` run the same
contenders on :class:`jaxbn.CNN` and on fused activations.

Contenders, all from the same initial parameters (``model.init``) and checked
against ``jaxbn-jit`` after one step (``rel err``: loss and every parameter):

- ``jaxbn-scan``: :func:`jaxbn.train.make_train_loop`, many steps per dispatch,
  batches drawn on the device; ``jaxbn-scan-pregen`` (diagnostic) the same step
  in a ``lax.scan`` over the pre-generated batches, for the drawing's cost;
- ``jaxbn-jit``: ``jax.jit(make_train_step(model, opt))``, one step per call;
  ``jaxbn-remat-jit`` the same with ``remat=True``;
- ``reference-jit``: the same model and step, its batch norm replaced by
  :func:`jaxbn.reference.batch_norm` (JAX autodiff);
- ``flax-jit``: the network in ``flax.linen`` with ``nn.BatchNorm``;
- ``torch-eager`` (and with ``--torch-compile``, ``torch-compile``):
  ``nn.Sequential`` with ``BatchNorm1d``/``2d`` (channels-last for the CNN) and
  ``optim.SGD``, in its own process.

Memory: ``temp_size_in_bytes`` of ``memory_analysis()`` of each per-call JAX step.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import numpy as np

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

MODELS = ("paper", "wide")
CONTENDERS = (
    "jaxbn-scan",
    "jaxbn-scan-pregen",
    "jaxbn-jit",
    "jaxbn-remat-jit",
    "reference-jit",
    "flax-jit",
    "torch-eager",
    "torch-compile",
)
NUM_BATCHES = 16  # distinct pre-generated batches the per-call loops cycle through
STEPS_PER_CALL = {"paper": 500, "wide": 20}  # scan loops: enough to amortize the dispatch
MEMORY_TARGET = 0.9  # jaxbn's temporary memory at most this times Flax's
SPEED_TARGET = 2.0  # paper MLP: jaxbn-scan at least this times PyTorch's steps/s


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
    return workload(
        name,
        model,
        ds.x_train,
        ds.y_train,
        batch_size=batch,
        lr=lr,
        steps_per_call=STEPS_PER_CALL[name],
    )


@dataclasses.dataclass
class Contender:
    """``run(n)`` takes ``n`` more steps; ``check`` is ``{"loss", path: param}`` after one."""

    run: Callable[[int], Any]
    granularity: int = 1
    check: dict[str, np.ndarray] | None = None
    memory: dict[str, int] | None = None
    note: str = ""


def flat(tree) -> dict[str, np.ndarray]:
    """``{"layers/0/dense/kernel": array, ...}``: a pytree's leaves by path."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))  # noqa: E731
    return {"/".join(map(key, path)): np.array(v, np.float32) for path, v in leaves}


def _per_call(wl: Workload, step, opt, params, state, to_jaxbn=lambda p: p) -> Contender:
    """One jitted step per call, cycling through the batches on the device."""
    import jax

    jstep = jax.jit(step)
    batches = jax.device_put(wl.batches)
    args = (params, state, opt.init(params), batches[0])
    new_params, _, _, metrics = jstep(*args)
    check = {"loss": np.asarray(metrics["loss"]), **flat(to_jaxbn(new_params))}
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


def build_scan(wl: Workload, opt, *, pregen: bool = False) -> Contender:
    """``make_train_loop`` (batches drawn on the device) or, ``pregen``, a scan over ours."""
    import jax
    import jax.numpy as jnp

    from jaxbn.train import init_train_state, make_train_loop, make_train_step

    spc = wl.steps_per_call
    if pregen:
        step = make_train_step(wl.model, opt)
        xs, ys = (jax.device_put(np.stack(a)) for a in zip(*wl.batches, strict=True))

        @jax.jit
        def loop(carry):
            def body(c, i):
                j = i % xs.shape[0]
                return step(*c, (xs[j], ys[j]))[:3], None

            return jax.lax.scan(body, carry, jnp.arange(spc))[0]

        carry = [(wl.params, wl.state, opt.init(wl.params))]
        note = f"diagnostic: {spc} steps/dispatch, pre-generated batches"
    else:
        train_loop = make_train_loop(wl.model, opt, batch_size=wl.batch_size)
        data = jax.device_put((wl.x_train, wl.y_train))
        loop = lambda ts: train_loop(ts, *data, spc)[0]  # noqa: E731
        carry = [init_train_state(wl.model, opt, jax.random.key(0))]
        note = f"{spc} steps/dispatch; batches drawn on device"

    def run(n):
        for _ in range(n // spc):
            carry[0] = loop(carry[0])
        return carry[0]

    return Contender(run, granularity=spc, note=note)


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


def build_flax(wl: Workload, opt) -> Contender:
    """The network in ``flax.linen`` with ``nn.BatchNorm``, ``mutable=["batch_stats"]``."""
    import jax
    import optax

    from jaxbn.train import cross_entropy

    nn = _common.optional_import("flax.linen")
    if nn is None:
        raise _common.Unavailable("flax not installed")
    module, names = flax_module(nn, wl.model), _flax_names(wl.model)
    params = {name: dict(_get(wl.params, path)) for path, name in names}
    stats = {name: dict(_get(wl.state, path)) for path, name in names if "BatchNorm" in name}
    variables = module.init(jax.random.key(0), wl.batches[0][0], train=False)
    if jax.tree.structure({"params": params, "batch_stats": stats}) != jax.tree.structure(
        variables
    ):
        raise _common.Unavailable("flax variable layout differs from the expected one")

    def loss_fn(params, stats, x, labels):
        variables = {"params": params, "batch_stats": stats}
        logits, up = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels), (up["batch_stats"], logits)

    def step(params, stats, opt_state, batch):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (stats, logits)), grads = grad_fn(params, stats, *batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        accuracy = (logits.argmax(-1) == batch[1]).mean()
        metrics = {"loss": loss, "accuracy": accuracy}
        return optax.apply_updates(params, updates), stats, opt_state, metrics

    def to_jaxbn(fp):
        out = jax.tree.map(lambda a: a, wl.params)  # new containers, same structure
        for path, name in names:
            _get(out, path[:-1])[path[-1]] = fp[name]
        return out

    return _per_call(wl, step, opt, params, stats, to_jaxbn)


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
        tensors[f"{block}/{i}/batch_norm/scale"], tensors[f"{block}/{i}/batch_norm/bias"] = (
            bn.weight,
            bn.bias,
        )
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
    batches = []
    for i in range(sum(k.startswith("x") for k in arrays)):
        x = torch.from_numpy(arrays[f"x{i}"])
        if x.ndim == 4:  # NHWC data, channels-last in PyTorch's NCHW view
            x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        batches.append((x, torch.from_numpy(arrays[f"y{i}"].astype(np.int64))))

    def forward_loss(x, y):
        logits = net(x)
        return F.cross_entropy(logits, y), logits

    note = f"{torch.get_num_threads()} threads, own process"
    if spec["compile"]:
        forward_loss = torch.compile(forward_loss)
        note += "; torch.compile(forward + loss)"
    pos = [0]

    def run(n):
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            x, y = batches[pos[0] % len(batches)]
            loss, logits = forward_loss(x, y)
            loss.backward()
            opt.step()
            accuracy = (logits.argmax(1) == y).float().mean()
            pos[0] += 1
        return loss.detach(), accuracy

    loss = float(run(1)[0])
    check = {p: _torch_layout(t.detach().numpy(), back=True) for p, t in tensors.items()}
    timing = _common.interleave({"torch": run}, **spec["timing"])["torch"]
    return dict(timing, note=note, loss=loss), check


def build_torch(wl: Workload, opt, *, compiled: bool, timing: dict) -> dict:
    """PyTorch's entry (timed in its own process) and its check."""
    if _common.optional_import("torch") is None:
        raise _common.Unavailable("torch not installed")
    m = wl.model
    spec = {
        "kind": "mlp" if hasattr(m, "layer_sizes") else "cnn",
        "activation": m.activation,
        "eps": m.eps,
        "momentum": m.momentum,
        "lr": wl.lr,
        "compile": compiled,
        "timing": timing,
    }
    arrays = {f"p:{k}": v for k, v in flat(wl.params).items()}
    for i, (x, y) in enumerate(wl.batches):
        arrays[f"x{i}"], arrays[f"y{i}"] = x, y
    entry, check = _common.in_own_process(torch_worker, spec, arrays)
    check["loss"] = np.asarray(entry.pop("loss"))
    return entry, check


BUILDERS = {
    "jaxbn-scan": build_scan,
    "jaxbn-scan-pregen": lambda wl, opt: build_scan(wl, opt, pregen=True),
    "jaxbn-jit": build_jit,
    "jaxbn-remat-jit": lambda wl, opt: build_jit(wl, opt, remat=True),
    "reference-jit": build_reference,
    "flax-jit": build_flax,
}


def run_model(
    wl: Workload,
    builders: dict,
    torch: Sequence[str],
    *,
    timing: dict,
    check_against: str,
    baseline: str,
) -> dict:
    """Builds, checks and times the JAX contenders interleaved, then PyTorch in its own process.

    Args:
        wl: the workload.
        builders: ``{name: build(wl, opt) -> Contender}`` of the JAX contenders.
        torch: PyTorch contenders to run (``torch-eager``, ``torch-compile``).
        timing: :func:`_common.interleave`'s settings.
        check_against: the contender every ``rel_err`` compares with.
        baseline: the contender of the ``speed_ratio`` column (the steps/s over its).
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
    for name in torch:
        try:
            entries[name], checks[name] = build_torch(
                wl, opt, compiled=name == "torch-compile", timing=timing
            )
        except _common.Unavailable as e:
            entries[name] = {"steps_per_s": None, "note": str(e)}
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
    return {
        "name": wl.name,
        "case": wl.label,
        "batch_size": wl.batch_size,
        "lr": wl.lr,
        "baseline": baseline,
        "contenders": entries,
    }


def tables(models: list[dict]) -> str:
    """The speed table and the memory table of :func:`run_model`'s results."""
    rows, mem_rows, f = [], [], _common.fmt
    for res in models:
        for name, e in res["contenders"].items():
            rows.append(
                [
                    res["case"],
                    name,
                    f(e["steps_per_s"], ",.1f", missing="n/a"),
                    f(e.get("iqr_rel"), ".0%"),
                    e.get("steps_per_run"),
                    f(e["speed_ratio"], ".2f"),
                    f(e.get("rel_err"), ".0e"),
                    e["note"],
                ]
            )
            if mem := e.get("memory"):
                mem_rows.append(
                    [
                        res["case"],
                        name,
                        f(mem["temp_bytes"], ".3f", scale=1 / _common.MiB),
                        f(mem.get("temp_vs_flax"), ".2f"),
                        f(mem["output_bytes"], ".3f", scale=1 / _common.MiB),
                    ]
                )
    base = models[0]["baseline"]
    speed = _common.format_table(
        [
            "case",
            "contender",
            "steps/s",
            "±IQR/2",
            "steps/run",
            f"speed / {base}",
            "rel err",
            "note",
        ],
        rows,
    )
    memory = _common.format_table(
        ["case", "contender", "temp MiB", "temp / flax", "outputs MiB"], mem_rows
    )
    return (
        f"steps per second (higher is better)\n{speed}\n\n"
        f"temporary memory of one compiled training step (memory_analysis)\n{memory}"
    )


def _targets(models: list[dict]) -> list[dict]:
    out = []
    for res in models:
        c = res["contenders"]
        for name in ("jaxbn-jit", "jaxbn-remat-jit"):
            mem = (c.get(name, {}).get("memory") or {}).get("temp_vs_flax")
            text = f"{res['name']}: {name} step temp memory <= {MEMORY_TARGET}x Flax's"
            out.append(_common.target(text, mem, lambda v: v <= MEMORY_TARGET))
        if res["name"] == "paper":
            scan, torch = (c.get(k, {}).get("steps_per_s") for k in ("jaxbn-scan", "torch-eager"))
            text = f"paper: jaxbn-scan steps/s >= {SPEED_TARGET}x PyTorch eager"
            ratio = scan / torch if scan and torch else None
            out.append(_common.target(text, ratio, lambda v: v >= SPEED_TARGET))
    return out


def _parser():
    """The command-line flags."""
    p = _common.parser(
        "MLP training steps/s and step memory: jaxbn and its peers.", reps=7, warmup=2, min_time=0.5
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument(
        "--contenders", nargs="+", choices=CONTENDERS, help="default: all but torch-compile"
    )
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument("--steps-per-call", type=int, help=f"scan loops (default {STEPS_PER_CALL})")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables and targets; returns the results."""
    args = _parser().parse_args(argv)
    names = args.contenders or [c for c in CONTENDERS if c != "torch-compile"]
    names += ["torch-compile"] if args.torch_compile and "torch-compile" not in names else []
    if args.quick:
        args.reps, args.warmup, args.min_time = min(args.reps, 3), 1, 0.01
    info = _common.machine_info(__file__, argv)
    timing = _common.timing(args)
    print(f"timing   median of {args.reps} interleaved rounds of >= {args.min_time} s\n")
    models = []
    for name in args.models:
        wl = make_workload(name, lr=args.lr)
        wl.steps_per_call = args.steps_per_call or (10 if args.quick else wl.steps_per_call)
        builders = {k: BUILDERS[k] for k in names if k in BUILDERS}
        torch = [k for k in names if k.startswith("torch")]
        models.append(
            run_model(
                wl, builders, torch, timing=timing, check_against="jaxbn-jit", baseline="jaxbn-scan"
            )
        )
    print(tables(models))
    targets = _targets(models)
    _common.print_targets(targets)
    return _common.finish(args, {"machine": info, "models": models, "targets": targets})


if __name__ == "__main__":
    main()
    sys.exit(0)

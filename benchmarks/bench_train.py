"""MLP training throughput and compiled-step memory: jaxbn against its peers.

Two networks, each with batch norm between every hidden linear layer and its
nonlinearity, trained with ``optax.sgd`` (plain SGD, no momentum) on float32:

- ``paper``: 64-100-100-100-10, sigmoid, batch 60, on the bundled digits
  (:func:`jaxbn.data.load_digits`), the network of Ioffe & Szegedy (2015), Fig. 1;
- ``wide``: 784-1024-1024-1024-1024-10, relu, batch 512, on synthetic Gaussian
  blobs of that size (:func:`jaxbn.data.make_blobs`).

Contenders (every one does forward + backward + SGD update + running-statistics
update, and computes the batch's loss and accuracy, on the same architecture,
batch size and learning rate):

- ``jaxbn-scan``: :func:`jaxbn.train.make_train_loop`, many steps per dispatch
  in one ``lax.scan``. It also draws each batch on the device (a permutation
  of the training set per step and a gather), work the others do not do;
- ``jaxbn-scan-pregen`` (diagnostic): the same step in a ``lax.scan`` written
  here, over the pre-generated batches the per-call contenders use, to show
  what the loop's on-device batch drawing costs;
- ``jaxbn-jit``: ``jax.jit(make_train_step(model, opt))``, one step per call
  from a Python loop over batches already on the device;
- ``reference-jit``: the same network and step, with the batch norm of
  :func:`jaxbn.reference.batch_norm` (plain ``jnp``, differentiated by JAX
  autodiff) in a small forward written here, with the same running-statistics
  update, one step per call;
- ``flax-jit``: a ``flax.linen`` MLP with ``nn.BatchNorm`` (defaults, with
  momentum and epsilon matched), ``mutable=["batch_stats"]``, one step per call;
- ``torch-eager``: ``nn.Sequential(Linear(bias=False), BatchNorm1d, act, ...,
  Linear)`` with ``torch.optim.SGD``, eager, one step per Python iteration,
  with ``torch.set_num_threads`` set to the cores available
  (``--torch-compile`` adds ``torch-compile``, the same under ``torch.compile``).

All start from the same initial parameters (jaxbn's ``MLP.init``, converted);
the ``rel err`` column compares, after one step on the same batch, the loss and
every parameter with ``jaxbn-jit`` (a check that all take the same step). On
the wide network the autodiff contenders (reference, Flax) differ from jaxbn by
up to ~5e-3 relative in the small batch-norm biases: float32 rounding in the
autodiff backward; against a float64 computation jaxbn's gradients are within
~1e-6 and the autodiff ones within ~8e-3.

Steps per second: each timed run is a number of steps chosen so the run lasts
at least ``--min-time`` seconds (calibrated after compilation and warm-up); the
table reports the median over ``--reps`` runs, with the interquartile spread.

Memory: ``jax.jit(step).lower(*args).compile().memory_analysis()`` of one
training step (no donation) for the JAX contenders: ``temp_size_in_bytes``
(the compiled step's scratch: activations kept for the backward, gradients,
intermediates) next to the argument and output sizes.

Run ``python benchmarks/bench_train.py --help`` for the flags.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

__all__ = ["Workload", "main", "make_workload"]

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
MEMORY_CONTENDERS = ("jaxbn-jit", "jaxbn-remat-jit", "reference-jit", "flax-jit")
NUM_BATCHES = 16  # distinct pre-generated batches the per-call loops cycle through
# Steps per dispatch of the scan loops: enough to amortize the dispatch on the
# paper MLP (~0.1 ms a step); the wide one takes tens of ms a step anyway.
STEPS_PER_CALL = {"paper": 500, "wide": 20}
MEMORY_TARGET = 0.9  # jaxbn's temporary memory at most this times Flax's
SPEED_TARGET = 2.0  # paper MLP: jaxbn-scan at least this times PyTorch's steps/s


Unavailable = _common.Unavailable
Contender = _common.Contender
_host_loop = _common.host_loop
_sgd_step = _common.sgd_step
_rel_err = _common.rel_err
time_steps = _common.time_steps
memory_of = _common.memory_of


# --------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One network, its data and the shared starting point of every contender.

    Attributes:
        name: ``paper`` or ``wide``.
        model: the :class:`jaxbn.MLP` config.
        batch_size: examples per step.
        lr: SGD learning rate.
        x_train: ``[n, inputs]`` float32 training set (NumPy).
        y_train: ``[n]`` int32 labels (NumPy).
        batches: ``NUM_BATCHES`` pairs ``(x, labels)`` of NumPy arrays.
        params: initial params in jaxbn's layout (JAX arrays).
        state: initial running statistics in jaxbn's layout.
    """

    name: str
    model: Any
    batch_size: int
    lr: float
    x_train: np.ndarray
    y_train: np.ndarray
    batches: list[tuple[np.ndarray, np.ndarray]]
    params: Any
    state: Any

    @property
    def label(self) -> str:
        """``mlp_64-100-100-100-10_sigmoid_b60_float32``-style case name."""
        sizes = "-".join(map(str, self.model.layer_sizes))
        return f"mlp_{sizes}_{self.model.activation}_b{self.batch_size}_float32"


def make_workload(name: str, *, lr: float = 0.1) -> Workload:
    """Builds the data, the config and the initial parameters of a network.

    Args:
        name: ``"paper"`` (digits, 64-100x3-10, sigmoid, batch 60) or ``"wide"``
            (synthetic, 784-1024x4-10, relu, batch 512).
        lr: SGD learning rate.

    Returns:
        A :class:`Workload`.
    """
    import jax

    from jaxbn import MLP, data

    if name == "paper":
        ds = data.load_digits()
        sizes, activation, batch_size = (64, 100, 100, 100, 10), "sigmoid", 60
    elif name == "wide":
        ds = data.make_blobs(num_examples=10240, num_features=784, num_classes=10)
        sizes, activation, batch_size = (784, 1024, 1024, 1024, 1024, 10), "relu", 512
    else:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    # Momentum and eps are Flax's defaults (0.99, 1e-5): nothing to translate.
    model = MLP(sizes, activation=activation, momentum=0.99, eps=1e-5)
    params, state = model.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    n = ds.x_train.shape[0]
    batches = []
    for _ in range(NUM_BATCHES):
        idx = rng.choice(n, batch_size, replace=False)
        batches.append((ds.x_train[idx], ds.y_train[idx]))
    return Workload(name, model, batch_size, lr, ds.x_train, ds.y_train, batches, params, state)


def _canonical(kernels, bn_scales, bn_biases, out_bias) -> list[np.ndarray]:
    """The parameters in one order for the cross-check: kernels, scales, biases."""
    # Copies: a PyTorch tensor's NumPy view would follow its later training steps.
    return [np.array(a, np.float32) for a in (*kernels, *bn_scales, *bn_biases, out_bias)]


def _jaxbn_canonical(params) -> list[np.ndarray]:
    layers = params["layers"]
    hidden = layers[:-1]
    return _canonical(
        [layer["dense"]["kernel"] for layer in layers],
        [layer["batch_norm"]["scale"] for layer in hidden],
        [layer["batch_norm"]["bias"] for layer in hidden],
        layers[-1]["dense"]["bias"],
    )


# --------------------------------------------------------------------------- contenders
# A builder returns a Contender: ``run(n)`` takes ``n`` training steps (continuing
# from where the previous call stopped) and returns something to block on;
# ``check`` is ``(loss, canonical params)`` after one step from the initial
# parameters on batch 0; ``step_fn``/``step_args`` (JAX only) are the jittable
# step and its arguments, for the memory analysis.


def _jax_contender(step, params, state, opt_state, wl: Workload, to_canonical) -> Contender:
    import jax

    jstep = jax.jit(step)
    batches = [jax.device_put(b) for b in wl.batches]
    args = (params, state, opt_state, batches[0])
    new_params, _, _, metrics = jstep(*args)
    check = (float(metrics["loss"]), to_canonical(new_params))
    run = _host_loop(jstep, [(params, state, opt_state)], batches)
    return Contender(run, check=check, step_fn=step, step_args=args)


def build_jaxbn_scan(wl: Workload, opt, *, steps_per_call: int) -> Contender:
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

    return Contender(
        run,
        granularity=steps_per_call,
        note=f"{steps_per_call} steps/dispatch; batches drawn on device",
    )


def build_jaxbn_scan_pregen(wl: Workload, opt, *, steps_per_call: int) -> Contender:
    """Diagnostic: ``make_train_step`` in a ``lax.scan`` over the pre-generated batches.

    The same step as ``jaxbn-scan`` without drawing the batches on the device:
    the difference between the two is the cost of the loop's data pipeline.
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    from jaxbn.train import make_train_step

    step = make_train_step(wl.model, opt)
    xs = jax.device_put(np.stack([x for x, _ in wl.batches]))
    ys = jax.device_put(np.stack([y for _, y in wl.batches]))

    @jax.jit
    def loop(carry):
        def body(c, i):
            j = i % xs.shape[0]
            params, state, opt_state, metrics = step(*c, (xs[j], ys[j]))
            return (params, state, opt_state), metrics

        return lax.scan(body, carry, jnp.arange(steps_per_call))

    carry = [(wl.params, wl.state, opt.init(wl.params))]

    def run(n):
        for _ in range(n // steps_per_call):
            carry[0], _ = loop(carry[0])
        return carry[0]

    return Contender(
        run,
        granularity=steps_per_call,
        note=f"diagnostic: {steps_per_call} steps/dispatch, pre-generated batches",
    )


def build_jaxbn_jit(wl: Workload, opt, **_) -> Contender:
    """``jax.jit(jaxbn.train.make_train_step(model, opt))``, one step per call."""
    from jaxbn.train import make_train_step

    step = make_train_step(wl.model, opt)
    return _jax_contender(step, wl.params, wl.state, opt.init(wl.params), wl, _jaxbn_canonical)


def build_jaxbn_remat_jit(wl: Workload, opt, **_) -> Contender:
    """As ``jaxbn-jit`` with ``MLP(remat=True)``: hidden layers recomputed in the backward."""
    import dataclasses

    from jaxbn.train import make_train_step

    step = make_train_step(dataclasses.replace(wl.model, remat=True), opt)
    return _jax_contender(step, wl.params, wl.state, opt.init(wl.params), wl, _jaxbn_canonical)


def _local_forward(params, state, x, *, bn, activation, momentum, eps):
    """The MLP forward with a pluggable batch-norm op; jaxbn's params layout.

    ``bn(z, scale, bias, eps=eps) -> (y, mean, var)``; the running statistics get
    ``momentum * old + (1 - momentum) * batch`` with no gradient, as
    :class:`jaxbn.BatchNorm` does.
    """
    from jax import lax

    from jaxbn.mlp import ACTIVATIONS

    act = ACTIVATIONS[activation]
    h, new_states = x, []
    for layer, layer_state in zip(params["layers"], state["layers"], strict=True):
        dense = layer["dense"]
        z = h @ dense["kernel"]
        if "bias" in dense:
            z = z + dense["bias"]
        new = {}
        if "batch_norm" in layer:
            bnp = layer["batch_norm"]
            z, mean, var = bn(z, bnp["scale"], bnp["bias"], eps=eps)
            old = lax.stop_gradient(layer_state["batch_norm"])
            mean, var = lax.stop_gradient((mean, var))
            new["batch_norm"] = {
                "mean": momentum * old["mean"] + (1.0 - momentum) * mean,
                "var": momentum * old["var"] + (1.0 - momentum) * var,
            }
            z = act(z)
        new_states.append(new)
        h = z
    return h, {"layers": new_states}


def build_reference_jit(wl: Workload, opt, **_) -> Contender:
    """The same step with :func:`jaxbn.reference.batch_norm` (JAX autodiff)."""
    from jaxbn import reference
    from jaxbn.train import cross_entropy

    m = wl.model

    def loss_fn(params, state, x, labels):
        logits, new_state = _local_forward(
            params,
            state,
            x,
            bn=reference.batch_norm,
            activation=m.activation,
            momentum=m.momentum,
            eps=m.eps,
        )
        return cross_entropy(logits, labels), (new_state, logits)

    step = _sgd_step(loss_fn, opt)
    return _jax_contender(step, wl.params, wl.state, opt.init(wl.params), wl, _jaxbn_canonical)


def _flax_module(nn, model):
    sizes, act_name = model.layer_sizes, model.activation
    from jaxbn.mlp import ACTIVATIONS

    act = ACTIVATIONS[act_name]

    class FlaxMLP(nn.Module):
        """The MLP in ``flax.linen``: Dense(no bias) -> BatchNorm -> act, then Dense."""

        @nn.compact
        def __call__(self, x, train: bool):
            for width in sizes[1:-1]:
                x = nn.Dense(width, use_bias=False)(x)
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=model.momentum, epsilon=model.eps
                )(x)
                x = act(x)
            return nn.Dense(sizes[-1])(x)

    return FlaxMLP()


def _to_flax(params, state):
    """jaxbn's layout -> Flax's ``params`` and ``batch_stats`` collections."""
    layers = params["layers"]
    fp, fs = {}, {}
    for i, (layer, layer_state) in enumerate(zip(layers, state["layers"], strict=True)):
        fp[f"Dense_{i}"] = dict(layer["dense"])
        if "batch_norm" in layer:
            fp[f"BatchNorm_{i}"] = dict(layer["batch_norm"])
            fs[f"BatchNorm_{i}"] = dict(layer_state["batch_norm"])
    return fp, fs


def _flax_canonical(fp) -> list[np.ndarray]:
    n = sum(k.startswith("Dense_") for k in fp)
    return _canonical(
        [fp[f"Dense_{i}"]["kernel"] for i in range(n)],
        [fp[f"BatchNorm_{i}"]["scale"] for i in range(n - 1)],
        [fp[f"BatchNorm_{i}"]["bias"] for i in range(n - 1)],
        fp[f"Dense_{n - 1}"]["bias"],
    )


def build_flax_jit(wl: Workload, opt, **_) -> Contender:
    """``flax.linen`` MLP with ``nn.BatchNorm``, ``mutable=["batch_stats"]``."""
    import jax

    from jaxbn.train import cross_entropy

    nn = _common.optional_import("flax.linen")
    if nn is None:
        raise Unavailable("flax not installed")
    module = _flax_module(nn, wl.model)
    x0 = wl.batches[0][0]
    variables = module.init(jax.random.key(0), x0, train=False)
    fp, fs = _to_flax(wl.params, wl.state)
    got = jax.tree.structure({"params": fp, "batch_stats": fs})
    if got != jax.tree.structure(variables):
        raise Unavailable("flax variable layout differs from the expected one")

    def loss_fn(params, batch_stats, x, labels):
        logits, updates = module.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, labels), (updates["batch_stats"], logits)

    step = _sgd_step(loss_fn, opt)
    return _jax_contender(step, fp, fs, opt.init(fp), wl, _flax_canonical)


def _torch_net(torch, wl: Workload):
    nn = torch.nn
    sizes = wl.model.layer_sizes
    act = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}[wl.model.activation]
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes[:-1]):
        # PyTorch's momentum weighs the new batch: 1 - ours.
        layers += [
            nn.Linear(fan_in, fan_out, bias=False),
            nn.BatchNorm1d(fan_out, eps=wl.model.eps, momentum=1.0 - wl.model.momentum),
            act(),
        ]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        p = wl.params["layers"]
        linears = [m for m in net if isinstance(m, nn.Linear)]
        norms = [m for m in net if isinstance(m, nn.BatchNorm1d)]
        for lin, layer in zip(linears, p, strict=True):
            lin.weight.copy_(torch.from_numpy(np.array(layer["dense"]["kernel"]).T.copy()))
        linears[-1].bias.copy_(torch.from_numpy(np.array(p[-1]["dense"]["bias"])))
        for bn, layer in zip(norms, p[:-1], strict=True):
            bn.weight.copy_(torch.from_numpy(np.array(layer["batch_norm"]["scale"])))
            bn.bias.copy_(torch.from_numpy(np.array(layer["batch_norm"]["bias"])))
    return net, linears, norms


def _build_torch(wl: Workload, *, compiled: bool) -> Contender:
    torch = _common.optional_import("torch")
    if torch is None:
        raise Unavailable("torch not installed")
    import torch.nn.functional as F

    torch.set_num_threads(_common.cpu_count())
    net, linears, norms = _torch_net(torch, wl)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=wl.lr)
    batches = [
        (torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))) for x, y in wl.batches
    ]

    def forward_loss(x, y):
        logits = net(x)
        return F.cross_entropy(logits, y), logits

    note = f"{torch.get_num_threads()} threads"
    if compiled:
        forward_loss = torch.compile(forward_loss)
        note += "; torch.compile(forward + loss), eager SGD"

    def train_step(x, y):
        opt.zero_grad(set_to_none=True)
        loss, logits = forward_loss(x, y)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean()
        return loss.detach(), acc

    loss0, _ = train_step(*batches[0])
    check = (
        float(loss0),
        _canonical(
            [lin.weight.detach().numpy().T for lin in linears],
            [bn.weight.detach().numpy() for bn in norms],
            [bn.bias.detach().numpy() for bn in norms],
            linears[-1].bias.detach().numpy(),
        ),
    )
    pos = [1]

    def run(n):
        out = None
        for _ in range(n):
            out = train_step(*batches[pos[0] % len(batches)])
            pos[0] += 1
        return out

    return Contender(run, check=check, note=note)


def build_torch_eager(wl: Workload, opt, **_) -> Contender:
    """PyTorch eager: ``nn.Sequential`` MLP with ``BatchNorm1d``, ``optim.SGD``."""
    return _build_torch(wl, compiled=False)


def build_torch_compile(wl: Workload, opt, **_) -> Contender:
    """PyTorch with the forward and loss under ``torch.compile``."""
    return _build_torch(wl, compiled=True)


BUILDERS = {
    "jaxbn-scan": build_jaxbn_scan,
    "jaxbn-scan-pregen": build_jaxbn_scan_pregen,
    "jaxbn-jit": build_jaxbn_jit,
    "jaxbn-remat-jit": build_jaxbn_remat_jit,
    "reference-jit": build_reference_jit,
    "flax-jit": build_flax_jit,
    "torch-eager": build_torch_eager,
    "torch-compile": build_torch_compile,
}


# --------------------------------------------------------------------------- measuring


def run_model(
    wl: Workload,
    contenders: Sequence[str],
    *,
    reps: int,
    warmup: int,
    min_time: float,
    steps_per_call: int,
    quiet: bool,
) -> dict[str, Any]:
    """Builds, checks, times and measures every contender on one network."""
    import optax

    opt = optax.sgd(wl.lr)
    res: dict[str, Any] = {
        "name": wl.name,
        "case": wl.label,
        "layer_sizes": list(wl.model.layer_sizes),
        "activation": wl.model.activation,
        "batch_size": wl.batch_size,
        "lr": wl.lr,
        "train_examples": int(wl.x_train.shape[0]),
        "contenders": {},
    }
    want = None
    for name in contenders:
        entry: dict[str, Any] = {"steps_per_s": None, "note": ""}
        res["contenders"][name] = entry
        try:
            c = BUILDERS[name](wl, opt, steps_per_call=steps_per_call)
        except Unavailable as e:
            entry["note"] = str(e)
            print(f"note     {wl.name}: {name} skipped: {e}")
            continue
        except Exception as e:  # e.g. torch.compile without a working toolchain
            if name != "torch-compile":
                raise
            entry["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:60]}"
            print(f"note     {wl.name}: {name} skipped: {entry['note']}")
            continue
        entry["note"] = c.note
        if c.check is not None:
            if want is None:
                want = c.check
            entry["check_loss"] = c.check[0]
            entry["rel_err"] = _rel_err(c.check, want)
        entry.update(time_steps(c, reps=reps, warmup=warmup, min_time=min_time, quiet=quiet))
        if name in MEMORY_CONTENDERS:
            entry["memory"] = memory_of(c)
        print(f"  {wl.name:<6} {name:<18} {entry['steps_per_s']:>12,.1f} steps/s", flush=True)
        del c
    base = res["contenders"].get("jaxbn-scan", {}).get("steps_per_s")
    flax_mem = (res["contenders"].get("flax-jit", {}).get("memory") or {}).get("temp_bytes")
    for entry in res["contenders"].values():
        s = entry["steps_per_s"]
        entry["speed_vs_jaxbn_scan"] = None if s is None or base is None else s / base
        mem = entry.get("memory")
        if mem is not None:
            mem["temp_vs_flax"] = None if not flax_mem else mem["temp_bytes"] / flax_mem
    return res


# --------------------------------------------------------------------------- reporting


def _fmt(v, spec):
    return "" if v is None else format(v, spec)


def _speed_table(models: list[dict]) -> str:
    rows = []
    for res in models:
        for name, e in res["contenders"].items():
            rows.append(
                [
                    res["case"],
                    name,
                    "n/a" if e["steps_per_s"] is None else f"{e['steps_per_s']:,.0f}",
                    "" if e.get("iqr_rel") is None else f"{100 * e['iqr_rel']:.0f}%",
                    e.get("steps_per_run", ""),
                    _fmt(e["speed_vs_jaxbn_scan"], ".2f"),
                    "" if e.get("rel_err") is None else f"{e['rel_err']:.0e}",
                    e["note"],
                ]
            )
    headers = [
        "case",
        "contender",
        "steps/s",
        "±IQR/2",
        "steps/run",
        "speed / jaxbn-scan",
        "rel err",
        "note",
    ]
    return _common.format_table(headers, rows)


def _memory_table(models: list[dict]) -> str:
    rows = []
    mib = _common.MiB
    for res in models:
        for name, e in res["contenders"].items():
            mem = e.get("memory")
            if mem is None:
                continue
            rows.append(
                [
                    res["case"],
                    name,
                    f"{mem['temp_bytes'] / mib:.3f}",
                    _fmt(mem["temp_vs_flax"], ".2f"),
                    f"{mem['argument_bytes'] / mib:.3f}",
                    f"{mem['output_bytes'] / mib:.3f}",
                ]
            )
    headers = ["case", "contender", "temp MiB", "temp / flax", "args MiB", "outputs MiB"]
    return _common.format_table(headers, rows)


def _targets(models: list[dict]) -> list[dict]:
    """The two targets this benchmark checks, with their figures."""
    out = []
    for res in models:
        c = res["contenders"]
        for name in ("jaxbn-jit", "jaxbn-remat-jit"):
            mem = (c.get(name, {}).get("memory") or {}).get("temp_vs_flax")
            out.append(
                {
                    "target": f"{res['name']}: {name} step temp memory <= {MEMORY_TARGET}x Flax's",
                    "value": mem,
                    "met": None if mem is None else mem <= MEMORY_TARGET,
                }
            )
        if res["name"] == "paper":
            scan = c.get("jaxbn-scan", {}).get("steps_per_s")
            torch_s = c.get("torch-eager", {}).get("steps_per_s")
            ratio = None if scan is None or torch_s is None else scan / torch_s
            out.append(
                {
                    "target": f"paper: jaxbn-scan steps/s >= {SPEED_TARGET}x PyTorch eager",
                    "value": ratio,
                    "met": None if ratio is None else ratio >= SPEED_TARGET,
                }
            )
    return out


def _print_targets(targets: list[dict]) -> None:
    print("\ntargets")
    for t in targets:
        status = {True: "MET", False: "NOT MET", None: "NOT CHECKED"}[t["met"]]
        value = "n/a" if t["value"] is None else f"{t['value']:.2f}x"
        print(f"  {status:<11} {t['target']}: {value}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MLP training steps/s and compiled-step memory: jaxbn against its peers.",
    )
    p.add_argument(
        "--models",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        default=list(MODELS),
        metavar="NAMES",
        help=f"comma-separated networks to run, from {','.join(MODELS)} (default: both)",
    )
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        help="which contenders to run (default: all but torch-compile)",
    )
    p.add_argument("--reps", type=int, default=7, help="timed runs per contender (median; >= 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before calibration")
    p.add_argument(
        "--min-time", type=float, default=0.5, help="seconds each timed run lasts at least"
    )
    p.add_argument(
        "--steps-per-call",
        type=int,
        help="steps per dispatch of the scan loops (default: "
        + ", ".join(f"{k} {v}" for k, v in STEPS_PER_CALL.items())
        + ")",
    )
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    p.add_argument(
        "--torch-compile",
        action="store_true",
        help="also time torch.compile (needs a C++ toolchain; compiles for a while)",
    )
    p.add_argument(
        "--no-wait-idle",
        action="store_true",
        help="do not wait for other processes to leave the CPUs before each run",
    )
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 short runs, 10 steps per dispatch (numbers meaningless)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark; prints the tables and targets; returns the results.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when ``None``).

    Returns:
        A dict with ``machine``, the settings, ``skipped`` (peers not installed),
        ``models`` (per network and contender: ``steps_per_s``,
        ``speed_vs_jaxbn_scan``, the run times' spread, ``rel_err`` and, for
        the JAX per-call contenders, ``memory``) and ``targets``.
    """
    args = _parser().parse_args(argv)
    for m in args.models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown network {m!r}; choose from {','.join(MODELS)}")
    contenders = args.contenders or [c for c in CONTENDERS if c != "torch-compile"]
    if args.torch_compile and "torch-compile" not in contenders:
        contenders.append("torch-compile")
    reps, warmup, min_time = args.reps, args.warmup, args.min_time
    spc = {m: args.steps_per_call or STEPS_PER_CALL[m] for m in MODELS}
    if args.quick:
        reps, warmup, min_time = min(reps, 3), 1, min(min_time, 0.01)
        spc = {m: min(v, 10) for m, v in spc.items()}
    quiet = not (args.quick or args.no_wait_idle)

    info = _common.machine_info(("jax", "jaxlib", "numpy", "optax", "flax", "torch"))
    _common.print_machine(info)
    skipped = {}
    for module in ("flax", "torch"):
        if _common.optional_import(module) is None:
            skipped[module] = "not installed"
            print(f"note     {module} is not installed: its contenders are skipped")
    print(
        f"timing   median of {reps} runs of >= {min_time} s each, after compilation and "
        f"{warmup} warm-up call(s); scan loops: "
        + ", ".join(f"{spc[m]} steps per dispatch ({m})" for m in args.models)
    )
    print(f"optimizer optax.sgd({args.lr}) / torch.optim.SGD(lr={args.lr}), float32\n")

    models = []
    for name in args.models:
        wl = make_workload(name, lr=args.lr)
        models.append(
            run_model(
                wl,
                contenders,
                reps=reps,
                warmup=warmup,
                min_time=min_time,
                steps_per_call=spc[name],
                quiet=quiet,
            )
        )
    print("\nsteps per second (higher is better)")
    print(_speed_table(models))
    print("\npeak temporary memory of one compiled training step (memory_analysis)")
    print(_memory_table(models))
    targets = _targets(models)
    _print_targets(targets)
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
        "lr": args.lr,
        "skipped": skipped,
        "models": models,
        "targets": targets,
    }
    _common.write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)

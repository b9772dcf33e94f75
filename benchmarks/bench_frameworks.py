"""One training step of a small model with each framework's BatchNorm and with jaxbn's module.

For Flax NNX, Flax Linen and Equinox, the same model (dense, batch norm, ReLU,
dense, batch norm, ReLU, dense) is built with the framework's BatchNorm and with
jaxbn's drop-in (``jaxbn.nnx``, ``jaxbn.linen``, ``jaxbn.equinox``). A step is
forward, backward, an SGD update and the new running statistics, jitted as a
pure function of arrays, so that the time is the computation, not the
framework's Python. The two contenders of a framework are timed interleaved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import _common
import jax
import jax.numpy as jnp

FRAMEWORKS = ("nnx", "linen", "equinox")
LR = 0.01


def _loss(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def _sgd(loss_fn: Callable) -> Callable:
    """``step((params, stats), x, y) -> (params, stats)`` for ``loss_fn(params, stats, x, y)``."""

    def step(carry, x, y):
        grads, stats = jax.grad(loss_fn, has_aux=True)(*carry, x, y)
        return jax.tree.map(lambda p, g: p - LR * g, carry[0], grads), stats

    return step


def nnx_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Flax NNX, through ``nnx.split``/``merge``."""
    from flax import nnx

    import jaxbn.nnx

    class Net(nnx.Module):
        def __init__(self, norm, *, rngs):
            self.d1 = nnx.Linear(features, width, use_bias=False, rngs=rngs)
            self.bn1 = norm(width, rngs=rngs)
            self.d2 = nnx.Linear(width, width, use_bias=False, rngs=rngs)
            self.bn2 = norm(width, rngs=rngs)
            self.d3 = nnx.Linear(width, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.d1(x)))
            return self.d3(nnx.relu(self.bn2(self.d2(x))))

    out = {}
    for name, norm in (("flax", nnx.BatchNorm), ("jaxbn", jaxbn.nnx.BatchNorm)):
        graphdef, params, rest = nnx.split(Net(norm, rngs=nnx.Rngs(0)), nnx.Param, ...)

        def loss_fn(params, rest, x, y, graphdef=graphdef):
            model = nnx.merge(graphdef, params, rest)
            return _loss(model(x), y), nnx.as_pure(nnx.state(model, nnx.BatchStat))

        out[name] = (_sgd(loss_fn), (nnx.as_pure(params), nnx.as_pure(rest)))
    return out


def linen_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Flax Linen."""
    import flax.linen as nn

    import jaxbn.linen

    class Net(nn.Module):
        norm: Any

        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                h = nn.Dense(width, use_bias=False)(x)
                x = nn.relu(self.norm(use_running_average=False)(h))
            return nn.Dense(10)(x)

    out = {}
    for name, norm in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm)):
        model = Net(norm)
        variables = model.init(jax.random.key(0), jnp.ones((batch, features)))

        def loss_fn(params, stats, x, y, model=model):
            variables = {"params": params, "batch_stats": stats}
            logits, up = model.apply(variables, x, mutable=["batch_stats"])
            return _loss(logits, y), up["batch_stats"]

        out[name] = (_sgd(loss_fn), (variables["params"], variables["batch_stats"]))
    return out


def equinox_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Equinox (``mode="batch"`` for its own)."""
    import equinox as eqx

    import jaxbn.equinox

    norms = {
        "equinox": lambda: eqx.nn.BatchNorm(width, "batch", mode="batch"),
        "jaxbn": lambda: jaxbn.equinox.BatchNorm(width, "batch"),
    }
    out = {}
    for name, norm in norms.items():

        def build(norm=norm):
            k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
            layers = []
            for fan_in, key in ((features, k1), (width, k2)):
                linear = eqx.nn.Linear(fan_in, width, use_bias=False, key=key)
                layers += [linear, norm(), eqx.nn.Lambda(jax.nn.relu)]
            return eqx.nn.Sequential([*layers, eqx.nn.Linear(width, 10, key=k3)])

        model, state = eqx.nn.make_with_state(build)()
        params, static = eqx.partition(model, eqx.is_array)

        def loss_fn(params, state, x, y, static=static):
            model = eqx.combine(params, static)
            f = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
            logits, new_state = f(x, state)
            return _loss(logits, y), new_state

        out[name] = (_sgd(loss_fn), (params, state))
    return out


BUILDERS = {"nnx": nnx_steps, "linen": linen_steps, "equinox": equinox_steps}


def run_framework(framework: str, *, batch: int, width: int, features: int, timing: dict):
    """Builds both contenders of one framework, checks they agree, and times them."""
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (batch, features)) * 2.0 + 0.5
    y = jax.random.randint(ky, (batch,), 0, 10)
    runs, new_params = {}, {}
    for name, (step, carry) in BUILDERS[framework](batch, width, features).items():
        jitted = jax.jit(step)
        runs[name] = _common.calls(jitted, carry, x, y)
        new_params[name] = jax.tree.leaves(jitted(carry, x, y)[0])
    peer = next(n for n in runs if n != "jaxbn")
    # Both contenders start from the same parameters: after one step they agree.
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(new_params["jaxbn"], new_params[peer], strict=True)
    )
    timings = _common.interleave(runs, **timing)
    return {
        "name": f"train_step_{framework}_{batch}x{features}_w{width}_float32",
        "peer_ms": 1e3 * timings[peer]["median_s"],
        "jaxbn_ms": 1e3 * timings["jaxbn"]["median_s"],
        "peer": peer,
        "contenders": timings,
        "jaxbn_over_peer": timings["jaxbn"]["median_s"] / timings[peer]["median_s"],
        "max_param_difference_after_one_step": diff,
    }


COLUMNS = (
    ("case", "name"),
    ("peer", "peer"),
    ("peer ms", "peer_ms", ".3f"),
    ("jaxbn ms", "jaxbn_ms", ".3f"),
    ("jaxbn / peer", "jaxbn_over_peer", ".2f"),
    ("max param diff", "max_param_difference_after_one_step", ".1e"),
)


def _parser():
    """The command-line flags."""
    p = _common.parser("Training step: each framework's BatchNorm vs jaxbn's.", reps=50, warmup=5)
    p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    p.add_argument("--batch", type=int, default=256, help="examples per step")
    p.add_argument("--width", type=int, default=512, help="hidden units per layer")
    p.add_argument("--features", type=int, default=64, help="input features")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Runs the benchmark, prints the table; returns the results."""
    args = _parser().parse_args(argv)
    if args.quick:
        args.batch, args.width, args.features, args.reps, args.warmup = 16, 8, 8, 3, 1
    info = _common.machine_info(__file__, argv)
    timing = _common.timing(args)
    sizes = {"batch": args.batch, "width": args.width, "features": args.features}
    cases = [run_framework(f, timing=timing, **sizes) for f in args.frameworks]
    print("\n" + _common.table(cases, COLUMNS))
    return _common.finish(args, {"machine": info, "cases": cases})


if __name__ == "__main__":
    main()

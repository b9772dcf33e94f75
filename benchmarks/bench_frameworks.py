"""One training step of a small model with each framework's BatchNorm and with jaxbn's module.

For Flax NNX, Flax Linen and Equinox, the same model (dense, batch norm, ReLU,
dense, batch norm, ReLU, dense) is built with the framework's BatchNorm and with
jaxbn's drop-in (``jaxbn.nnx``, ``jaxbn.linen``, ``jaxbn.equinox``). A step is
forward, backward, an SGD update and the new running statistics, jitted as a
pure function of arrays, so that the time is the computation, not the
framework's Python. The two contenders of a framework are timed interleaved.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

try:
    import _common
except ImportError:  # imported as part of a package
    from benchmarks import _common

_common.use_checkout()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

FRAMEWORKS = ("nnx", "linen", "equinox")
LR = 0.01


def _loss(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def nnx_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Flax NNX; ``step(carry, x, y) -> carry``."""
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

        def step(carry, x, y, graphdef=graphdef):
            params, rest = carry

            def loss_fn(params):
                model = nnx.merge(graphdef, params, rest)
                loss = _loss(model(x), y)
                return loss, nnx.as_pure(nnx.state(model, nnx.BatchStat))

            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            return jax.tree.map(lambda p, g: p - LR * g, params, grads), stats

        carry = (nnx.as_pure(params), nnx.as_pure(rest))
        out[name] = (step, carry)
    return out


def linen_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Flax Linen."""
    import flax.linen as nn

    import jaxbn.linen

    out = {}
    for name, norm in (("flax", nn.BatchNorm), ("jaxbn", jaxbn.linen.BatchNorm)):

        class Net(nn.Module):
            norm: Any

            @nn.compact
            def __call__(self, x):
                x = nn.relu(
                    self.norm(use_running_average=False)(nn.Dense(width, use_bias=False)(x))
                )
                x = nn.relu(
                    self.norm(use_running_average=False)(nn.Dense(width, use_bias=False)(x))
                )
                return nn.Dense(10)(x)

        model = Net(norm)
        variables = model.init(jax.random.key(0), jnp.ones((batch, features)))

        def step(carry, x, y, model=model):
            params, stats = carry

            def loss_fn(params):
                logits, up = model.apply(
                    {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"]
                )
                return _loss(logits, y), up["batch_stats"]

            grads, stats = jax.grad(loss_fn, has_aux=True)(params)
            return jax.tree.map(lambda p, g: p - LR * g, params, grads), stats

        out[name] = (step, (variables["params"], variables["batch_stats"]))
    return out


def equinox_steps(batch: int, width: int, features: int) -> dict[str, tuple[Callable, Any]]:
    """``{contender: (step, carry)}`` for Equinox (``mode="batch"`` for its own)."""
    import equinox as eqx

    import jaxbn.equinox

    out = {}
    makers = {
        "equinox": lambda: eqx.nn.BatchNorm(width, "batch", mode="batch"),
        "jaxbn": lambda: jaxbn.equinox.BatchNorm(width, "batch"),
    }
    for name, make_norm in makers.items():

        def build(make_norm=make_norm):
            k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
            return eqx.nn.Sequential(
                [
                    eqx.nn.Linear(features, width, use_bias=False, key=k1),
                    make_norm(),
                    eqx.nn.Lambda(jax.nn.relu),
                    eqx.nn.Linear(width, width, use_bias=False, key=k2),
                    make_norm(),
                    eqx.nn.Lambda(jax.nn.relu),
                    eqx.nn.Linear(width, 10, key=k3),
                ]
            )

        model, state = eqx.nn.make_with_state(build)()
        params, static = eqx.partition(model, eqx.is_array)

        def step(carry, x, y, static=static):
            params, state = carry

            def loss_fn(params):
                model = eqx.combine(params, static)
                f = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
                logits, new_state = f(x, state)
                return _loss(logits, y), new_state

            grads, state = jax.grad(loss_fn, has_aux=True)(params)
            return jax.tree.map(lambda p, g: p - LR * g, params, grads), state

        out[name] = (step, (params, state))
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
        "peer": peer,
        "contenders": timings,
        "jaxbn_over_peer": timings["jaxbn"]["median_s"] / timings[peer]["median_s"],
        "max_param_difference_after_one_step": diff,
    }


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
    rows = [
        [
            c["name"],
            c["peer"],
            f"{c['contenders'][c['peer']]['median_s'] * 1e3:.3f}",
            f"{c['contenders']['jaxbn']['median_s'] * 1e3:.3f}",
            f"{c['jaxbn_over_peer']:.2f}",
            f"{c['max_param_difference_after_one_step']:.1e}",
        ]
        for c in cases
    ]
    headers = ["case", "peer", "peer ms", "jaxbn ms", "jaxbn / peer", "max param diff"]
    print("\n" + _common.format_table(headers, rows))
    return _common.finish(args, {"machine": info, "cases": cases})


if __name__ == "__main__":
    main()
    sys.exit(0)

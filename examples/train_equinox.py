"""Train a small Equinox network on the bundled digits with jaxbn's BatchNorm.

The model is plain Equinox (stateful layers, ``eqx.nn.make_with_state``, a
``vmap`` with the batch axis name); the only jaxbn line is the batch-norm layer,
which has ``eqx.nn.BatchNorm``'s constructor and call (``--equinox`` uses
Equinox's own in ``mode="batch"``)::

    python examples/train_equinox.py --steps 500
"""

from __future__ import annotations

import os
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import jaxbn.equinox
from jaxbn.data import batch_indices, load_digits

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared argument types beside this script
    sys.path.insert(0, _HERE)

import _runner  # noqa: E402


def make_model(args, key):
    k1, k2 = jax.random.split(key)
    if args.equinox:
        norm = eqx.nn.BatchNorm(args.hidden, "batch", momentum=0.9, mode="batch")
    else:
        norm = jaxbn.equinox.BatchNorm(args.hidden, "batch", momentum=0.9)
    layers = [eqx.nn.Linear(64, args.hidden, use_bias=False, key=k1), norm]
    layers += [eqx.nn.Lambda(jax.nn.relu), eqx.nn.Linear(args.hidden, 10, key=k2)]
    return eqx.nn.Sequential(layers)


def main(argv=None) -> dict:
    p = _runner.demo_parser(__doc__.splitlines()[0])
    p.add_argument("--equinox", action="store_true", help="use eqx.nn.BatchNorm instead")
    args = p.parse_args(argv)
    data = load_digits()
    _runner.check_batch_size_fits(p, args.batch_size, len(data.x_train))
    model, state = eqx.nn.make_with_state(make_model)(args, jax.random.key(args.seed))
    optimizer = optax.sgd(args.lr, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    x_train, y_train = jnp.asarray(data.x_train, jnp.float32), jnp.asarray(data.y_train)

    def batched(model):
        return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")

    @eqx.filter_jit
    def train_step(model, state, opt_state, step):
        idx = batch_indices(
            jax.random.key(args.seed), step, num_examples=len(x_train), batch_size=args.batch_size
        )

        def loss_fn(model, state):
            logits, state = batched(model)(x_train[idx], state)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()
            return loss, state

        (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, state)
        updates, opt_state = optimizer.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for step in range(args.steps):
        # The step as an array: filter_jit would recompile for every Python int.
        model, state, opt_state, loss = train_step(model, state, opt_state, jnp.asarray(step))
        losses.append(float(loss))
    logits, _ = batched(eqx.nn.inference_mode(model))(jnp.asarray(data.x_test, jnp.float32), state)
    accuracy = float(jnp.mean(jnp.argmax(logits, axis=-1) == jnp.asarray(data.y_test)))
    print(f"{args.steps} steps: final train loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}")
    return {"steps": args.steps, "train_loss": losses, "test_accuracy": accuracy}


if __name__ == "__main__":
    main()

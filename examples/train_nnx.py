"""Train a small Flax NNX network on the bundled digits with jaxbn's BatchNorm.

The model is plain NNX; the only jaxbn line is the batch-norm layer, which has
``flax.nnx.BatchNorm``'s constructor and call (``--flax`` uses Flax's own)::

    python examples/train_nnx.py --steps 500
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxbn.nnx
from jaxbn.data import batch_indices, load_digits

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared argument types beside this script
    sys.path.insert(0, _HERE)

import _runner  # noqa: E402


class Net(nnx.Module):
    def __init__(self, norm, hidden: int, *, rngs: nnx.Rngs):
        self.dense1 = nnx.Linear(64, hidden, use_bias=False, rngs=rngs)
        self.bn = norm(hidden, momentum=0.9, rngs=rngs)  # jaxbn.nnx.BatchNorm or nnx.BatchNorm
        self.dense2 = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.bn(self.dense1(x))))


def main(argv=None) -> dict:
    p = _runner.demo_parser(__doc__.splitlines()[0])
    p.add_argument("--flax", action="store_true", help="use flax.nnx.BatchNorm instead")
    args = p.parse_args(argv)
    data = load_digits()
    _runner.check_batch_size_fits(p, args.batch_size, len(data.x_train))
    model = Net(
        nnx.BatchNorm if args.flax else jaxbn.nnx.BatchNorm, args.hidden, rngs=nnx.Rngs(args.seed)
    )
    optimizer = nnx.Optimizer(model, optax.sgd(args.lr, momentum=0.9), wrt=nnx.Param)
    x_train, y_train = jnp.asarray(data.x_train, jnp.float32), jnp.asarray(data.y_train)

    @nnx.jit
    def train_step(model, optimizer, step):
        idx = batch_indices(
            jax.random.key(args.seed), step, num_examples=len(x_train), batch_size=args.batch_size
        )

        def loss_fn(model):
            logits = model(x_train[idx])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    model.train()
    losses = [float(train_step(model, optimizer, step)) for step in range(args.steps)]
    model.eval()
    predictions = jnp.argmax(model(jnp.asarray(data.x_test, jnp.float32)), axis=-1)
    accuracy = float(jnp.mean(predictions == jnp.asarray(data.y_test)))
    print(f"{args.steps} steps: final train loss {losses[-1]:.4f}, test accuracy {accuracy:.4f}")
    return {"steps": args.steps, "train_loss": losses, "test_accuracy": accuracy}


if __name__ == "__main__":
    main()

"""Train the batch-norm MLP on the bundled 8x8 digits, with checkpoints and resume.

Run with no arguments::

    python examples/train_mlp.py                  # batch norm, 3 x 100 ReLU units
    python examples/train_mlp.py --no-batch-norm  # the same network without it
    python examples/train_mlp.py --steps 4000 --resume   # continue a finished run
    python examples/train_mlp.py --diagnose       # then jaxbn.diagnose's report on the test split

    # data-parallel over 4 devices (on CPU, ask XLA for 4 host devices first)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_mlp.py --devices 4

Training runs in chunks of ``--log-every`` steps, each compiled into one
``lax.scan`` dispatch with the batches drawn on the device; between chunks the
losses are read once (a device sync), checked for divergence, and the network is
evaluated on the test split. Written to ``--out`` (by default
``runs/train_mlp``, with ``_no_bn`` for ``--no-batch-norm`` and ``_4_devices``
for ``--devices 4``, so that each command above has a folder of its own):
``metrics.json`` (the returned metrics), ``training_curve.png`` and
``checkpoint.npz`` (every ``--checkpoint-every`` steps and at the end;
``--resume`` continues from it and ends with the same parameters as an
uninterrupted run). A folder holding a previous run is never written over
without ``--resume`` or ``--overwrite``.

With ``--devices N`` every global batch of ``--batch-size`` examples is split
over the first ``N`` devices (``jax.shard_map``; batch norm's statistics and the
gradients are all-reduced), which trains the same network as one device, up to
float32 rounding; a checkpoint resumes with any device count.

The command line, its checks and the run itself are shared with
``train_cnn.py`` in ``_runner.py``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared runner beside this script
    sys.path.insert(0, _HERE)

import _runner  # noqa: E402

from jaxbn.data import load_digits  # noqa: E402
from jaxbn.mlp import ACTIVATIONS, MLP  # noqa: E402


def build_parser():
    """The command-line interface (every flag explained by ``--help``)."""
    p = _runner.build_parser(
        "Train an MLP with batch norm on scikit-learn's bundled 8x8 digits.",
        out_help="default: runs/train_mlp, with _no_bn for --no-batch-norm and _N_devices "
        "for --devices N",
        steps=2000,
        batch_size=60,
        lr=0.01,
        optimizer="momentum",
    )
    p.add_argument(
        "--no-batch-norm",
        action="store_true",
        help="train the same MLP without batch norm (hidden layers get biases instead)",
    )
    p.add_argument(
        "--hidden",
        type=_runner.int_tuple,
        default=(100, 100, 100),
        help="comma-separated hidden layer widths, e.g. 100,100,100",
    )
    p.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default="relu", help="hidden nonlinearity"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    """Trains, evaluates, writes the outputs; returns the metrics dict.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The contents of ``metrics.json``: ``config``, ``steps``, ``devices``,
        ``final`` (test accuracy and loss), ``timing`` (training steps per second
        without compilation; seconds spent training, evaluating and writing
        checkpoints), ``history`` (one entry per chunk).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    _runner.join_processes(parser, args)
    if args.out is None:
        args.out = _runner.default_out(args, "train_mlp" + "_no_bn" * args.no_batch_norm)
    data = load_digits()
    model = MLP(
        (data.num_features, *args.hidden, data.num_classes),
        activation=args.activation,
        use_batch_norm=not args.no_batch_norm,
    )
    # What a resumed run must share with the one it continues (not --steps); fit
    # also compares the model's fields, the batch size, the seed's key and the data.
    config = {
        "layer_sizes": list(model.layer_sizes),
        "activation": args.activation,
        "batch_norm": model.use_batch_norm,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    name = "with" if model.use_batch_norm else "without"
    title = (
        f"MLP {'-'.join(map(str, args.hidden))} {args.activation}, {name} batch norm, "
        f"{args.optimizer} lr={args.lr}"
    )
    return _runner.run(
        parser,
        args,
        model=model,
        data=data,
        x_train=data.x_train,
        x_test=data.x_test,
        config=config,
        title=title,
    )


if __name__ == "__main__":
    _runner.command_line(main)

"""Train a CNN with batch norm on the bundled digits as 8x8x1 images.

Run with no arguments::

    python examples/train_cnn.py                      # conv-BN-ReLU-maxpool blocks of 32, 64
    python examples/train_cnn.py --no-batch-norm      # the same network without it
    python examples/train_cnn.py --data-format NCHW   # channels first (batch norm on axis 1)
    python examples/train_cnn.py --steps 3000 --resume    # continue a finished run
    python examples/train_cnn.py --diagnose           # then jaxbn.diagnose's report (test split)

    # data-parallel over 4 devices with synchronized batch norm
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_cnn.py --devices 4

The network is ``jaxbn.CNN``: blocks ``conv (no bias) -> BatchNorm ->
activation -> 2x2 max pooling``, global average pooling and a dense head. Each
chunk of steps runs as one ``lax.scan`` (``--loop scan``; its convolutions have
a custom VJP that XLA compiles as fast inside a loop as in a single step, see
``jaxbn.cnn.conv``); ``--loop steps`` runs one jitted step per call instead (the
same batches and results). Outputs, checkpoints, ``--resume``,
``--overwrite`` and ``--devices`` work as in ``train_mlp.py`` (the two share
``_runner.py``); the default ``--out`` is ``runs/train_cnn``, with ``_no_bn``,
``_nchw`` and ``_N_devices`` appended for those variants.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared runner beside this script
    sys.path.insert(0, _HERE)

import _runner  # noqa: E402

from jaxbn.data import load_digits  # noqa: E402

IMAGE_SIZE = 8  # the digits are 8x8 grey images, flattened in the dataset


def build_parser():
    """The command-line interface (every flag explained by ``--help``)."""
    p = _runner.build_parser(
        "Train a CNN with batch norm on scikit-learn's bundled 8x8 digits (as images).",
        out_help="default: runs/train_cnn, with _no_bn, _nchw and _N_devices appended for "
        "those variants",
        steps=600,
        batch_size=64,
        lr=0.01,
        optimizer="adam",
    )
    p.add_argument(
        "--no-batch-norm",
        action="store_true",
        help="train the same CNN without batch norm (the convolutions get biases instead)",
    )
    p.add_argument(
        "--channels",
        type=_runner.int_tuple,
        default=(32, 64),
        help="comma-separated output channels of the conv blocks, e.g. 32,64",
    )
    p.add_argument(
        "--kernel-size", type=_runner.int_at_least(1), default=3, help="convolution window"
    )
    p.add_argument("--activation", default="relu", help="the blocks' nonlinearity")
    p.add_argument(
        "--pooling",
        choices=("max", "avg", "none"),
        default="max",
        help="2x2 pooling after every block",
    )
    p.add_argument(
        "--data-format",
        choices=("NHWC", "NCHW"),
        default="NHWC",
        help="image layout: channels last (batch norm on axis -1) or first (axis 1)",
    )
    p.add_argument(
        "--loop",
        choices=("steps", "scan"),
        default="scan",
        help="each chunk in one lax.scan, or one jitted step per call (same results)",
    )
    return p


def _images(x, data_format: str):
    """The flattened digits ``[n, 64]`` as images in ``data_format``."""
    x = x.reshape(-1, IMAGE_SIZE, IMAGE_SIZE, 1)
    return x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> dict:
    """Trains, evaluates, writes the outputs; returns the metrics dict.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The contents of ``metrics.json`` (see ``train_mlp.main``).
    """
    import jaxbn  # jaxbn.CNN: looked up when run, so this file imports without it

    parser = build_parser()
    args = parser.parse_args(argv)
    _runner.join_processes(parser, args)
    if args.out is None:
        suffix = "_no_bn" * args.no_batch_norm + "_nchw" * (args.data_format == "NCHW")
        args.out = _runner.default_out(args, "train_cnn" + suffix)
    data = load_digits()
    try:
        model = jaxbn.CNN(
            in_channels=1,
            channels=args.channels,
            num_classes=data.num_classes,
            kernel_size=args.kernel_size,
            activation=args.activation,
            pooling=None if args.pooling == "none" else args.pooling,
            use_batch_norm=not args.no_batch_norm,
            data_format=args.data_format,
        )
    except (TypeError, ValueError) as err:  # e.g. an activation the CNN does not know
        parser.error(f"the CNN's flags: {err}")
    config = {
        "channels": list(args.channels),
        "kernel_size": args.kernel_size,
        "activation": args.activation,
        "pooling": args.pooling,
        "batch_norm": not args.no_batch_norm,
        "data_format": args.data_format,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    name = "with" if not args.no_batch_norm else "without"
    title = (
        f"CNN {'-'.join(map(str, args.channels))} {args.activation} {args.data_format}, "
        f"{name} batch norm, {args.optimizer} lr={args.lr}"
    )
    return _runner.run(
        parser,
        args,
        model=model,
        data=data,
        x_train=_images(data.x_train, args.data_format),
        x_test=_images(data.x_test, args.data_format),
        config=config,
        title=title,
        scan=args.loop == "scan",
    )


if __name__ == "__main__":
    _runner.command_line(main)

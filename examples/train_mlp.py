"""Train the batch-norm MLP on the bundled 8x8 digits, with checkpoints and resume.

Run with no arguments::

    python examples/train_mlp.py                  # batch norm, 3 x 100 ReLU units
    python examples/train_mlp.py --no-batch-norm  # the same network without it
    python examples/train_mlp.py --steps 4000 --resume   # continue a finished run

    # data-parallel over 4 devices (on CPU, ask XLA for 4 host devices first)
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python examples/train_mlp.py --devices 4

Training runs in chunks of ``--log-every`` steps, each compiled into one
``lax.scan`` dispatch with the batches drawn on the device; between chunks the
losses are read once (a device sync), checked for divergence, and the network is
evaluated on the test split. Written to ``--out``: ``metrics.json`` (the returned
metrics), ``training_curve.png`` and ``checkpoint.npz`` (every
``--checkpoint-every`` steps and at the end; ``--resume`` continues from it and
ends with the same parameters as an uninterrupted run).

With ``--devices N`` every global batch of ``--batch-size`` examples is split
over the first ``N`` devices (``jax.shard_map``; batch norm's statistics and the
gradients are all-reduced), which trains the same network as one device, up to
float32 rounding; a checkpoint resumes with any device count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import optax
from tqdm import tqdm

from jaxbn.checkpoint import CheckpointError, read_metadata
from jaxbn.data import load_digits
from jaxbn.mlp import ACTIVATIONS, MLP
from jaxbn.train import TrainingDiverged, data_mesh, evaluate, fit

OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}


def _hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 100,100,100, got {text!r}"
        )
    return sizes


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (every flag explained by ``--help``)."""
    p = argparse.ArgumentParser(
        description="Train an MLP with batch norm on scikit-learn's bundled 8x8 digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--no-batch-norm",
        action="store_true",
        help="train the same MLP without batch norm (hidden layers get biases instead)",
    )
    p.add_argument(
        "--hidden",
        type=_hidden_sizes,
        default=(100, 100, 100),
        help="comma-separated hidden layer widths, e.g. 100,100,100",
    )
    p.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default="relu", help="hidden nonlinearity"
    )
    p.add_argument("--steps", type=int, default=2000, help="total number of training steps")
    p.add_argument("--batch-size", type=_positive_int, default=60, help="examples per step")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate")
    p.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default="momentum",
        help="optax optimizer (momentum: SGD with momentum 0.9)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the initialization and the batch order"
    )
    p.add_argument(
        "--out", default=os.path.join("runs", "train_mlp"), help="directory for all outputs"
    )
    p.add_argument(
        "--log-every",
        type=_positive_int,
        default=100,
        help="steps per compiled chunk: the loss is read and the test set scored this often",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=500,
        help="save OUT/checkpoint.npz every this many steps (0: only at the end)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.npz (same flags except --steps); "
        "it is an error if the checkpoint is missing or was made with other settings",
    )
    p.add_argument(
        "--devices",
        type=_positive_int,
        default=1,
        help="train data-parallel over the first N devices (--batch-size must be a multiple "
        "of N); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N to get N",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _save_curve(history: list[dict], path: str, title: str) -> None:
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(steps, [h["train_loss"] for h in history], label="train (chunk mean)")
    ax_loss.plot(steps, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="training step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.plot(steps, [h["train_accuracy"] for h in history], label="train (chunk mean)")
    ax_acc.plot(steps, [h["test_accuracy"] for h in history], label="test")
    ax_acc.set(xlabel="training step", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    """Trains, evaluates, writes the outputs; returns the metrics dict.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The contents of ``metrics.json``: ``config``, ``steps``, ``devices``,
        ``history`` (one entry per chunk), ``final`` (test accuracy and loss),
        ``steps_per_second``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    mesh = None
    if args.devices > 1:
        try:
            mesh = data_mesh(args.devices)
        except ValueError as err:
            parser.error(f"--devices: {err}")
        if args.batch_size % args.devices:
            parser.error(
                f"--batch-size {args.batch_size} is not divisible by --devices {args.devices}"
            )
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.npz")

    data = load_digits()
    model = MLP(
        (data.num_features, *args.hidden, data.num_classes),
        activation=args.activation,
        use_batch_norm=not args.no_batch_norm,
    )
    optimizer = OPTIMIZERS[args.optimizer](args.lr)
    # Everything a resumed run must share with the one it continues (not --steps).
    config = {
        "layer_sizes": list(model.layer_sizes),
        "activation": args.activation,
        "batch_norm": model.use_batch_norm,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    history: list[dict] = []
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        meta = read_metadata(ckpt_path)
        history, start = list(meta["metadata"].get("history", [])), meta["step"]

    bar = tqdm(total=args.steps, desc="train", disable=args.no_progress, unit="step")
    bar.update(min(start, args.steps))
    timing = {"start": None, "steps": 0}

    def on_chunk(ts, chunk):
        # One host read per chunk: the losses of its steps, then the test set.
        test = evaluate(model, ts.params, ts.state, data.x_test, data.y_test)
        entry = {
            "step": int(chunk["step"][-1]) + 1,
            "train_loss": float(chunk["loss"].mean()),
            "train_accuracy": float(chunk["accuracy"].mean()),
            "test_loss": float(test["loss"]),
            "test_accuracy": float(test["accuracy"]),
        }
        history.append(entry)
        bar.update(len(chunk["step"]))
        bar.set_postfix(loss=f"{entry['train_loss']:.4f}", test_acc=f"{entry['test_accuracy']:.4f}")
        # Throughput after the first chunk, which includes compilation.
        if timing["start"] is None:
            timing["start"] = time.perf_counter()
        else:
            timing["steps"] += len(chunk["step"])

    try:
        ts = fit(
            model,
            optimizer,
            data.x_train,
            data.y_train,
            steps=args.steps,
            batch_size=args.batch_size,
            key=jax.random.key(args.seed),
            chunk_size=args.log_every,
            checkpoint_path=ckpt_path,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            config=config,
            callback=on_chunk,
            checkpoint_metadata=lambda: {"history": history},
            mesh=mesh,
        )
    finally:
        bar.close()
    elapsed = time.perf_counter() - timing["start"] if timing["start"] is not None else 0.0
    test = evaluate(model, ts.params, ts.state, data.x_test, data.y_test)
    metrics = {
        "config": config,
        "steps": int(ts.step),
        "devices": args.devices,
        "final": {"test_accuracy": float(test["accuracy"]), "test_loss": float(test["loss"])},
        "steps_per_second": timing["steps"] / elapsed if timing["steps"] else None,
        "history": history,
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if history:
        name = "with" if model.use_batch_norm else "without"
        _save_curve(
            history,
            os.path.join(args.out, "training_curve.png"),
            f"MLP {'-'.join(map(str, args.hidden))} {args.activation}, {name} batch norm, "
            f"{args.optimizer} lr={args.lr}",
        )
    print(
        f"final test accuracy: {metrics['final']['test_accuracy']:.4f} "
        f"(test loss {metrics['final']['test_loss']:.4f}, {metrics['steps']} steps, "
        f"{'with' if model.use_batch_norm else 'without'} batch norm, "
        f"{args.devices} device{'s' if args.devices > 1 else ''}); outputs in {args.out}"
    )
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (TrainingDiverged, CheckpointError, FileNotFoundError) as err:
        # The errors a user can fix: a clear message, no traceback.
        sys.exit(f"error: {err}")

"""What the training examples share: the command line, its checks, and the run itself.

A training script (``train_mlp.py``, ``train_cnn.py``) adds its model's flags to
:func:`build_parser`'s parser, builds its model and data, and calls :func:`run`,
which

- checks every argument before anything is compiled or written (one line on
  stderr naming the flag and what it accepts, exit status 2, no traceback);
- refuses to write over a previous run's outputs unless ``--resume`` (continue
  it) or ``--overwrite`` (replace it) is given;
- trains with :func:`jaxbn.train.fit` (checkpoints every ``--checkpoint-every``
  steps, exact ``--resume``, data-parallel ``--devices``), evaluating the test
  split after every chunk of ``--log-every`` steps;
- runs across several processes (``--coordinator``, ``--num-processes``,
  ``--process-id``): every process runs the same command but its process id, feeds
  its own rows of every batch, and only process 0 writes outputs;
- shows a progress bar that says "compiling" until the first chunk is done;
- with ``--diagnose``, prints :func:`jaxbn.diagnose`'s report on the trained
  model for the test split (why evaluation may be worse than training, and the
  fix);
- writes ``metrics.json`` (with training throughput, evaluation time and
  checkpoint time named apart) and ``training_curve.png`` to ``--out``, and
  removes ``--out`` again if it created it and a failed run left it empty.
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import _figures
import jax
import optax
from tqdm import tqdm

from jaxbn import diagnose, distributed
from jaxbn.checkpoint import CheckpointError, read_metadata
from jaxbn.parallel import data_mesh
from jaxbn.train import TrainingDiverged, evaluate, fit

OPTIMIZERS: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
    "rmsprop": lambda lr: optax.rmsprop(lr),
}

#: The files a run writes to ``--out``; any of them there means a previous run.
OUTPUTS = ("checkpoint.npz", "metrics.json", "training_curve.png")
MAX_SEED = 2**32  # jax.random.key keeps 32 bits of a seed: larger ones alias smaller ones


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an int ``>= low`` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return value

    return parse


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float ``> 0``."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """An argparse ``type``: an int in ``[0, 2**32)``."""
    value = int_at_least(0)(text)
    if value >= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32), got {text!r}")
    return value


def demo_parser(description: str) -> argparse.ArgumentParser:
    """The flags of the framework demos (``train_nnx.py``, ``train_equinox.py``)."""
    p = _figures.ArgumentParser(description=description)
    p.add_argument("--steps", type=int_at_least(1), default=500, help="training steps")
    p.add_argument("--batch-size", type=int_at_least(2), default=64, help="examples per step")
    p.add_argument("--hidden", type=int_at_least(1), default=64, help="hidden units")
    p.add_argument(
        "--lr", type=positive_float, default=0.05, help="SGD learning rate (momentum 0.9)"
    )
    p.add_argument("--seed", type=seed, default=0, help="seed of the init and the batches")
    return p


def check_batch_size_fits(parser: argparse.ArgumentParser, batch_size: int, num_train: int):
    """``parser.error`` unless ``batch_size`` fits in the training split."""
    if batch_size > num_train:
        parser.error(
            f"argument --batch-size: expected at most the {num_train} examples of "
            f"the training split, got {batch_size}"
        )


def int_tuple(text: str) -> tuple[int, ...]:
    """An argparse ``type``: comma-separated positive ints such as ``100,100``."""
    try:  # every entry an int: "100,,100" is a typo, not two layers
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 100,100,100, got {text!r}"
        )
    return sizes


def build_parser(description: str, *, out_help: str, steps: int, batch_size: int, lr: float,
                 optimizer: str) -> argparse.ArgumentParser:  # fmt: skip
    """The flags every training example has (each explained by ``--help``).

    Args:
        description: what the script trains.
        out_help: where the outputs go by default (``--out`` defaults to ``None``:
            the script chooses a folder per variant).
        steps: the default ``--steps``.
        batch_size: the default ``--batch-size``.
        lr: the default ``--lr``.
        optimizer: the default ``--optimizer``.
    """
    p = _figures.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--steps", type=int_at_least(0), default=steps, help="total training steps")
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=batch_size,
        help="examples per step, at most the training split",
    )
    p.add_argument("--lr", type=positive_float, default=lr, help="learning rate, > 0")
    p.add_argument(
        "--optimizer",
        choices=sorted(OPTIMIZERS),
        default=optimizer,
        help="optax optimizer (momentum: SGD with momentum 0.9)",
    )
    p.add_argument(
        "--seed",
        type=seed,
        default=0,
        help="seed of the initialization and the batch order, in [0, 2**32)",
    )
    p.add_argument("--out", default=None, help=f"directory for all outputs ({out_help})")
    p.add_argument(
        "--log-every",
        type=int_at_least(1),
        default=100,
        help="steps per chunk: the loss is read and the test set scored this often",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int_at_least(0),
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
        "--overwrite",
        action="store_true",
        help="replace the outputs of a previous run in OUT (without it, they are kept "
        "and the run stops)",
    )
    p.add_argument(
        "--devices",
        type=int_at_least(1),
        default=1,
        help="train data-parallel over the first N devices (--batch-size must be a multiple "
        "of N); on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N to get N",
    )
    p.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="several processes: the address of process 0, the same in every process "
        "(e.g. 127.0.0.1:1234 on one machine); the run then spans every process's devices. "
        "On one machine: a correctness demonstration, slow by design (the collectives "
        "cross between processes through gloo over TCP); --devices N is the fast way",
    )
    p.add_argument(
        "--num-processes",
        type=int_at_least(1),
        default=1,
        help="several processes: how many take part (with --coordinator)",
    )
    p.add_argument(
        "--process-id",
        type=int_at_least(0),
        default=0,
        help="several processes: this process's number, in [0, --num-processes)",
    )
    p.add_argument(
        "--local-devices",
        type=int_at_least(1),
        default=None,
        help="several processes on a CPU: split each process's CPU into this many devices",
    )
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="after training, print jaxbn.diagnose's report on the trained model's batch "
        "norm for the test split (needs batch norm)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


#: Printed by process 0 of a run over several processes (and in ``--help``).
MULTI_PROCESS_NOTE = (
    "several processes: every batch-norm statistic and gradient crosses between the "
    "processes through gloo over TCP, so on one machine this run is a demonstration of "
    "correctness, hundreds of times slower than one process by design (use --devices "
    "for speed on one machine)"
)


def _drop_gloo_lines() -> None:
    """Keeps gloo's "[Gloo] Rank i is connected to j peer ranks" lines off the output.

    Gloo (C++) writes one to file descriptor 1 for every connection it makes, with
    no setting to turn them off. Descriptor 1 becomes a pipe whose lines are copied
    to the real output, but gloo's; at exit the pipe is drained before Python ends.
    """
    sys.stdout.flush()
    read, write = os.pipe()
    real = os.dup(1)
    os.dup2(write, 1)
    os.close(write)

    def copy() -> None:
        with os.fdopen(read, "rb") as src, os.fdopen(os.dup(real), "wb", buffering=0) as dst:
            for line in src:
                if not line.startswith(b"[Gloo] "):
                    dst.write(line)

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()

    def restore() -> None:
        sys.stdout.flush()
        os.dup2(real, 1)  # closes the pipe's last writer: copy() drains it and ends
        thread.join(timeout=5)

    atexit.register(restore)


def join_processes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """With ``--coordinator``, joins this process to the run; call it before any JAX work.

    Every process of the run checks that the others were started with the same
    flags (all but ``--process-id``), so a mismatch stops the run before training.
    """
    defaults = {"--num-processes": 1, "--process-id": 0, "--local-devices": None}
    if args.coordinator is None:
        for flag, default in defaults.items():
            if getattr(args, flag[2:].replace("-", "_")) != default:
                parser.error(f"argument {flag}: only with --coordinator (several processes)")
        return
    if args.process_id >= args.num_processes:
        parser.error(
            f"argument --process-id: expected a number in [0, {args.num_processes}) "
            f"(--num-processes {args.num_processes}), got {args.process_id}"
        )
    if args.devices != 1:
        parser.error("argument --devices: not with --coordinator (the run uses every device)")
    try:
        distributed.initialize(
            args.coordinator,
            args.num_processes,
            args.process_id,
            local_device_count=args.local_devices,
        )
    except (TypeError, ValueError) as err:
        parser.error(f"argument --coordinator: {err}")
    _drop_gloo_lines()  # before the first collective, which connects the processes
    if args.process_id == 0:
        print(MULTI_PROCESS_NOTE, flush=True)
    shared = {k: v for k, v in sorted(vars(args).items()) if k != "process_id"}
    distributed.check_same_config(shared)


def default_out(args: argparse.Namespace, name: str) -> str:
    """``runs/NAME``, with ``_N_devices`` or ``_N_processes`` for a data-parallel run.

    A run over several devices is a run of its own (its timing differs, and its
    checkpoint would make the one-device run refuse to start): in a folder of its
    own, the README's commands run one after another.
    """
    if args.coordinator is not None:
        name += f"_{args.num_processes}_processes"
    elif args.devices > 1:
        name += f"_{args.devices}_devices"
    return os.path.join("runs", name)


def _check_out(parser: argparse.ArgumentParser, out: str) -> None:
    """``--out`` is, or can be made, a writable directory; nothing is created here."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            parser.error(f"argument --out: {out!r} is a file, expected a directory")
        if not os.access(out, os.W_OK | os.X_OK):
            parser.error(f"argument --out: directory {out!r} is not writable")
        return
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"argument --out: cannot create {out!r}: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"argument --out: cannot create {out!r}: {parent!r} is not writable")


def check_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, *, num_train: int, num_test: int
):
    """Every check that needs more than one flag or the data; ``parser.error`` on failure.

    Returns:
        The mesh for ``--devices`` (``None`` for one device).
    """
    check_batch_size_fits(parser, args.batch_size, num_train)
    if args.diagnose and args.no_batch_norm:
        parser.error("argument --diagnose: not with --no-batch-norm (there is no batch norm)")
    if args.diagnose and args.batch_size > num_test:
        parser.error(
            f"argument --diagnose: measures batch statistics at --batch-size {args.batch_size}, "
            f"more than the {num_test} examples of the test split"
        )
    if args.resume and args.overwrite:
        parser.error("argument --overwrite: not allowed with --resume (continue or replace)")
    _check_out(parser, args.out)
    ckpt = os.path.join(args.out, "checkpoint.npz")
    if args.resume:
        if not os.path.isfile(ckpt):
            parser.error(f"argument --resume: there is no checkpoint at {ckpt!r} to resume from")
        done = read_metadata(ckpt)["step"]
        if args.steps < done:
            parser.error(
                f"argument --steps: the checkpoint {ckpt!r} is at step {done}; expected "
                f"--steps >= {done}, got {args.steps}"
            )
    else:
        _figures.check_out(
            parser,
            args.out,
            OUTPUTS,
            overwrite=args.overwrite,
            remedy="pass --resume to continue it or --overwrite to replace it",
        )
    if args.coordinator is not None:  # several processes: every device of every process
        if args.batch_size % jax.device_count():
            parser.error(
                f"argument --batch-size: {args.batch_size} is not divisible by the "
                f"{jax.device_count()} devices of the {args.num_processes} processes"
            )
        return data_mesh()
    if args.devices == 1:
        return None
    if args.batch_size % args.devices:
        parser.error(
            f"argument --batch-size: {args.batch_size} is not divisible by --devices {args.devices}"
        )
    try:
        return data_mesh(args.devices)
    except ValueError as err:
        parser.error(f"argument --devices: {err}")


class Progress:
    """A progress bar that says "compiling" until the first chunk is done.

    The bar of the training steps starts after the first chunk, so its rate and
    ETA leave compilation out.
    """

    def __init__(self, *, total: int, done: int, disable: bool):
        self.total, self.disable, self.training = total, disable, False
        self.bar = tqdm(
            total=total, initial=done, desc="compiling", unit="step", disable=disable, leave=False
        )

    def update(self, n: int, **postfix: str) -> None:
        """``n`` more steps done."""
        if not self.training:
            done = self.bar.n + n
            self.bar.close()
            self.bar = tqdm(
                total=self.total, initial=done, desc="train", unit="step", disable=self.disable
            )
            self.training = True
        else:
            self.bar.update(n)
        self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def save_curve(history: list[dict], path: str, title: str) -> None:
    """The training curve (loss and accuracy, train and test) as a PNG."""
    steps = [h["step"] for h in history]
    fig, axes = _figures.new_figure(2, figsize=(9, 3.5))
    ax_loss, ax_acc = axes
    ax_loss.plot(steps, [h["train_loss"] for h in history], label="train (chunk mean)")
    ax_loss.plot(steps, [h["test_loss"] for h in history], label="test")
    ax_loss.set(xlabel="training step", ylabel="cross-entropy", yscale="log", title="loss")
    ax_acc.plot(steps, [h["train_accuracy"] for h in history], label="train (chunk mean)")
    ax_acc.plot(steps, [h["test_accuracy"] for h in history], label="test")
    ax_acc.set(xlabel="training step", ylabel="accuracy", title="accuracy")
    for ax in axes:
        ax.legend()
    _figures.save_figure(fig, axes, path, title=title, dpi=120)


#: The events in which JAX reports the time it spends compiling (tracing, lowering, XLA).
COMPILE_EVENTS = frozenset(
    {
        "/jax/core/compile/jaxpr_trace_duration",
        "/jax/core/compile/jaxpr_to_mlir_module_duration",
        "/jax/core/compile/backend_compile_duration",
    }
)


class _Clock:
    """Seconds spent training, evaluating and checkpointing, each apart.

    The throughput comes from the chunks whose length was compiled already; a run
    with none (a single chunk) gets it from its first calls less the compilation
    JAX reports in them (:meth:`on_event`, a ``jax.monitoring`` listener).
    """

    def __init__(self):
        self.seen_lengths: set[int] = set()
        self.train = self.first_calls = self.evaluation = self.checkpoints = 0.0
        self.steady_steps = self.first_steps = 0
        self.steady_seconds = self.compile = 0.0
        self.compiles: list[tuple[float, float]] = []  # (when it ended, seconds)

    def on_event(self, event: str, seconds: float, **kwargs: Any) -> None:
        if event in COMPILE_EVENTS:
            self.compiles.append((time.perf_counter(), seconds))

    def chunk(self, n: int, seconds: float) -> None:
        now = time.perf_counter()
        compiled = sum(s for t, s in self.compiles if t >= now - seconds)
        self.compiles.clear()
        self.train += seconds
        if n in self.seen_lengths:  # compiled already: a steady-state figure
            self.steady_steps += n
            self.steady_seconds += seconds
        else:
            self.first_calls += seconds
            self.first_steps += n
            self.compile += compiled
            self.seen_lengths.add(n)

    def steps_per_second(self) -> float | None:
        if self.steady_steps:
            return self.steady_steps / self.steady_seconds
        if self.first_steps and self.first_calls > self.compile:
            return self.first_steps / (self.first_calls - self.compile)
        return None  # nothing trained

    def report(self, total: float) -> dict[str, Any]:
        return {
            "train_steps_per_second": self.steps_per_second(),
            "train_seconds": self.train,
            "train_seconds_of_first_calls": self.first_calls,
            "compile_seconds_of_first_calls": self.compile,
            "evaluation_seconds": self.evaluation,
            "checkpoint_seconds": self.checkpoints,
            "total_seconds": total,
        }


def run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    *,
    model: Any,
    data: Any,
    x_train: Any,
    x_test: Any,
    config: dict,
    title: str,
    scan: bool = True,
) -> dict:
    """Checks the arguments, trains, evaluates, writes the outputs; returns the metrics.

    Args:
        parser: the parser of ``args`` (for one-line errors).
        args: the parsed flags of :func:`build_parser` (``args.out`` set).
        model: the network config.
        data: a :class:`jaxbn.data.Dataset` (its labels are used).
        x_train: the training examples as the model takes them.
        x_test: the test examples as the model takes them.
        config: JSON-able description of the run (stored in the checkpoint and
            compared on resume; written to ``metrics.json``).
        title: the title of the training curve.
        scan: train each chunk in one ``lax.scan`` (else one jitted step per call).

    Returns:
        The contents of ``metrics.json``: ``config``, ``steps``, ``devices``,
        ``final`` (test accuracy and loss), ``timing`` (training throughput
        without compilation, and the seconds spent training, evaluating and
        writing checkpoints, each named), ``history`` (one entry per chunk).
    """
    mesh = check_args(parser, args, num_train=len(data.y_train), num_test=len(data.y_test))
    ckpt = os.path.join(args.out, "checkpoint.npz")
    history: list[dict] = []
    start = 0
    if args.resume:
        meta = read_metadata(ckpt)
        history, start = list(meta["metadata"].get("history", [])), meta["step"]
        finished = _finished_run(args, start)
        if finished is not None:
            return finished

    clock = _Clock()
    main_process = distributed.is_main_process()
    progress = Progress(
        total=args.steps,
        done=min(start, args.steps),
        disable=args.no_progress or not main_process,
    )

    def score(ts):
        """Test loss and accuracy (each process on its own copy of the replicated values)."""
        params, state = ts.params, ts.state
        if jax.process_count() > 1:
            params, state = jax.device_get((params, state))
        return evaluate(model, params, state, x_test, data.y_test)

    def on_chunk(ts, chunk):
        n = len(chunk["step"])
        clock.chunk(n, chunk["seconds"])
        began = time.perf_counter()
        test = score(ts)
        entry = {
            "step": int(chunk["step"][-1]) + 1,
            "train_loss": float(chunk["loss"].mean()),
            "train_accuracy": float(chunk["accuracy"].mean()),
            "test_loss": float(test["loss"]),
            "test_accuracy": float(test["accuracy"]),
        }
        clock.evaluation += time.perf_counter() - began
        history.append(entry)
        progress.update(
            n, loss=f"{entry['train_loss']:.4f}", test_acc=f"{entry['test_accuracy']:.4f}"
        )

    stale = [os.path.join(args.out, f) for f in OUTPUTS if f != "checkpoint.npz"]

    def on_checkpoint(step, seconds):
        clock.checkpoints += seconds
        # --overwrite: this run's first checkpoint has replaced the previous run's;
        # its metrics and curve go with it, so that the folder never holds one
        # run's checkpoint beside another's metrics (an interrupted run leaves
        # either the previous run whole or this run's checkpoint alone).
        if args.overwrite and main_process:
            for path in stale:
                if os.path.exists(path):
                    os.remove(path)

    created = not os.path.exists(args.out)
    os.makedirs(args.out, exist_ok=True)
    jax.monitoring.register_event_duration_secs_listener(clock.on_event)
    began = time.perf_counter()
    try:
        ts = fit(
            model,
            OPTIMIZERS[args.optimizer](args.lr),
            x_train,
            data.y_train,
            steps=args.steps,
            batch_size=args.batch_size,
            key=jax.random.key(args.seed),
            chunk_size=args.log_every,
            checkpoint_path=ckpt,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            overwrite=args.overwrite,
            config=config,
            callback=on_chunk,
            checkpoint_metadata=lambda: {"history": history},
            on_checkpoint=on_checkpoint,
            mesh=mesh,
            scan=scan,
        )
    except BaseException:
        if created and not os.listdir(args.out):
            os.rmdir(args.out)  # a failed run leaves no empty folder behind
        raise
    finally:
        progress.close()
        jax.monitoring.unregister_event_duration_listener(clock.on_event)
    total = time.perf_counter() - began

    test = score(ts)
    if args.diagnose and main_process:
        params, state = jax.device_get((ts.params, ts.state))
        report = diagnose(
            model, params, state, x_test, batch_size=args.batch_size, labels=data.y_test
        )
        print(report)
    metrics = {
        "config": config,
        "steps": int(ts.step),
        "devices": 1 if mesh is None else mesh.size,
        "processes": jax.process_count(),
        "final": {"test_accuracy": float(test["accuracy"]), "test_loss": float(test["loss"])},
        "timing": clock.report(total),
        "history": history,
    }
    if not main_process:  # process 0 writes the outputs
        return metrics
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    if history:
        save_curve(history, os.path.join(args.out, "training_curve.png"), title)
    devices = metrics["devices"]
    print(
        f"final test accuracy: {metrics['final']['test_accuracy']:.4f} "
        f"(test loss {metrics['final']['test_loss']:.4f}, {metrics['steps']} steps, "
        f"{devices} device{'s' if devices > 1 else ''}); outputs in {args.out}"
    )
    return metrics


def _finished_run(args: argparse.Namespace, step: int) -> dict | None:
    """The metrics of a ``--resume`` that has nothing left to train, said in one line.

    Its ``metrics.json`` (the figures of the run that trained) is kept as it is;
    ``None`` if there are steps to train, or no metrics to keep.
    """
    path = os.path.join(args.out, "metrics.json")
    if step < args.steps or not os.path.isfile(path):
        return None
    if distributed.is_main_process():
        print(
            f"the run in {args.out} is already finished (step {step} of --steps "
            f"{args.steps}); its metrics.json is kept. Pass a larger --steps to train on."
        )
    with open(path) as f:
        return json.load(f)


def command_line(main: Callable[[], Any]) -> None:
    """Runs ``main()``; an error the user can fix is one line on stderr, no traceback."""
    try:
        main()
    except (TrainingDiverged, CheckpointError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")

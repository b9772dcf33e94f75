"""Training the MLP: a pure train step, evaluation, and a ``lax.scan`` loop.

The recipe, in full (this is :func:`make_train_step`)::

    def loss_fn(params, state, x, labels):
        logits, new_state = model.apply(params, state, x, training=True)
        return cross_entropy(logits, labels), (new_state, logits)

    (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The optimizer sees only ``params``; the running statistics of batch norm come out
of the forward pass through ``has_aux`` and replace the old ``state``.

:func:`make_train_loop` compiles many such steps into one dispatch with
``lax.scan``; every batch is drawn on the device from a PRNG key and the step
number (:func:`jaxbn.data.batch_indices`), so the host is not in the loop and a
run is a deterministic function of its key. :func:`fit` runs that loop in chunks,
checks each chunk's losses (:class:`TrainingDiverged` on a non-finite one),
calls back to the host between chunks (progress, evaluation) and writes
checkpoints (:mod:`jaxbn.checkpoint`) from which a run resumes exactly.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.typing import ArrayLike

from jaxbn.checkpoint import load_checkpoint, save_checkpoint
from jaxbn.data import batch_indices, check_batch_size
from jaxbn.mlp import MLP

__all__ = [
    "TrainState",
    "TrainingDiverged",
    "cross_entropy",
    "evaluate",
    "fit",
    "init_train_state",
    "make_train_loop",
    "make_train_step",
]

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(NamedTuple):
    """Everything a training run needs to continue: what a checkpoint holds.

    Attributes:
        params: the network's params (what the optimizer trains).
        state: the network's running statistics.
        opt_state: the optimizer's state.
        key: the PRNG key the batches are drawn from (never split in place: the
            batch of step ``t`` is a function of ``key`` and ``t``).
        step: int32 scalar, the number of steps taken.
    """

    params: Any
    state: Any
    opt_state: Any
    key: jax.Array
    step: jax.Array


class TrainingDiverged(ValueError):
    """Training produced a non-finite loss or state; ``step`` is the first bad step.

    Args:
        step: the 0-based number of the first step whose loss was not finite (or
            at whose start the params/state were not finite).
        loss: that loss (NaN when the state was found non-finite instead).
        detail: what was found, for the message; by default the loss.
    """

    def __init__(self, step: int, loss: float, detail: str | None = None):
        self.step = int(step)
        self.loss = float(loss)
        if detail is None:
            detail = f"the loss of step {self.step} (0-based) is {self.loss}"
        super().__init__(
            f"training diverged: {detail}; lower the learning rate. "
            f"The last checkpoint, if any, is left intact."
        )


def cross_entropy(logits: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Mean softmax cross-entropy of ``logits [batch, classes]`` and int ``labels [batch]``.

    Args:
        logits: unnormalized log-probabilities.
        labels: integer class indices.

    Returns:
        A scalar.

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxbn.train import cross_entropy
        >>> round(float(cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))), 4)  # log(4)
        1.3863
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def init_train_state(
    model: MLP, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """A fresh :class:`TrainState`: the key is split into an init key and a data key.

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.
        key: a ``jax.random.key``.

    Returns:
        A :class:`TrainState` at step 0.
    """
    init_key, data_key = jax.random.split(key)
    params, state = model.init(init_key)
    return TrainState(params, state, optimizer.init(params), data_key, jnp.zeros((), jnp.int32))


def make_train_step(
    model: MLP, optimizer: optax.GradientTransformation
) -> Callable[[Any, Any, Any, Batch], tuple[Any, Any, Any, Metrics]]:
    """Returns the pure training step ``(params, state, opt_state, batch) -> (..., metrics)``.

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.

    Returns:
        ``train_step(params, state, opt_state, (x, labels))`` returning
        ``(params, state, opt_state, metrics)`` with ``metrics = {"loss",
        "accuracy"}`` of the batch (computed before the update). It is pure and
        can be wrapped in ``jax.jit``, ``lax.scan``, etc.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from jaxbn.mlp import MLP
        >>> from jaxbn.train import make_train_step
        >>> model, opt = MLP((2, 8, 2)), optax.sgd(0.1)
        >>> params, state = model.init(jax.random.key(0))
        >>> step = jax.jit(make_train_step(model, opt))
        >>> batch = (jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.array([0, 1]))
        >>> params, state, opt_state, metrics = step(params, state, opt.init(params), batch)
        >>> sorted(metrics)
        ['accuracy', 'loss']
    """

    def loss_fn(params, state, x, labels):
        logits, new_state = model.apply(params, state, x, training=True)
        return cross_entropy(logits, labels), (new_state, logits)

    def train_step(params, state, opt_state, batch):
        """One optimizer step on ``batch = (x, labels)``; returns the new values and metrics."""
        x, labels = batch
        (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": _accuracy(logits, labels)}
        return params, new_state, opt_state, metrics

    return train_step


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(model, params, state, x, labels):
    logits, _ = model.apply(params, state, x, training=False)
    return {"loss": cross_entropy(logits, labels), "accuracy": _accuracy(logits, labels)}


def evaluate(model: MLP, params: Any, state: Any, x: ArrayLike, labels: ArrayLike) -> Metrics:
    """Loss and accuracy of the network in inference mode (running statistics).

    Args:
        model: the network config.
        params: the params.
        state: the running statistics (used, not changed).
        x: ``[n, inputs]`` examples.
        labels: ``[n]`` integer labels.

    Returns:
        ``{"loss": scalar, "accuracy": scalar}`` (JAX arrays).
    """
    return _evaluate(model, params, state, jnp.asarray(x), jnp.asarray(labels))


@functools.partial(jax.jit, static_argnames=("model", "optimizer", "batch_size", "num_steps"))
def _train_loop(ts, x, labels, *, model, optimizer, batch_size, num_steps):
    check_batch_size(batch_size, x.shape[0])
    train_step = make_train_step(model, optimizer)

    def body(ts, _):
        idx = batch_indices(ts.key, ts.step, num_examples=x.shape[0], batch_size=batch_size)
        params, state, opt_state, metrics = train_step(
            ts.params, ts.state, ts.opt_state, (x[idx], labels[idx])
        )
        return TrainState(params, state, opt_state, ts.key, ts.step + 1), metrics

    return lax.scan(body, ts, None, length=num_steps)


def make_train_loop(
    model: MLP, optimizer: optax.GradientTransformation, *, batch_size: int
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Returns ``run(train_state, x, labels, num_steps) -> (train_state, metrics)``, jitted.

    ``run`` takes ``num_steps`` (static) training steps in one ``lax.scan``; step
    ``t`` trains on ``x[batch_indices(key, t)]``, drawn on the device. The metrics
    are stacked: ``metrics["loss"]`` is ``[num_steps]``. The model, the optimizer
    and the sizes are static: one compilation per distinct ``num_steps``, shared
    by every loop made with the same (equal) model and the same optimizer object.

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.
        batch_size: examples per step.

    Returns:
        The jitted ``run`` function.

    Examples:
        >>> import jax, optax
        >>> from jaxbn.data import make_blobs
        >>> from jaxbn.mlp import MLP
        >>> from jaxbn.train import init_train_state, make_train_loop
        >>> data = make_blobs(num_examples=100, num_features=4, num_classes=2)
        >>> model, opt = MLP((4, 8, 2)), optax.sgd(0.1)
        >>> run = make_train_loop(model, opt, batch_size=10)
        >>> ts = init_train_state(model, opt, jax.random.key(0))
        >>> ts, metrics = run(ts, data.x_train, data.y_train, 20)
        >>> int(ts.step), metrics["loss"].shape
        (20, (20,))
    """

    def run(ts: TrainState, x: ArrayLike, labels: ArrayLike, num_steps: int):
        """Takes ``num_steps`` steps from ``ts`` on ``(x, labels)`` in one dispatch."""
        return _train_loop(
            ts,
            jnp.asarray(x),
            jnp.asarray(labels),
            model=model,
            optimizer=optimizer,
            batch_size=batch_size,
            num_steps=num_steps,
        )

    return run


def _all_finite(tree) -> bool:
    return all(
        bool(jnp.all(jnp.isfinite(leaf)))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    )


def fit(
    model: MLP,
    optimizer: optax.GradientTransformation,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    steps: int,
    batch_size: int,
    key: jax.Array,
    chunk_size: int = 100,
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    config: dict | None = None,
    callback: Callable[[TrainState, dict[str, np.ndarray]], None] | None = None,
    checkpoint_metadata: Callable[[], dict] | None = None,
) -> TrainState:
    """Trains for ``steps`` steps in scan-compiled chunks; checkpoints; resumes.

    Chunks end every ``chunk_size`` steps, at every multiple of
    ``checkpoint_every`` and at ``steps``. After each chunk the losses are read
    (one device sync per chunk) and checked, ``callback`` is called, and at a
    checkpoint step the state is saved.

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.
        x: ``[n, inputs]`` training examples (moved to the device once).
        labels: ``[n]`` integer labels.
        steps: total number of steps of the run (counting steps before a resume).
        batch_size: examples per step, ``<= n``.
        key: the run's ``jax.random.key`` (initialization and batches).
        chunk_size: steps per compiled ``lax.scan`` dispatch.
        checkpoint_path: ``.npz`` file to save to (and resume from), or ``None``.
        checkpoint_every: save every this many steps (0: only at the end).
        resume: continue from ``checkpoint_path``, which must exist.
        config: JSON-able dict stored in the checkpoint and required to match on
            resume (the architecture and the optimizer's hyperparameters).
        callback: ``callback(train_state, chunk_metrics)`` after each chunk;
            ``chunk_metrics`` maps ``"step"`` (the 0-based step numbers),
            ``"loss"`` and ``"accuracy"`` to NumPy arrays.
        checkpoint_metadata: returns a JSON-able dict saved with each checkpoint.

    Returns:
        The final :class:`TrainState`.

    Raises:
        TrainingDiverged: on the first non-finite loss (or non-finite state);
            no checkpoint is written past the last good one.
        FileNotFoundError: if ``resume`` and there is no checkpoint.
        jaxbn.checkpoint.CheckpointError: if the checkpoint is corrupt or does
            not match ``model``, ``optimizer`` or ``config``.
        ValueError: for bad ``steps``, ``chunk_size``, ``checkpoint_every`` or
            ``batch_size``.
    """
    for name, value, low in (
        ("steps", steps, 0),
        ("chunk_size", chunk_size, 1),
        ("checkpoint_every", checkpoint_every, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path, got None")
    x, labels = jnp.asarray(x), jnp.asarray(labels)
    check_batch_size(batch_size, x.shape[0])

    ts = init_train_state(model, optimizer, key)
    if resume:
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(
                f"resume requested but there is no checkpoint at {os.fspath(checkpoint_path)!r}"
            )
        ts, _ = load_checkpoint(checkpoint_path, ts, config=config)
    run = make_train_loop(model, optimizer, batch_size=batch_size)

    def save(ts):
        if not _all_finite(ts):
            step = int(ts.step)
            raise TrainingDiverged(
                step,
                math.nan,
                f"the params or state at the start of step {step} (0-based) are not finite "
                f"and were not checkpointed",
            )
        save_checkpoint(
            checkpoint_path,
            ts,
            step=int(ts.step),
            config=config,
            metadata=None if checkpoint_metadata is None else checkpoint_metadata(),
        )

    step = int(ts.step)
    while step < steps:
        n = min(chunk_size, steps - step)
        if checkpoint_every:
            n = min(n, checkpoint_every - step % checkpoint_every)
        ts, metrics = run(ts, x, labels, n)
        chunk = {k: np.asarray(v) for k, v in metrics.items()}
        chunk["step"] = np.arange(step, step + n)
        bad = ~np.isfinite(chunk["loss"])
        if bad.any():
            first = int(np.argmax(bad))
            raise TrainingDiverged(step + first, chunk["loss"][first])
        step += n
        if callback is not None:
            callback(ts, chunk)
        if checkpoint_path is not None and (
            step == steps or (checkpoint_every and step % checkpoint_every == 0)
        ):
            save(ts)
    return ts

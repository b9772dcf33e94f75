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

Data-parallel training: give any of :func:`make_train_step`,
:func:`make_train_loop` or :func:`fit` a ``mesh`` (:func:`data_mesh` builds one
over the first ``n`` devices). The step then runs under ``jax.shard_map``: every
global batch is split over the mesh's devices along its first axis, params,
running statistics and optimizer state are replicated, batch norm's statistics
are all-reduced (the model is used with ``axis_name`` set to the mesh's axes),
and the loss is the mean over the global batch (``lax.pmean`` of the per-device
means), so its gradient, and the whole step, is that of single-device training
on the same global batch. The loop draws the same global batches as without a
mesh; each device gathers only its own rows.
"""

from __future__ import annotations

import dataclasses
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn._checks import AxisName
from jaxbn.checkpoint import load_checkpoint, save_checkpoint
from jaxbn.data import batch_indices, check_batch_size, epoch_order
from jaxbn.mlp import MLP

__all__ = [
    "TrainState",
    "TrainingDiverged",
    "cross_entropy",
    "data_mesh",
    "evaluate",
    "fit",
    "init_train_state",
    "make_train_loop",
    "make_train_step",
]

#: The scan loop draws the orders of the epochs it spans up front when they hold
#: at most this many indices (64 MiB of int32), else one permutation per step.
MAX_PRECOMPUTED_INDICES = 1 << 24

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


def data_mesh(num_devices: int | None = None, *, axis_name: str = "data") -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices, for data parallelism.

    Args:
        num_devices: how many of ``jax.devices()`` to use (``None``: all of them).
        axis_name: the name of the mesh's axis.

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``(num_devices,)``.

    Raises:
        ValueError: if fewer than ``num_devices`` devices are available (on CPU,
            set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before
            JAX is imported to get ``N`` devices).

    Examples:
        >>> from jaxbn.train import data_mesh
        >>> data_mesh(1).axis_names
        ('data',)
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_devices must be a positive int or None, got {num_devices!r}")
    if n > len(devices):
        raise ValueError(
            f"num_devices={n} but only {len(devices)} {devices[0].platform} device(s) are "
            f"available; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            f"before JAX is imported"
        )
    return jax.make_mesh((n,), (axis_name,), devices=devices[:n])


def _mesh_axes(mesh: Mesh) -> AxisName:
    """The named axis (or axes) a batch is split over: all of the mesh's."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def _check_mesh(mesh, batch_size: int) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the number of devices {mesh.size} "
            f"of the mesh; use a multiple of {mesh.size}"
        )


def _place(tree, mesh: Mesh, spec: P):
    """``tree`` resharded to ``NamedSharding(mesh, spec)``, inside or outside ``jit``.

    Needed on a mesh with explicit axes (``jax.make_mesh``'s default), where
    ``shard_map`` requires its inputs' types to match its ``in_specs``; on a mesh
    of automatic axes ``shard_map`` lays its inputs out itself.
    """
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return tree
    return jax.reshard(tree, NamedSharding(mesh, spec))


def _local_train_step(model: MLP, optimizer, axis_name: AxisName):
    """The per-device step: ``model`` as given, loss and metrics averaged over ``axis_name``."""

    def mean(v):
        return v if axis_name is None else lax.pmean(v, axis_name)

    def loss_fn(params, state, x, labels):
        logits, new_state = model.apply(params, state, x, training=True)
        # The global batch's mean loss: every device holds the same number of
        # examples, so it is the mean of the per-device means. Differentiating the
        # pmean gives each replicated param the all-reduced (global) gradient.
        return mean(cross_entropy(logits, labels)), (new_state, logits)

    def train_step(params, state, opt_state, batch):
        """One optimizer step on ``batch = (x, labels)``; returns the new values and metrics."""
        x, labels = batch
        (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, state, x, labels
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": mean(_accuracy(logits, labels))}
        return params, new_state, opt_state, metrics

    return train_step


def make_train_step(
    model: MLP,
    optimizer: optax.GradientTransformation,
    *,
    mesh: Mesh | None = None,
    axis_name: AxisName = None,
) -> Callable[[Any, Any, Any, Batch], tuple[Any, Any, Any, Metrics]]:
    """Returns the pure training step ``(params, state, opt_state, batch) -> (..., metrics)``.

    Three forms:

    - neither ``mesh`` nor ``axis_name``: the single-device step;
    - ``mesh``: the data-parallel step. It takes and returns global arrays: the
      batch is split over all of the mesh's devices along its first axis
      (``jax.shard_map``), the rest is replicated. ``model`` is used with its
      ``axis_name`` replaced by the mesh's axes (pass the same config as for one
      device), so batch norm normalizes with the global batch's statistics; the
      loss, the gradients, the running statistics and the metrics are those of
      the single-device step on the same global batch;
    - ``axis_name``: the per-device body of the data-parallel step, to call
      inside your own ``shard_map`` (or ``pmap``) over that axis: the loss and
      the metrics are averaged over ``axis_name``, and ``model`` is used as
      given (set ``model.axis_name`` to synchronize batch norm too; leave it
      ``None`` for per-device statistics).

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.
        mesh: a :class:`jax.sharding.Mesh` to run data-parallel on (see
            :func:`data_mesh`), or ``None``.
        axis_name: the named axis to average over when the step runs inside a
            mapped function; not together with ``mesh``.

    Returns:
        ``train_step(params, state, opt_state, (x, labels))`` returning
        ``(params, state, opt_state, metrics)`` with ``metrics = {"loss",
        "accuracy"}`` of the (global) batch, computed before the update. It is
        pure and can be wrapped in ``jax.jit``, ``lax.scan``, etc. With a mesh,
        the batch size must be divisible by ``mesh.size`` (``ValueError``
        while tracing).

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
    if mesh is None:
        return _local_train_step(model, optimizer, axis_name)
    if axis_name is not None:
        raise ValueError(
            f"give either mesh (the step shards itself) or axis_name (the step runs inside "
            f"your own shard_map), not both; got axis_name={axis_name!r}"
        )
    _check_mesh(mesh, 0)
    axes = _mesh_axes(mesh)
    local = _local_train_step(dataclasses.replace(model, axis_name=axes), optimizer, axes)
    batch_spec = P(tuple(mesh.axis_names))
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(), P(), batch_spec),
        out_specs=P(),
    )

    def train_step(params, state, opt_state, batch):
        """One data-parallel step on the global ``batch = (x, labels)``."""
        _check_mesh(mesh, int(jnp.shape(batch[0])[0]))
        # Lay the inputs out as shard_map expects (a no-op where they already are).
        replicated = _place((params, state, opt_state), mesh, P())
        return mapped(*replicated, _place(batch, mesh, batch_spec))

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


@functools.partial(
    jax.jit, static_argnames=("model", "optimizer", "batch_size", "num_steps", "mesh")
)
def _train_loop(ts, x, labels, *, model, optimizer, batch_size, num_steps, mesh):
    check_batch_size(batch_size, x.shape[0])
    if mesh is None:
        axes, local_size = None, batch_size
        train_step = _local_train_step(model, optimizer, None)
    else:
        _check_mesh(mesh, batch_size)
        axes, local_size = _mesh_axes(mesh), batch_size // mesh.size
        train_step = _local_train_step(dataclasses.replace(model, axis_name=axes), optimizer, axes)

    num_examples = x.shape[0]
    steps_per_epoch = num_examples // batch_size
    # The epochs this call spans (static bound); their orders are drawn once, not
    # one permutation per step. batch_indices gives the same batches step by step.
    num_epochs = num_steps // steps_per_epoch + 2
    precompute = num_epochs * num_examples <= MAX_PRECOMPUTED_INDICES

    def loop(ts, x, labels):
        first_epoch = ts.step // steps_per_epoch
        if precompute:
            orders = jax.vmap(lambda e: epoch_order(ts.key, e, num_examples=num_examples))(
                first_epoch + jnp.arange(num_epochs)
            )

        def body(ts, _):
            # The global batch of this step, the same with or without a mesh; with
            # one, each device gathers its own contiguous slice of it (the slice
            # that P(axes) would give it).
            if precompute:
                epoch, within = jnp.divmod(ts.step, steps_per_epoch)
                idx = lax.dynamic_slice_in_dim(
                    orders[epoch - first_epoch], within * batch_size, batch_size
                )
            else:
                idx = batch_indices(
                    ts.key, ts.step, num_examples=num_examples, batch_size=batch_size
                )
            if axes is not None:
                idx = lax.dynamic_slice_in_dim(idx, lax.axis_index(axes) * local_size, local_size)
            params, state, opt_state, metrics = train_step(
                ts.params, ts.state, ts.opt_state, (x[idx], labels[idx])
            )
            return TrainState(params, state, opt_state, ts.key, ts.step + 1), metrics

        return lax.scan(body, ts, None, length=num_steps)

    if mesh is None:
        return loop(ts, x, labels)
    # The examples are replicated; the whole scan runs per device.
    mapped = jax.shard_map(loop, mesh=mesh, in_specs=P(), out_specs=P())
    return mapped(*_place((ts, x, labels), mesh, P()))


def make_train_loop(
    model: MLP,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Returns ``run(train_state, x, labels, num_steps) -> (train_state, metrics)``, jitted.

    ``run`` takes ``num_steps`` (static) training steps in one ``lax.scan``; step
    ``t`` trains on ``x[batch_indices(key, t)]``, drawn on the device. The metrics
    are stacked: ``metrics["loss"]`` is ``[num_steps]``. The model, the optimizer
    and the sizes are static: one compilation per distinct ``num_steps``, shared
    by every loop made with the same (equal) model and the same optimizer object.

    With a ``mesh`` the steps are data-parallel (see :func:`make_train_step`):
    ``x``, ``labels`` and the train state are replicated over the mesh, every
    device draws the same global batch and trains on its own slice of it, and
    the result is that of the loop without a mesh. The returned train state is
    replicated over the mesh.

    Args:
        model: the network config.
        optimizer: any optax gradient transformation.
        batch_size: examples per step (the global batch).
        mesh: a :class:`jax.sharding.Mesh` to run data-parallel on, or ``None``.

    Returns:
        The jitted ``run`` function.

    Raises:
        ValueError: if ``batch_size`` is not divisible by ``mesh.size``.

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
    if mesh is not None:
        _check_mesh(mesh, batch_size)
        replicated = NamedSharding(mesh, P())

    def run(ts: TrainState, x: ArrayLike, labels: ArrayLike, num_steps: int):
        """Takes ``num_steps`` steps from ``ts`` on ``(x, labels)`` in one dispatch."""
        args = (ts, jnp.asarray(x), jnp.asarray(labels))
        if mesh is not None:
            args = jax.device_put(args, replicated)
        return _train_loop(
            *args,
            model=model,
            optimizer=optimizer,
            batch_size=batch_size,
            num_steps=num_steps,
            mesh=mesh,
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
    mesh: Mesh | None = None,
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
        mesh: a :class:`jax.sharding.Mesh` to train data-parallel on (see
            :func:`make_train_loop`), or ``None`` for one device. The result is
            that of one device (to float32 rounding), so a checkpoint written
            with one device count resumes with another.

    Returns:
        The final :class:`TrainState`.

    Raises:
        TrainingDiverged: on the first non-finite loss (or non-finite state);
            no checkpoint is written past the last good one.
        FileNotFoundError: if ``resume`` and there is no checkpoint.
        jaxbn.checkpoint.CheckpointError: if the checkpoint is corrupt or does
            not match ``model``, ``optimizer`` or ``config``.
        ValueError: for bad ``steps``, ``chunk_size``, ``checkpoint_every`` or
            ``batch_size`` (or one not divisible by ``mesh.size``).
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
    if mesh is not None:
        _check_mesh(mesh, batch_size)
        x, labels = jax.device_put((x, labels), NamedSharding(mesh, P()))

    ts = init_train_state(model, optimizer, key)
    if resume:
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(
                f"resume requested but there is no checkpoint at {os.fspath(checkpoint_path)!r}"
            )
        ts, _ = load_checkpoint(checkpoint_path, ts, config=config)
    run = make_train_loop(model, optimizer, batch_size=batch_size, mesh=mesh)

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

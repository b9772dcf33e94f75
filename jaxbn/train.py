"""Training any model of the ``init``/``apply`` protocol: the step, evaluation, the loop.

A model is anything with the two methods of :class:`Model` (``jaxbn.MLP``,
``jaxbn.CNN``, or your own frozen dataclass). The recipe, in full (this is
:func:`make_train_step`)::

    def loss_fn(params, state, x, labels):
        logits, new_state = model.apply(params, state, x, training=True)
        return cross_entropy(logits, labels), (new_state, logits)

    (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, x, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

The optimizer sees only ``params``; the running statistics of batch norm come out
of the forward pass through ``has_aux`` and replace the old ``state``.

:func:`make_train_loop` takes many such steps per call, every batch drawn on the
device from a PRNG key and the step number (:func:`jaxbn.data.batch_indices`), so
the host is not in the loop and a run is a deterministic function of its key. By
default the steps are compiled into one ``lax.scan`` (one dispatch per call);
``scan=False`` runs the same steps, on the same batches, as one jitted step per
dispatch, for models whose compiled step is slower inside a loop (XLA:CPU picks
slower convolution gradients inside ``lax.scan``). :func:`fit` runs the loop in
chunks with checkpoints (:mod:`jaxbn.checkpoint`), exact resume and the divergence
guard (:class:`TrainingDiverged`).

Data-parallel training: give any of :func:`make_train_step`,
:func:`make_train_loop` or :func:`fit` a ``mesh``
(:func:`jaxbn.parallel.data_mesh`, re-exported here, builds one over the first
``n`` devices). The step then runs under ``jax.shard_map``: every global batch is
split over the mesh's devices along its first axis, params, running statistics
and optimizer state are replicated, batch norm's statistics are all-reduced (the
model is used with ``axis_name`` set to the mesh's axes), and the loss is the mean
over the global batch (``lax.pmean`` of the per-device means), so its gradient,
and the whole step, is that of single-device training on the same global batch.
The loop draws the same global batches as without a mesh and runs this step on
them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn import _checks, checkpoint, distributed
from jaxbn._checks import AxisName
from jaxbn.data import batch_indices, check_batch_size, epoch_order
from jaxbn.parallel import data_mesh, mesh_axes
from jaxbn.stats import check_model, precise_stats_from_data

__all__ = [
    "Model",
    "TrainState",
    "TrainingDiverged",
    "check_labels",
    "cross_entropy",
    "data_mesh",
    "evaluate",
    "fit",
    "init_train_state",
    "make_train_loop",
    "make_train_step",
]

#: With ``precompute_orders=None`` the scan loop draws the orders of the epochs
#: it spans up front when they hold at most this many indices (64 MiB of int32).
_MAX_PRECOMPUTED_INDICES = 1 << 24

Batch = tuple[jax.Array, jax.Array]
Metrics = dict[str, jax.Array]


@runtime_checkable
class Model(Protocol):
    """What the training code needs of a model: a hashable config with two methods.

    ``init(key) -> (params, state)`` creates the params (what the optimizer
    trains) and the state (e.g. batch norm's running statistics), both pytrees
    of arrays; ``apply(params, state, x, *, training) -> (logits, new_state)``
    maps ``x: [batch, ...]`` to ``logits: [batch, classes]`` and returns the
    state to keep (the given one when ``training=False``). The model object must
    be hashable (it is a static argument of ``jax.jit``): a frozen dataclass of
    Python scalars and tuples, like :class:`jaxbn.MLP`. Data-parallel training on
    a mesh also needs an ``axis_name`` dataclass field, which it sets with
    ``dataclasses.replace(model, axis_name=...)`` to synchronize batch norm.

    Attributes:
        axis_name: needed only to train on a mesh: the dataclass field that batch
            norm synchronizes over (set by the training code). Everything else in a
            model's configuration is its own.
    """

    def init(self, key: jax.Array) -> tuple[Any, Any]:
        """Creates the model's variables.

        Args:
            key: a ``jax.random.key`` for the initialization.

        Returns:
            ``(params, state)``: the trainable params and the state, pytrees of arrays.
        """
        ...

    def apply(
        self, params: Any, state: Any, x: jax.Array, *, training: bool
    ) -> tuple[jax.Array, Any]:
        """Runs the model.

        Args:
            params: as from :meth:`init` (or trained).
            state: as from :meth:`init` (or returned by an earlier call).
            x: ``[batch, ...]`` inputs.
            training: batch statistics and a new state (``True``), or the running
                statistics and the state unchanged (``False``).

        Returns:
            ``(logits, new_state)`` with ``logits: [batch, classes]``.
        """
        ...


def _check_model(model: Any) -> None:
    if not isinstance(model, Model):
        raise TypeError(
            f"model must have init(key) -> (params, state) and apply(params, state, x, *, "
            f"training) -> (logits, state) (see jaxbn.train.Model), got {type(model).__name__}"
        )
    try:
        hash(model)
    except TypeError:
        raise TypeError(
            f"model must be hashable (a frozen dataclass of Python values), got an "
            f"unhashable {type(model).__name__}"
        ) from None


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


def check_labels(labels: Any, num_examples: int, *, num_classes: int | None = None) -> None:
    """Raises unless ``labels`` are ``num_examples`` integer class indices.

    The shape and dtype are checked always (also while tracing); the values,
    ``0 <= label < num_classes``, where ``labels`` is concrete and
    ``num_classes`` is given. Batches index ``labels`` with the same indices as
    ``x``, and JAX clamps an index out of range without a word: a shorter
    ``labels`` would train on wrong pairs, a label out of range on a wrong class.

    Args:
        labels: the labels to check.
        num_examples: the number of examples (``x.shape[0]``).
        num_classes: the number of classes (the model's logits), or ``None``.

    Raises:
        TypeError: if ``labels`` are not integers.
        ValueError: if ``labels`` is not ``[num_examples]`` or holds a value
            outside ``[0, num_classes)``.

    Examples:
        >>> import numpy as np
        >>> check_labels(np.array([0, 2, 1]), 3, num_classes=3)
        >>> check_labels(np.array([0, 3, 1]), 3, num_classes=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices in [0, 3) (the model has 3 classes), ...
    """
    shape, dtype = np.shape(labels), jnp.result_type(labels)
    if shape != (num_examples,):
        raise ValueError(
            f"labels must have shape ({num_examples},), one label per example of x, got {shape}"
        )
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got dtype {dtype}")
    if num_classes is None or isinstance(labels, jax.core.Tracer) or num_examples == 0:
        return
    values = np.asarray(labels)
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"labels must be class indices in [0, {num_classes}) (the model has "
            f"{num_classes} classes), got values from {low} to {high}"
        )


@functools.partial(jax.jit, static_argnums=0)
def _logits(model: Model, params: Any, state: Any, x: jax.Array) -> jax.Array:
    return model.apply(params, state, x, training=False)[0]


def _num_classes(model: Model, params: Any, state: Any, x: Any) -> int:
    """The size of the last axis of ``model``'s logits for examples shaped like ``x``'s.

    Traced only, and once per model and shapes (the trace is cached by ``jax.jit``).
    """
    return int(_logits.eval_shape(model, params, state, x).shape[-1])


def _accuracy(logits, labels):
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


def init_train_state(
    model: Model, optimizer: optax.GradientTransformation, key: jax.Array
) -> TrainState:
    """A fresh :class:`TrainState`: the key is split into an init key and a data key.

    Args:
        model: the network config (see :class:`Model`).
        optimizer: any optax gradient transformation.
        key: a ``jax.random.key``.

    Returns:
        A :class:`TrainState` at step 0.
    """
    _check_model(model)
    init_key, data_key = jax.random.split(key)
    params, state = model.init(init_key)
    return TrainState(params, state, optimizer.init(params), data_key, jnp.zeros((), jnp.int32))


# --- data parallelism: the mesh as the step and the loop use it -------------------


def _check_mesh(mesh: Any, batch_size: int) -> None:
    """Raises unless ``mesh`` is a mesh whose size divides ``batch_size``."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the number of devices {mesh.size} "
            f"of the mesh; use a multiple of {mesh.size}"
        )


def _synchronized(model: Any, axis_name: AxisName) -> Any:
    """``model`` with its ``axis_name`` field set, so that batch norm all-reduces its statistics."""
    if not dataclasses.is_dataclass(model) or "axis_name" not in {
        f.name for f in dataclasses.fields(model)
    }:
        raise TypeError(
            f"training on a mesh needs a dataclass model with an axis_name field (it is "
            f"set to the mesh's axes to synchronize batch norm), got {type(model).__name__}"
        )
    return dataclasses.replace(model, axis_name=axis_name)


def _place(tree: Any, mesh: Mesh, spec: P) -> Any:
    """``tree`` laid out as ``NamedSharding(mesh, spec)``, inside or outside ``jit``.

    Needed on a mesh with explicit axes (``jax.make_mesh``'s default), where
    ``shard_map`` requires its inputs' types to match its ``in_specs``; on a mesh
    of automatic axes ``shard_map`` lays its inputs out itself.
    """
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return tree
    return jax.reshard(tree, NamedSharding(mesh, spec))


def _host_key(key: jax.Array) -> jax.Array:
    """This process's own copy of a replicated key (readable in every process)."""
    data = np.asarray(jax.random.key_data(key))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key))


def _replicated(mesh: Mesh, a: Any) -> jax.Array:
    """``a``, which every process holds alike, as one global array replicated over ``mesh``."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        return a  # a global array already: the state of an earlier call
    sharding = NamedSharding(mesh, P())
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
        data = jax.device_put(np.asarray(jax.random.key_data(a)), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    return jax.device_put(np.asarray(a), sharding)


# --- the step and evaluation ------------------------------------------------------


def _local_train_step(model: Model, optimizer, axis_name: AxisName = None):
    """The per-device step: loss and metrics averaged over ``axis_name``."""

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
    model: Model,
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
        model: the network config (see :class:`Model`).
        optimizer: any optax gradient transformation.
        mesh: a :class:`jax.sharding.Mesh` to run data-parallel on (see
            :func:`jaxbn.parallel.data_mesh`), or ``None``.
        axis_name: the named axis to average over when the step runs inside a
            mapped function; not together with ``mesh``.

    Returns:
        ``train_step(params, state, opt_state, (x, labels))`` returning
        ``(params, state, opt_state, metrics)`` with ``metrics = {"loss",
        "accuracy"}`` of the (global) batch, computed before the update. It is
        pure and can be wrapped in ``jax.jit``, ``lax.scan``, etc. With a mesh,
        the batch size must be divisible by ``mesh.size`` (``ValueError``
        while tracing).

    Raises:
        TypeError: if ``model`` does not follow :class:`Model`.

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
    _check_model(model)
    if mesh is None:
        return _local_train_step(model, optimizer, axis_name)
    if axis_name is not None:
        raise ValueError(
            f"give either mesh (the step shards itself) or axis_name (the step runs inside "
            f"your own shard_map), not both; got axis_name={axis_name!r}"
        )
    _check_mesh(mesh, 0)
    axes = mesh_axes(mesh)  # batch norm synchronized over them too
    local = _local_train_step(_synchronized(model, axes), optimizer, axes)
    spec = P(tuple(mesh.axis_names))
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), spec), out_specs=P())

    def train_step(params, state, opt_state, batch):
        """One data-parallel step on the global ``batch = (x, labels)``."""
        _check_mesh(mesh, int(jnp.shape(batch[0])[0]))
        replicated = _place((params, state, opt_state), mesh, P())
        return mapped(*replicated, _place(batch, mesh, spec))

    return train_step


@functools.partial(jax.jit, static_argnums=0)
def _evaluate(model, params, state, x, labels):
    logits, _ = model.apply(params, state, x, training=False)
    return {"loss": cross_entropy(logits, labels), "accuracy": _accuracy(logits, labels)}


def evaluate(model: Model, params: Any, state: Any, x: ArrayLike, labels: ArrayLike) -> Metrics:
    """Loss and accuracy of the network in inference mode (running statistics).

    Args:
        model: the network config (see :class:`Model`).
        params: the params.
        state: the running statistics (used, not changed).
        x: ``[n, ...]`` examples, as ``model.apply`` takes them.
        labels: ``[n]`` integer labels.

    Returns:
        ``{"loss": scalar, "accuracy": scalar}`` (JAX arrays).

    Raises:
        TypeError, ValueError: if ``labels`` are not ``[n]`` integers in
            ``[0, classes)`` (:func:`check_labels`).
    """
    _check_model(model)
    x = jnp.asarray(x)
    check_labels(labels, x.shape[0], num_classes=_num_classes(model, params, state, x))
    return _evaluate(model, params, state, x, jnp.asarray(labels))


# --- the loop ------------------------------------------------------------------------


class _Loop(NamedTuple):
    """What a compiled loop depends on: the training, and how its batches arrive.

    ``batches`` is ``"orders"`` (the orders of the epochs the call spans, drawn up
    front), ``"draw"`` (one permutation per step: :func:`jaxbn.data.batch_indices`)
    or ``"fed"`` (the stacked global batches are the loop's input).
    ``num_steps=None`` is one step outside any ``lax.scan``.
    """

    model: Any
    optimizer: Any
    batch_size: int
    mesh: Mesh | None
    batches: str = "draw"
    num_steps: int | None = None


@functools.partial(jax.jit, static_argnames="loop")
def _run_loop(ts: TrainState, x, labels, *, loop: _Loop) -> tuple[TrainState, Metrics]:
    """The training loop's one driver: ``loop.num_steps`` steps from ``ts``, metrics stacked.

    ``x, labels`` are the examples the global batches are drawn from on the device
    (``batches="fed"``: the stacked batches ``[steps, batch, ...]`` themselves). On a
    mesh each step is :func:`make_train_step`'s data-parallel step on the global batch,
    which splits the batch over the devices.
    """
    if loop.mesh is None:
        train_step = _local_train_step(loop.model, loop.optimizer)
    else:
        train_step = make_train_step(loop.model, loop.optimizer, mesh=loop.mesh)
        ts = _place(ts, loop.mesh, P())

    def step(ts, batch):
        params, state, opt_state, metrics = train_step(ts.params, ts.state, ts.opt_state, batch)
        return TrainState(params, state, opt_state, ts.key, ts.step + 1), metrics

    if loop.batches == "fed":
        return lax.scan(step, ts, (x, labels))
    num_examples, size = x.shape[0], loop.batch_size
    steps_per_epoch = num_examples // size
    if loop.batches == "orders":  # one permutation per epoch, not one per step
        first_epoch = ts.step // steps_per_epoch
        epochs = first_epoch + jnp.arange(loop.num_steps // steps_per_epoch + 2)
        orders = jax.vmap(lambda e: epoch_order(ts.key, e, num_examples=num_examples))(epochs)

    def drawn_step(ts, _):
        # The batch of jaxbn.data.batch_indices, from the epoch's order.
        epoch, within = jnp.divmod(ts.step, steps_per_epoch)
        if loop.batches == "orders":
            order = orders[epoch - first_epoch]
        else:
            order = epoch_order(ts.key, epoch, num_examples=num_examples)
        idx = lax.dynamic_slice_in_dim(order, within * size, size)
        return step(ts, (x[idx], labels[idx]))

    if loop.num_steps is None:
        ts, metrics = drawn_step(ts, None)
        return ts, jax.tree.map(lambda m: m[None], metrics)
    return lax.scan(drawn_step, ts, None, length=loop.num_steps)


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def _step_indices(key, steps, *, num_examples: int, batch_size: int):
    return jax.vmap(
        lambda t: batch_indices(key, t, num_examples=num_examples, batch_size=batch_size)
    )(steps)


def _fed(loop: _Loop, ts: TrainState, x, labels, num_steps: int):
    """The loop on a mesh over several processes, each feeding its own rows.

    Every process holds ``x`` and ``labels`` on the host and draws the same global
    batches as the loop on one process (:func:`jaxbn.data.batch_indices`); only its
    own rows of them go to its devices (:func:`jaxbn.distributed.global_batches`).
    """
    start = int(np.asarray(ts.step))  # replicated: every process reads it locally
    idx = _step_indices(
        _host_key(ts.key),
        jnp.arange(start, start + num_steps),
        num_examples=x.shape[0],
        batch_size=loop.batch_size,
    )
    xs, ys = distributed.global_batches(loop.mesh, np.asarray(idx), x, labels)
    ts = jax.tree.map(functools.partial(_replicated, loop.mesh), ts)
    return _run_loop(ts, xs, ys, loop=loop._replace(batches="fed", num_steps=num_steps))


def make_train_loop(
    model: Model,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    mesh: Mesh | None = None,
    scan: bool = True,
    precompute_orders: bool | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """Returns ``run(train_state, x, labels, num_steps) -> (train_state, metrics)``.

    ``run`` takes ``num_steps`` training steps; step ``t`` trains on
    ``x[batch_indices(key, t)]``, drawn on the device. The metrics are stacked:
    ``metrics["loss"]`` is ``[num_steps]``. Two ways to run the same steps:

    - ``scan=True`` (default): one ``lax.scan`` of ``num_steps`` steps, one
      dispatch per call, compiled once per distinct ``num_steps`` (shared by
      every loop made with an equal model and the same optimizer object);
    - ``scan=False``: one jitted step per dispatch (compiled once), the batch
      drawn inside it. Same batches, same results to float32 rounding; for models
      whose step XLA compiles to slower code inside a loop (convolution
      gradients on the CPU).

    With a ``mesh`` the steps are data-parallel (see :func:`make_train_step`):
    ``x``, ``labels`` and the train state are replicated over the mesh, every
    device draws the same global batch and trains on its own slice of it, and
    the result is that of the loop without a mesh. The returned train state is
    replicated over the mesh.

    With a mesh over the devices of several processes (after
    :func:`jaxbn.distributed.initialize`), every process calls ``run`` with the
    same host arrays ``x`` and ``labels``; they stay on the host, the global
    batches of the call are drawn there (the same batches as above) and each
    process puts only its own rows of them on its devices, as one stacked
    ``lax.scan`` input (``scan`` is then always used).

    Args:
        model: the network config (see :class:`Model`).
        optimizer: any optax gradient transformation.
        batch_size: examples per step (the global batch).
        mesh: a :class:`jax.sharding.Mesh` to run data-parallel on, or ``None``.
        scan: compile the steps of a call into one ``lax.scan`` (else one
            jitted step per dispatch).
        precompute_orders: with ``scan``, draw the orders of the epochs a call
            spans once, up front (``True``), or one permutation per step
            (``False``); ``None`` chooses up front when those orders hold at
            most ``2**24`` indices. The batches are the same either way.

    Returns:
        The ``run`` function.

    Raises:
        TypeError: if ``model`` does not follow :class:`Model`.
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
    _check_model(model)
    if precompute_orders is not None:
        _checks.check_bool("precompute_orders", precompute_orders)
    if mesh is not None:
        _check_mesh(mesh, batch_size)
    loop = _Loop(model, optimizer, batch_size, mesh)

    def run(ts: TrainState, x: ArrayLike, labels: ArrayLike, num_steps: int):
        """Takes ``num_steps`` steps from ``ts`` on ``(x, labels)``."""
        _checks.check_positive_int("num_steps", num_steps, minimum=0)
        num_examples = np.shape(x)[0]
        check_labels(labels, num_examples)  # shape and dtype: every path below
        check_batch_size(batch_size, num_examples)
        if mesh is not None and mesh.is_multi_process:
            return _fed(loop, ts, np.asarray(x), np.asarray(labels), num_steps)
        args = (ts, jnp.asarray(x), jnp.asarray(labels))
        if mesh is not None:
            args = jax.device_put(args, NamedSharding(mesh, P()))
        if not scan and num_steps:
            return _step_by_step(*args, loop=loop, num_steps=num_steps)
        precompute = precompute_orders
        if precompute is None:
            num_epochs = num_steps // (num_examples // batch_size) + 2
            precompute = num_epochs * num_examples <= _MAX_PRECOMPUTED_INDICES
        batches = "orders" if precompute else "draw"
        return _run_loop(*args, loop=loop._replace(batches=batches, num_steps=num_steps))

    return run


def _step_by_step(ts, x, labels, *, loop: _Loop, num_steps: int):
    """``num_steps`` dispatches of one jitted step each, metrics stacked like the scan's."""
    metrics = []
    for _ in range(num_steps):
        ts, m = _run_loop(ts, x, labels, loop=loop)
        metrics.append(m)
    return ts, jax.tree.map(lambda *ms: jnp.concatenate(ms), *metrics)


# --- fit: the whole run, in chunks, with checkpoints ----------------------------------


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


def fit(
    model: Model,
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
    overwrite: bool = False,
    config: dict | None = None,
    callback: Callable[[TrainState, dict[str, Any]], None] | None = None,
    checkpoint_metadata: Callable[[], dict] | None = None,
    on_checkpoint: Callable[[int, float], None] | None = None,
    mesh: Mesh | None = None,
    scan: bool = True,
    precompute_orders: bool | None = None,
    precise_stats_batches: int = 0,
) -> TrainState:
    """Trains for ``steps`` steps in chunks; checks, checkpoints and resumes.

    Chunks end every ``chunk_size`` steps, at every multiple of
    ``checkpoint_every`` and at ``steps``. After each chunk the losses are read
    (one device sync per chunk) and the losses, params, state and optimizer state
    are checked for finiteness, ``callback`` is called, and at a checkpoint step
    the state is saved.

    Args:
        model: the network config (see :class:`Model`).
        optimizer: any optax gradient transformation.
        x: ``[n, ...]`` training examples (moved to the device once).
        labels: ``[n]`` integer labels.
        steps: total number of steps of the run (counting steps before a resume).
        batch_size: examples per step, ``<= n``.
        key: the run's ``jax.random.key`` (initialization and batches).
        chunk_size: steps per call of the loop (one ``lax.scan`` dispatch).
        checkpoint_path: ``.npz`` file to save to (and resume from), or ``None``.
            Its directory must exist.
        checkpoint_every: save every this many steps (0: only at the end).
        resume: continue from ``checkpoint_path``, which must exist and be of
            the same run (see :func:`jaxbn.checkpoint.run_config` for what is compared).
        overwrite: replace an existing checkpoint at ``checkpoint_path`` with
            this new run (without it, an existing checkpoint is an error).
        config: JSON-able dict stored in the checkpoint and required to match on
            resume (e.g. the optimizer's hyperparameters that the optimizer
            state does not expose).
        callback: ``callback(train_state, chunk)`` after each chunk; ``chunk``
            maps ``"step"`` (the 0-based step numbers), ``"loss"`` and
            ``"accuracy"`` to NumPy arrays, and ``"seconds"`` to the chunk's
            wall time from dispatch to the checked results (it includes the
            compilation of the first call of each chunk length).
        checkpoint_metadata: returns a JSON-able dict saved with each checkpoint.
        on_checkpoint: ``on_checkpoint(step, seconds)`` after each checkpoint is
            written, with the time the write took.
        mesh: a :class:`jax.sharding.Mesh` to train data-parallel on (see
            :func:`make_train_loop`), or ``None`` for one device. The
            result is that of one device (to float32 rounding), so a checkpoint
            written with one device count resumes with another.
        scan: run each chunk as one ``lax.scan`` (default), or as one jitted
            step per dispatch (same batches and results; see
            :func:`make_train_loop`).
        precompute_orders: passed to :func:`make_train_loop`.
        precise_stats_batches: after the last step, replace the running
            statistics of the returned state with population statistics over this
            many training batches (:func:`jaxbn.stats.precise_stats_from_data`);
            0 keeps the running averages. Checkpoints keep the running averages,
            so a resumed run continues training exactly as before.

    Returns:
        The final :class:`TrainState`.

    Raises:
        TrainingDiverged: on the first non-finite loss, or non-finite params or
            state at the end of a chunk; no checkpoint is written past the last
            good one.
        FileExistsError: if ``checkpoint_path`` exists and neither ``resume``
            nor ``overwrite`` is set.
        FileNotFoundError: if ``resume`` and there is no checkpoint, or the
            checkpoint's directory does not exist.
        OSError: if checkpoints cannot be written there (permissions, too little
            free space), found before training; or if a write fails later (the
            previous checkpoint is left intact).
        jaxbn.checkpoint.CheckpointError: if the checkpoint is corrupt, modified,
            or not of this run (model, batch size, key, data, optimizer or
            ``config`` differ; the message names each difference).
        ValueError: for bad ``steps``, ``chunk_size``, ``checkpoint_every`` or
            ``batch_size`` (or one not divisible by ``mesh.size``), ``steps``
            below a resumed checkpoint's step, an optimizer whose learning
            rate is non-finite, or negative where the optimizer state exposes
            it (an update that goes uphill gets a warning), ``labels`` that are
            not ``[n]`` class indices
            of the model (:func:`check_labels`), non-finite ``x``,
            or ``precise_stats_batches`` for a model without batch norm.
        TypeError: for integer-less ``labels``; a ``config`` or
            ``checkpoint_metadata()`` that is not JSON-able, or a model field
            that cannot be recorded in a checkpoint (a default ``repr`` with a
            memory address), all found before training.
    """
    counts = {
        "steps": steps,
        "checkpoint_every": checkpoint_every,
        "precise_stats_batches": precise_stats_batches,
    }
    _check_fit_args(counts, chunk_size, checkpoint_path, resume, overwrite, config)
    x, labels = _checked_data(x, labels, batch_size=batch_size, mesh=mesh)
    ts = init_train_state(model, optimizer, key)
    _check_run(model, optimizer, ts, x, labels, precise_stats_batches)
    save = None
    if checkpoint_path is not None:
        path = os.fspath(checkpoint_path)
        if checkpoint_metadata is not None:
            checkpoint.check_json("checkpoint_metadata()", checkpoint_metadata())
        expected = checkpoint.run_config(
            model, ts.opt_state, x, labels, batch_size=batch_size, key=key, config=config
        )
        ts = checkpoint.start_run(
            path, ts, expected, steps=steps, resume=resume, overwrite=overwrite
        )
        save = functools.partial(
            _save, path, expected, metadata=checkpoint_metadata, on_checkpoint=on_checkpoint
        )
    run = make_train_loop(
        model,
        optimizer,
        batch_size=batch_size,
        mesh=mesh,
        scan=scan,
        precompute_orders=precompute_orders,
    )
    for n in _chunk_lengths(int(ts.step), steps, chunk_size, checkpoint_every):
        ts, chunk = _run_chunk(run, ts, x, labels, n)
        if callback is not None:
            callback(ts, chunk)
        step = int(ts.step)
        if save is not None and (
            step == steps or (checkpoint_every and step % checkpoint_every == 0)
        ):
            save(ts)
    if precise_stats_batches:
        ts = _with_precise_stats(model, ts, x, mesh, batch_size, precise_stats_batches)
    return ts


def _check_fit_args(counts: dict, chunk_size, checkpoint_path, resume, overwrite, config):
    """Checks ``fit``'s counts (``counts``: name to value, each an int >= 0) and flags."""
    for name, count in counts.items():
        _checks.check_positive_int(name, count, minimum=0)
    _checks.check_positive_int("chunk_size", chunk_size)
    for flag, given in (("resume", resume), ("overwrite", overwrite)):
        if given and checkpoint_path is None:
            raise ValueError(f"{flag}=True needs a checkpoint_path, got None")
    if config is not None:
        checkpoint.check_json("config", config)


def _checked_data(x, labels, *, batch_size: int, mesh: Mesh | None):
    """Checks the batch size and mesh; returns the data where the loop reads it."""
    check_batch_size(batch_size, np.shape(x)[0])
    if mesh is None:
        return jnp.asarray(x), jnp.asarray(labels)
    _check_mesh(mesh, batch_size)
    if mesh.is_multi_process:
        # Several processes: the examples stay on the host; each process feeds its
        # own rows of every batch (make_train_loop).
        return np.asarray(x), np.asarray(labels)
    return jax.device_put((jnp.asarray(x), jnp.asarray(labels)), NamedSharding(mesh, P()))


def _check_run(model: Model, optimizer, ts: TrainState, x, labels, precise_stats_batches: int):
    """Refuses bad labels, non-finite ``x``, a model ``precise_stats`` cannot update."""
    check_labels(labels, np.shape(x)[0], num_classes=_num_classes(model, ts.params, ts.state, x))
    finite = np.isfinite(x).all() if isinstance(x, np.ndarray) else _all_finite(x)
    if not finite:
        raise ValueError("x must be finite: it holds NaN or infinity")
    _check_optimizer(optimizer, ts)
    if precise_stats_batches:
        try:
            check_model(model, ts.state)
        except (TypeError, ValueError) as err:
            raise type(err)(f"precise_stats_batches={precise_stats_batches}: {err}") from None


def _check_optimizer(optimizer: optax.GradientTransformation, ts: TrainState) -> None:
    """Refuses an optimizer that cannot train: non-finite or negative learning rate.

    Every hyperparameter the state exposes (:func:`jaxbn.checkpoint.optimizer_hyperparams`)
    is finite and a learning rate is not negative; and the first update for a
    gradient of ones is finite (this finds a NaN or inf learning rate hidden in
    a closure, as in ``optax.sgd(nan)``). An update that goes uphill (a negative
    learning rate hidden in a closure, as in ``optax.sgd(-0.1)``) gets a
    warning, not an error: some optimizers ascend by design (the first step of
    sharpness-aware minimization). A schedule that starts at 0 makes a zero
    update, which passes.
    """
    for name, value in checkpoint.optimizer_hyperparams(ts.opt_state).items():
        if not math.isfinite(value):
            raise ValueError(f"the optimizer's hyperparameter {name} must be finite, got {value}")
        if name.split("/")[-1] == "learning_rate" and value < 0:
            raise ValueError(f"the optimizer's learning_rate must be >= 0, got {value}")
    grads = jax.tree.map(jnp.ones_like, ts.params)
    updates, _ = optimizer.update(grads, ts.opt_state, ts.params)
    if not _all_finite(updates):
        raise ValueError(
            "the optimizer's first update is not finite for a gradient of ones: a "
            "hyperparameter (the learning rate?) is NaN or inf"
        )
    uphill = float(optax.tree_utils.tree_vdot(updates, grads))
    if uphill > 0:
        warnings.warn(
            f"the optimizer's first update for a gradient of ones goes uphill (sum of "
            f"update * gradient = {uphill:.3g} > 0): it increases the loss. Is its "
            f"learning rate negative? (An optimizer that ascends by design, as "
            f"sharpness-aware minimization's first step does, can ignore this.)",
            UserWarning,
            stacklevel=4,
        )


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Every floating leaf of ``tree`` finite (a bool scalar: one device sync to read)."""
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _chunk_lengths(start: int, steps: int, chunk_size: int, checkpoint_every: int) -> Iterator[int]:
    """The lengths of the chunks from ``start`` to ``steps``.

    Every ``chunk_size`` steps, and ending at each multiple of ``checkpoint_every``.
    """
    step = start
    while step < steps:
        n = min(chunk_size, steps - step)
        if checkpoint_every:
            n = min(n, checkpoint_every - step % checkpoint_every)
        yield n
        step += n


def _run_chunk(run, ts: TrainState, x, labels, n: int) -> tuple[TrainState, dict]:
    """``n`` steps from ``ts``; the chunk's metrics read back and checked.

    Raises:
        TrainingDiverged: at the first non-finite loss, or if the params, state
            or optimizer state reached are not finite.
    """
    start = int(ts.step)
    began = time.perf_counter()
    ts, metrics = run(ts, x, labels, n)
    chunk = {k: np.asarray(v) for k, v in metrics.items()}
    bad = ~np.isfinite(chunk["loss"])
    if bad.any():
        first = int(np.argmax(bad))
        raise TrainingDiverged(start + first, chunk["loss"][first])
    if not _all_finite(ts):
        end = start + n
        raise TrainingDiverged(
            end,
            math.nan,
            f"the params or state at the start of step {end} (0-based) are not finite "
            f"and were not checkpointed",
        )
    chunk["step"] = np.arange(start, start + n)
    chunk["seconds"] = time.perf_counter() - began
    return ts, chunk


def _save(path: str, config: dict, ts: TrainState, *, metadata, on_checkpoint) -> None:
    """Saves ``ts`` from process 0 alone; every process waits for the write."""
    began = time.perf_counter()
    meta = None if metadata is None else metadata()
    if distributed.is_main_process():
        checkpoint.save_checkpoint(path, ts, step=int(ts.step), config=config, metadata=meta)
    if jax.process_count() > 1:  # nobody runs ahead of a checkpoint being written
        multihost_utils.sync_global_devices(f"jaxbn checkpoint {int(ts.step)}")
    if on_checkpoint is not None:
        on_checkpoint(int(ts.step), time.perf_counter() - began)


def _with_precise_stats(model, ts, x, mesh, batch_size, num_batches):
    """``ts`` with population statistics over ``num_batches`` training batches."""
    params, state, data_key = ts.params, ts.state, ts.key
    if mesh is not None and mesh.is_multi_process:  # replicated: each process's copy
        params, state = jax.device_get((params, state))
        data_key = _host_key(data_key)
    state = precise_stats_from_data(
        model, params, state, x, batch_size=batch_size, num_batches=num_batches, key=data_key
    )
    return ts._replace(state=state)

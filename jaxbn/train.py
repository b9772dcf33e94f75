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
slower convolution gradients inside ``lax.scan``). :func:`jaxbn.fit.fit` runs the
loop in chunks with checkpoints, resume and the divergence guard; it is
re-exported here as ``jaxbn.train.fit``, with :class:`jaxbn.fit.TrainingDiverged`.

Data-parallel training: give any of :func:`make_train_step`,
:func:`make_train_loop` or :func:`jaxbn.fit.fit` a ``mesh``
(:func:`jaxbn.parallel.data_mesh`, re-exported here, builds one over the first
``n`` devices). The step then runs under ``jax.shard_map``: every global batch is
split over the mesh's devices along its first axis, params, running statistics
and optimizer state are replicated, batch norm's statistics are all-reduced (the
model is used with ``axis_name`` set to the mesh's axes), and the loss is the mean
over the global batch (``lax.pmean`` of the per-device means), so its gradient,
and the whole step, is that of single-device training on the same global batch.
The loop draws the same global batches as without a mesh; each device gathers
only its own rows.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn import distributed
from jaxbn._checks import AxisName
from jaxbn.data import batch_indices, check_batch_size, epoch_order
from jaxbn.parallel import batch_spec, check_mesh, data_mesh, mesh_axes, place, synchronized

if TYPE_CHECKING:  # re-exported lazily, see __getattr__ at the end
    from jaxbn.fit import TrainingDiverged, fit

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
    "num_classes",
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


def num_classes(model: Model, params: Any, state: Any, x: Any) -> int:
    """The size of the last axis of ``model``'s logits for examples shaped like ``x``'s.

    Traced only (``jax.eval_shape``), once per model and shapes (it is cached:
    :func:`evaluate` asks on every call).

    Args:
        model: the network config (see :class:`Model`).
        params: its params.
        state: its state.
        x: ``[n, ...]`` examples (only their shape and dtype are used).

    Returns:
        The number of classes.
    """
    # The whole of x's shape: tracing costs nothing, and a model may need its batch.
    leaves, tree = jax.tree.flatten((params, state, x))
    specs = tuple((np.shape(a), jnp.result_type(a)) for a in leaves)
    return _num_classes(model, tree, specs)


@functools.lru_cache(maxsize=64)
def _num_classes(model: Model, tree: Any, specs: tuple) -> int:
    params, state, x = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(*s) for s in specs])
    logits = jax.eval_shape(
        lambda p, s, r: model.apply(p, s, r, training=False)[0], params, state, x
    )
    return int(logits.shape[-1])


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


def _local_train_step(model: Model, optimizer, axis_name: AxisName):
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
    check_mesh(mesh, 0)
    axes = mesh_axes(mesh)
    local = _local_train_step(synchronized(model, axes), optimizer, axes)
    spec = batch_spec(mesh)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), spec), out_specs=P())

    def train_step(params, state, opt_state, batch):
        """One data-parallel step on the global ``batch = (x, labels)``."""
        check_mesh(mesh, int(jnp.shape(batch[0])[0]))
        # Lay the inputs out as shard_map expects (a no-op where they already are).
        replicated = place((params, state, opt_state), mesh, P())
        return mapped(*replicated, place(batch, mesh, spec))

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
    check_labels(labels, x.shape[0], num_classes=num_classes(model, params, state, x))
    return _evaluate(model, params, state, x, jnp.asarray(labels))


class _LoopSpec(NamedTuple):
    """The static description of a loop: what a compiled loop or step depends on."""

    model: Any
    optimizer: Any
    batch_size: int
    mesh: Mesh | None


def _indexed_step(spec: _LoopSpec):
    """``step(ts, x, labels, idx)``: one training step on the global batch ``x[idx]``.

    Inside a ``shard_map`` over the mesh, each device gathers its own contiguous
    slice of the global batch (the slice that ``P(axes)`` would give it).
    """
    if spec.mesh is None:
        axes, local_size = None, spec.batch_size
        train_step = _local_train_step(spec.model, spec.optimizer, None)
    else:
        check_mesh(spec.mesh, spec.batch_size)
        axes, local_size = mesh_axes(spec.mesh), spec.batch_size // spec.mesh.size
        train_step = _local_train_step(synchronized(spec.model, axes), spec.optimizer, axes)

    def step(ts: TrainState, x, labels, idx):
        if axes is not None:
            idx = lax.dynamic_slice_in_dim(idx, lax.axis_index(axes) * local_size, local_size)
        params, state, opt_state, metrics = train_step(
            ts.params, ts.state, ts.opt_state, (x[idx], labels[idx])
        )
        return TrainState(params, state, opt_state, ts.key, ts.step + 1), metrics

    return step


def _on_mesh(loop, spec: _LoopSpec, ts, x, labels):
    """``loop(ts, x, labels)``, per device on the mesh (everything replicated), or as is."""
    if spec.mesh is None:
        return loop(ts, x, labels)
    mapped = jax.shard_map(loop, mesh=spec.mesh, in_specs=P(), out_specs=P())
    return mapped(*place((ts, x, labels), spec.mesh, P()))


@functools.partial(jax.jit, static_argnames=("spec", "num_steps", "precompute"))
def _scan_loop(ts, x, labels, *, spec: _LoopSpec, num_steps: int, precompute: bool):
    check_batch_size(spec.batch_size, x.shape[0])
    step = _indexed_step(spec)
    num_examples = x.shape[0]
    steps_per_epoch = num_examples // spec.batch_size
    # The epochs this call spans (static bound); their orders are drawn once, not
    # one permutation per step. batch_indices gives the same batches step by step.
    num_epochs = num_steps // steps_per_epoch + 2

    def loop(ts, x, labels):
        first_epoch = ts.step // steps_per_epoch
        if precompute:
            orders = jax.vmap(lambda e: epoch_order(ts.key, e, num_examples=num_examples))(
                first_epoch + jnp.arange(num_epochs)
            )

        def body(ts, _):
            if precompute:
                epoch, within = jnp.divmod(ts.step, steps_per_epoch)
                idx = lax.dynamic_slice_in_dim(
                    orders[epoch - first_epoch], within * spec.batch_size, spec.batch_size
                )
            else:
                idx = batch_indices(
                    ts.key, ts.step, num_examples=num_examples, batch_size=spec.batch_size
                )
            return step(ts, x, labels, idx)

        return lax.scan(body, ts, None, length=num_steps)

    return _on_mesh(loop, spec, ts, x, labels)


@functools.partial(jax.jit, static_argnames=("spec",))
def _single_step(ts, x, labels, *, spec: _LoopSpec):
    check_batch_size(spec.batch_size, x.shape[0])
    step = _indexed_step(spec)

    def one(ts, x, labels):
        idx = batch_indices(ts.key, ts.step, num_examples=x.shape[0], batch_size=spec.batch_size)
        return step(ts, x, labels, idx)

    return _on_mesh(one, spec, ts, x, labels)


@functools.partial(jax.jit, static_argnames=("spec",))
def _fed_scan(ts, xs, ys, *, spec: _LoopSpec):
    """The steps of stacked global batches ``xs [steps, batch, ...]``, ``ys [steps, batch]``.

    Each device trains on its own rows of every batch (the batches arrive split over
    the mesh); the rest is replicated.
    """
    axes = mesh_axes(spec.mesh)
    train_step = _local_train_step(synchronized(spec.model, axes), spec.optimizer, axes)

    def loop(ts, xs, ys):
        def body(ts, batch):
            params, state, opt_state, metrics = train_step(ts.params, ts.state, ts.opt_state, batch)
            return TrainState(params, state, opt_state, ts.key, ts.step + 1), metrics

        return lax.scan(body, ts, (xs, ys))

    stacked = P(None, *batch_spec(spec.mesh))
    mapped = jax.shard_map(loop, mesh=spec.mesh, in_specs=(P(), stacked, stacked), out_specs=P())
    return mapped(*place((ts,), spec.mesh, P()), *place((xs, ys), spec.mesh, stacked))


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def _step_indices(key, steps, *, num_examples: int, batch_size: int):
    return jax.vmap(
        lambda t: batch_indices(key, t, num_examples=num_examples, batch_size=batch_size)
    )(steps)


def _process_fed(spec: _LoopSpec, ts: TrainState, x, labels, num_steps: int):
    """The loop over a mesh that spans several processes, each feeding its own rows.

    Every process holds ``x`` and ``labels`` on the host and draws the same global
    batches as the scan loop (:func:`jaxbn.data.batch_indices`); only its own rows
    of them go to its devices (:func:`jaxbn.distributed.global_batches`).
    """
    x, labels = np.asarray(x), np.asarray(labels)
    check_batch_size(spec.batch_size, x.shape[0])
    # The key and the step are replicated: every process reads them locally.
    key_data = np.asarray(jax.random.key_data(ts.key))
    key = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(ts.key))
    start = int(np.asarray(ts.step))
    idx = _step_indices(
        key,
        jnp.arange(start, start + num_steps),
        num_examples=x.shape[0],
        batch_size=spec.batch_size,
    )
    xs, ys = distributed.global_batches(spec.mesh, np.asarray(idx), x, labels)
    # Replicate what this process holds (a fresh or restored state) over the mesh;
    # the state of an earlier call is a global array already.
    replicated = NamedSharding(spec.mesh, P())

    def replicate(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = jax.device_put(np.asarray(jax.random.key_data(a)), replicated)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        return jax.device_put(np.asarray(a), replicated)

    return _fed_scan(jax.tree.map(replicate, ts), xs, ys, spec=spec)


def _check_num_steps(num_steps: Any) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")


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
    if precompute_orders not in (None, True, False):
        raise TypeError(f"precompute_orders must be a bool or None, got {precompute_orders!r}")
    if mesh is not None:
        check_mesh(mesh, batch_size)
    spec = _LoopSpec(model, optimizer, batch_size, mesh)

    def run(ts: TrainState, x: ArrayLike, labels: ArrayLike, num_steps: int):
        """Takes ``num_steps`` steps from ``ts`` on ``(x, labels)``."""
        _check_num_steps(num_steps)
        check_labels(labels, np.shape(x)[0])  # shape and dtype: every path below
        if mesh is not None and mesh.is_multi_process:
            return _process_fed(spec, ts, x, labels, num_steps)
        args = (ts, jnp.asarray(x), jnp.asarray(labels))
        if mesh is not None:
            args = jax.device_put(args, NamedSharding(mesh, P()))
        if scan:
            precompute = precompute_orders
            if precompute is None:
                num_epochs = num_steps // (args[1].shape[0] // batch_size) + 2
                precompute = num_epochs * args[1].shape[0] <= _MAX_PRECOMPUTED_INDICES
            return _scan_loop(*args, spec=spec, num_steps=num_steps, precompute=precompute)
        return _step_by_step(*args, spec=spec, num_steps=num_steps)

    return run


def _step_by_step(ts, x, labels, *, spec: _LoopSpec, num_steps: int):
    """``num_steps`` dispatches of :func:`_single_step`, metrics stacked like the scan's."""
    metrics = []
    for _ in range(num_steps):
        ts, m = _single_step(ts, x, labels, spec=spec)
        metrics.append(m)
    if not metrics:  # the scan's empty stack: the metrics' dtypes, zero steps
        shapes = jax.eval_shape(functools.partial(_single_step, spec=spec), ts, x, labels)[1]
        return ts, jax.tree.map(lambda s: jnp.zeros((0, *s.shape), s.dtype), shapes)
    return ts, jax.tree.map(lambda *ms: jnp.stack(ms), *metrics)


# fit and TrainingDiverged live in jaxbn.fit, which imports this module; they are
# re-exported here on first access (PEP 562), so that jaxbn.train.fit keeps working.
_FROM_FIT = ("TrainingDiverged", "fit")


def __getattr__(name: str) -> Any:
    if name in _FROM_FIT:
        return getattr(importlib.import_module("jaxbn.fit"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_FROM_FIT))

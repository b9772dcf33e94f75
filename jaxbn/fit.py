"""``fit``: a whole training run in chunks, with checkpoints, exact resume and a guard.

:func:`fit` runs the loop of :func:`jaxbn.train.make_train_loop` chunk by chunk.
After every chunk the losses are read (one device sync), the loss of every step
and the params, state and optimizer state reached are checked for finiteness
(:class:`TrainingDiverged` names the first bad step), the caller's callback runs,
and at a checkpoint step the state is saved (:mod:`jaxbn.checkpoint`), from which
``resume=True`` continues to exactly the parameters of an uninterrupted run.

Nothing is lost or silently wrong:

- an existing checkpoint is never replaced by a new run unless ``overwrite=True``;
- a resumed run must be the same run (:func:`run_config` says what is compared);
- a bad optimizer (a NaN learning rate, a negative one the optimizer state exposes) is
  refused before training, one whose first update goes uphill gets a warning;
- a checkpoint that cannot be written (missing or unwritable directory, too
  little free space) is refused before training where that can be known, and a
  write that fails later (a full disk) leaves the previous checkpoint intact.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jaxbn import _checks, distributed
from jaxbn.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from jaxbn.data import check_batch_size
from jaxbn.parallel import check_mesh
from jaxbn.stats import check_model, precise_stats_from_data
from jaxbn.train import (
    Model,
    TrainState,
    check_labels,
    init_train_state,
    make_train_loop,
    num_classes,
)

__all__ = ["TrainingDiverged", "fit", "run_config"]


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


# --- what a resumed run must share with the run it continues -------------------


def _jsonable(value: Any, _seen: frozenset = frozenset()) -> Any:
    """A model field as JSON that is the same in every process that builds the same model.

    Tuples as lists, dtypes by name (``jnp.float32``, ``np.float32`` and
    ``"float32"`` alike), arrays by shape, dtype and a digest of their bytes,
    functions by their qualified name, a digest of their code and what they
    capture (defaults, closure cells, the object of a bound method; a
    ``functools.partial`` with its arguments; jitted and custom-derivative
    functions by the function they wrap), classes by qualified name; anything
    else by its ``repr``, unless that holds a memory address (the default
    ``repr`` of an object), which differs from process to process and so could
    never match on resume: such a field is refused.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if id(value) in _seen:  # a function that refers to itself
        return "<recursive>"
    seen = _seen | {id(value)}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, seen) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, seen) for k, v in value.items()}
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        a = np.ascontiguousarray(np.asarray(value))
        digest = hashlib.sha256(a.tobytes()).hexdigest()[:16]
        return {"array": [list(a.shape), a.dtype.name, digest]}
    dtype = _as_dtype(value)
    if dtype is not None:
        return dtype
    if isinstance(value, functools.partial):
        return {
            "partial": _jsonable(value.func, seen),
            "args": _jsonable(value.args, seen),
            "keywords": _jsonable(value.keywords, seen),
        }
    if isinstance(value, type):
        return {"class": f"{value.__module__}.{value.__qualname__}"}
    if callable(value) and hasattr(value, "__qualname__"):
        return _describe_function(value, seen)
    text = repr(value)
    if " at 0x" in text:
        raise TypeError(
            f"cannot record {text} in a checkpoint: its repr holds a memory address, so "
            f"a resumed run could never match it; give its type a __repr__ of its "
            f"settings, or hold its settings in the model's fields instead"
        )
    return text


def _as_dtype(value: Any) -> str | None:
    """The name of the dtype ``value`` denotes (a dtype or a scalar type), else ``None``."""
    if not isinstance(value, (np.dtype, type)) and not hasattr(value, "dtype"):
        return None
    try:
        dtype = np.dtype(value)
    except TypeError:
        return None
    # A class NumPy does not know becomes the object dtype: not a dtype it names.
    return None if dtype == np.dtype(object) and value is not object else dtype.name


def _describe_function(fun: Any, seen: frozenset) -> dict:
    name = f"{getattr(fun, '__module__', '?')}.{fun.__qualname__}"
    out: dict[str, Any] = {"function": name}
    bound = getattr(fun, "__self__", None)
    if bound is not None and not isinstance(bound, type(functools)):  # a bound method
        out["self"] = _jsonable(bound, seen)
    inner = getattr(fun, "__func__", None) or getattr(fun, "fun", None)  # method, custom_jvp
    inner = inner or getattr(fun, "__wrapped__", None)  # jax.jit, functools.wraps
    if inner is not None and inner is not fun:
        out["wraps"] = _jsonable(inner, seen)
        return out
    code = getattr(fun, "__code__", None)
    if code is not None:
        out["code"] = _code_digest(code)
        out["defaults"] = _jsonable(getattr(fun, "__defaults__", None), seen)
        out["kwdefaults"] = _jsonable(getattr(fun, "__kwdefaults__", None), seen)
        cells = getattr(fun, "__closure__", None) or ()
        out["closure"] = [_jsonable(_cell_contents(c), seen) for c in cells]
    return out


def _code_digest(code) -> str:
    """A digest of a function's bytecode and constants (nested functions included)."""
    digest = hashlib.sha256(code.co_code)
    for const in code.co_consts:
        digest.update((_code_digest(const) if hasattr(const, "co_code") else repr(const)).encode())
    return digest.hexdigest()[:16]


def _cell_contents(cell) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet filled
        return None


def _describe_model(model: Any) -> dict:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if not dataclasses.is_dataclass(model):
        return {"type": kind}
    fields = {}
    for f in dataclasses.fields(model):
        if f.name == "axis_name":  # set by fit itself on a mesh
            continue
        try:
            fields[f.name] = _jsonable(getattr(model, f.name))
        except TypeError as err:
            raise TypeError(f"model field {f.name!r}: {err}") from None
    return {"type": kind, "fields": fields}


def _describe_key(key: jax.Array) -> dict:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(key)), "data": _key_bits(key)}
    return {"impl": "raw", "data": np.asarray(key).ravel().tolist()}


def _key_bits(key: jax.Array) -> list[int]:
    return np.asarray(jax.random.key_data(key)).ravel().tolist()


def _describe_data(x: jax.Array, labels: jax.Array) -> dict:
    digest = hashlib.sha256()
    for a in (x, labels):
        a = np.ascontiguousarray(np.asarray(a))
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(a.tobytes())
    return {
        "x": [list(x.shape), str(x.dtype)],
        "labels": [list(labels.shape), str(labels.dtype)],
        "sha256": digest.hexdigest(),
    }


def _is_injected(node: Any) -> bool:
    """An ``optax.inject_hyperparams`` state (it holds a ``hyperparams`` dict)."""
    return isinstance(node, tuple) and isinstance(getattr(node, "hyperparams", None), dict)


def optimizer_hyperparams(opt_state: Any) -> dict[str, float]:
    """The hyperparameters an optimizer state exposes, by path: ``{"lr path": value}``.

    Only ``optax.inject_hyperparams`` states expose theirs (for a schedule, its
    current value); other optimizers keep their hyperparameters in closures,
    out of reach.

    Args:
        opt_state: an optimizer's state, e.g. ``optimizer.init(params)``.

    Returns:
        A dict from ``"<path in the state>/<name>"`` (``"learning_rate"`` alone
        for a top-level ``inject_hyperparams``) to the value as a Python float.
    """
    found = {}
    nodes = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_injected)[0]
    for path, node in nodes:
        if not _is_injected(node):
            continue
        where = jax.tree_util.keystr(path, simple=True, separator="/")
        for name, value in node.hyperparams.items():
            if np.ndim(value) == 0 and np.issubdtype(np.asarray(value).dtype, np.number):
                found[f"{where}/{name}" if where else name] = float(value)
    return found


def run_config(
    model: Model,
    opt_state: Any,
    x: ArrayLike,
    labels: ArrayLike,
    *,
    batch_size: int,
    key: jax.Array,
    config: dict | None = None,
) -> dict:
    """What a checkpoint of :func:`fit` records and ``resume=True`` requires to match.

    Compared, each by equality:

    - ``model``: the model's type and, for a dataclass, every field except
      ``axis_name`` (e.g. ``MLP``'s sizes, activation, momentum, eps, dtype);
    - ``batch_size``;
    - ``key``: the run's PRNG key (its implementation and bits);
    - ``data``: the training set's shapes, dtypes and a SHA-256 of its values;
    - ``optimizer_hyperparams``: the hyperparameters that the optimizer's fresh
      state exposes (``optax.inject_hyperparams``: every hyperparameter, a
      schedule by its value at step 0);
    - ``config``: the caller's own dict, as given.

    Not compared: the number of devices (``fit`` on a mesh trains the network one
    device trains, so a checkpoint resumes with any device count), ``steps``,
    ``chunk_size``, ``checkpoint_every`` and ``scan`` (they do not change the
    result), and the hyperparameters of an optimizer that hides them in closures
    (``optax.sgd(0.1)``'s learning rate, momentum, nesterov): their structure is
    checked through the optimizer state's tree, their values only through
    ``config`` or ``optax.inject_hyperparams``.

    Args:
        model: the network config.
        opt_state: the optimizer's fresh state (``optimizer.init(params)``).
        x: the training examples.
        labels: the training labels.
        batch_size: examples per step.
        key: the run's key, as given to :func:`fit`.
        config: the caller's JSON-able dict, or ``None``.

    Returns:
        A JSON-able dict.
    """
    return {
        "model": _describe_model(model),
        "batch_size": int(batch_size),
        "key": _describe_key(key),
        "data": _describe_data(jnp.asarray(x), jnp.asarray(labels)),
        "optimizer_hyperparams": optimizer_hyperparams(opt_state),
        "config": {} if config is None else config,
    }


# --- checks before training ------------------------------------------------------


def _check_counts(**counts: tuple[Any, int]) -> None:
    for name, (value, low) in counts.items():
        if not _checks.is_int(value) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_optimizer(optimizer: optax.GradientTransformation, ts: TrainState) -> None:
    """Refuses an optimizer that cannot train: non-finite or negative learning rate.

    Every hyperparameter the state exposes (:func:`optimizer_hyperparams`) is
    finite and a learning rate is not negative; and the first update for a
    gradient of ones is finite (this finds a NaN or inf learning rate hidden in
    a closure, as in ``optax.sgd(nan)``). An update that goes uphill (a negative
    learning rate hidden in a closure, as in ``optax.sgd(-0.1)``) gets a
    warning, not an error: some optimizers ascend by design (the first step of
    sharpness-aware minimization). A schedule that starts at 0 makes a zero
    update, which passes.
    """
    for name, value in optimizer_hyperparams(ts.opt_state).items():
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
    uphill = sum(
        float(jnp.vdot(u.astype(jnp.float32), g.astype(jnp.float32)))
        for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True)
    )
    if uphill > 0:
        warnings.warn(
            f"the optimizer's first update for a gradient of ones goes uphill (sum of "
            f"update * gradient = {uphill:.3g} > 0): it increases the loss. Is its "
            f"learning rate negative? (An optimizer that ascends by design, as "
            f"sharpness-aware minimization's first step does, can ignore this.)",
            UserWarning,
            stacklevel=3,
        )


def _check_data(model: Model, ts: TrainState, x, labels) -> None:
    """Refuses labels that are not one class index per example, and non-finite ``x``."""
    check_labels(labels, np.shape(x)[0], num_classes=num_classes(model, ts.params, ts.state, x))
    finite = np.isfinite(x).all() if isinstance(x, np.ndarray) else _all_finite(x)
    if not finite:
        raise ValueError("x must be finite: it holds NaN or infinity")


def _check_precise_stats(model: Model, state: Any, batches: int) -> None:
    """Refuses ``precise_stats_batches`` for a model it cannot update (no batch norm)."""
    try:
        check_model(model, state)
    except (TypeError, ValueError) as err:
        raise type(err)(f"precise_stats_batches={batches}: {err}") from None


def _check_json(name: str, value: Any) -> None:
    """Refuses a value that cannot be written into a checkpoint (before training)."""
    try:
        json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be JSON-able (dicts, lists, str, int, float, bool, None; no "
            f"NumPy or JAX scalars): {err}"
        ) from None


@jax.jit
def _finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _all_finite(tree) -> bool:
    """Every floating leaf of ``tree`` finite (one device sync)."""
    return bool(_finite(tree))


def _checkpoint_size(ts: TrainState) -> int:
    """Bytes a checkpoint of ``ts`` takes, roughly (the arrays plus the metadata)."""
    arrays = sum(
        np.dtype(leaf.dtype).itemsize * math.prod(leaf.shape)
        for leaf in jax.tree.leaves(ts)
        if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    )
    return arrays + (1 << 20)


def _check_checkpoint_path(path: str, ts: TrainState, *, resume: bool, overwrite: bool) -> None:
    """Everything about ``path`` that can be known before training, or one clear error."""
    if resume and overwrite:
        raise ValueError(
            "resume=True continues the checkpoint, overwrite=True replaces it: not both"
        )
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"the directory of checkpoint_path {path!r} does not exist (or is not a directory): "
            f"create {directory!r} first"
        )
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint_path {path!r} is a directory, expected a file")
    if resume and not os.path.exists(path):
        raise FileNotFoundError(f"resume requested but there is no checkpoint at {path!r}")
    if not resume and os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path!r} already holds a checkpoint{_step_of(path)}; pass resume=True to "
            f"continue it or overwrite=True to replace it"
        )
    try:  # the directory takes a new file (permissions, read-only file system)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise type(err)(
            err.errno, f"cannot write checkpoints to {directory!r}: {err.strerror or err}"
        ) from err
    free, need = shutil.disk_usage(directory).free, _checkpoint_size(ts)
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for checkpoints in {directory!r}: {free} bytes free, "
            f"a checkpoint needs about {need}",
        )


def _step_of(path: str) -> str:
    try:
        return f" at step {read_metadata(path)['step']}"
    except (CheckpointError, OSError, KeyError):
        return ""


# --- the run -------------------------------------------------------------------


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


def _restore(path: str, ts: TrainState, expected: dict, steps: int) -> TrainState:
    """``ts`` replaced by the checkpoint at ``path``, which must be of this run."""
    try:
        ts, meta = load_checkpoint(path, ts, config=expected)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. Resume with the settings of that run, or start a new one with overwrite=True"
        ) from err
    if meta["step"] > steps:
        raise ValueError(
            f"steps={steps} is below the step of the checkpoint {path!r} ({meta['step']}): "
            f"pass steps >= {meta['step']} to continue it"
        )
    return ts


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
        model: the network config (see :class:`jaxbn.train.Model`).
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
            the same run (see :func:`run_config` for what is compared).
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
            :func:`jaxbn.train.make_train_loop`), or ``None`` for one device. The
            result is that of one device (to float32 rounding), so a checkpoint
            written with one device count resumes with another.
        scan: run each chunk as one ``lax.scan`` (default), or as one jitted
            step per dispatch (same batches and results; see
            :func:`jaxbn.train.make_train_loop`).
        precompute_orders: passed to :func:`jaxbn.train.make_train_loop`.
        precise_stats_batches: after the last step, replace the running
            statistics of the returned state with population statistics over this
            many training batches (:func:`jaxbn.stats.precise_stats_from_data`);
            0 keeps the running averages. Checkpoints keep the running averages,
            so a resumed run continues training exactly as before.

    Returns:
        The final :class:`jaxbn.train.TrainState`.

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
            of the model (:func:`jaxbn.train.check_labels`), non-finite ``x``,
            or ``precise_stats_batches`` for a model without batch norm.
        TypeError: for integer-less ``labels``; a ``config`` or
            ``checkpoint_metadata()`` that is not JSON-able, or a model field
            that cannot be recorded in a checkpoint (a default ``repr`` with a
            memory address), all found before training.
    """
    x, labels = _checked_data(
        x,
        labels,
        steps=steps,
        chunk_size=chunk_size,
        checkpoint_every=checkpoint_every,
        precise_stats_batches=precise_stats_batches,
        checkpoint_path=checkpoint_path,
        resume=resume,
        overwrite=overwrite,
        batch_size=batch_size,
        mesh=mesh,
    )
    ts = init_train_state(model, optimizer, key)
    if precise_stats_batches:
        _check_precise_stats(model, ts.state, precise_stats_batches)
    _check_data(model, ts, x, labels)
    _check_optimizer(optimizer, ts)
    if config is not None:
        _check_json("config", config)
    if checkpoint_path is not None and checkpoint_metadata is not None:
        _check_json("checkpoint_metadata()", checkpoint_metadata())
    ts, save = _checkpointing(
        model,
        ts,
        x,
        labels,
        checkpoint_path,
        resume=resume,
        overwrite=overwrite,
        steps=steps,
        batch_size=batch_size,
        key=key,
        config=config,
        checkpoint_metadata=checkpoint_metadata,
        on_checkpoint=on_checkpoint,
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


def _checked_data(
    x,
    labels,
    *,
    steps,
    chunk_size,
    checkpoint_every,
    precise_stats_batches,
    checkpoint_path,
    resume,
    overwrite,
    batch_size,
    mesh,
):
    """Checks ``fit``'s counts and flags; returns the data where the loop reads it."""
    _check_counts(
        steps=(steps, 0),
        chunk_size=(chunk_size, 1),
        checkpoint_every=(checkpoint_every, 0),
        precise_stats_batches=(precise_stats_batches, 0),
    )
    if resume and checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path, got None")
    if overwrite and checkpoint_path is None:
        raise ValueError("overwrite=True needs a checkpoint_path, got None")
    check_batch_size(batch_size, np.shape(x)[0])
    if mesh is not None:
        check_mesh(mesh, batch_size)
    if mesh is not None and mesh.is_multi_process:
        # Several processes: the examples stay on the host; each process feeds its
        # own rows of every batch (jaxbn.train.make_train_loop).
        x, labels = np.asarray(x), np.asarray(labels)
    else:
        x, labels = jnp.asarray(x), jnp.asarray(labels)
        if mesh is not None:
            x, labels = jax.device_put((x, labels), NamedSharding(mesh, P()))
    return x, labels


def _checkpointing(
    model,
    ts,
    x,
    labels,
    checkpoint_path,
    *,
    resume,
    overwrite,
    steps,
    batch_size,
    key,
    config,
    checkpoint_metadata,
    on_checkpoint,
):
    """``(ts, save)``: the state to start from (restored on ``resume``) and the saver.

    ``save`` is ``None`` without a ``checkpoint_path``.
    """
    if checkpoint_path is None:
        return ts, None
    path = os.fspath(checkpoint_path)
    _check_checkpoint_path(path, ts, resume=resume, overwrite=overwrite)
    expected = run_config(
        model, ts.opt_state, x, labels, batch_size=batch_size, key=key, config=config
    )
    if resume:
        ts = _restore(path, ts, expected, steps)

    def save(ts: TrainState) -> None:
        began = time.perf_counter()
        metadata = None if checkpoint_metadata is None else checkpoint_metadata()
        if distributed.is_main_process():  # one writer; every process can resume
            save_checkpoint(path, ts, step=int(ts.step), config=expected, metadata=metadata)
        if jax.process_count() > 1:  # nobody runs ahead of a checkpoint being written
            multihost_utils.sync_global_devices(f"jaxbn checkpoint {int(ts.step)}")
        if on_checkpoint is not None:
            on_checkpoint(int(ts.step), time.perf_counter() - began)

    return ts, save


def _with_precise_stats(model, ts, x, mesh, batch_size, num_batches):
    """``ts`` with population statistics over ``num_batches`` training batches."""
    params, state, data_key = ts.params, ts.state, ts.key
    if mesh is not None and mesh.is_multi_process:  # replicated: each process's copy
        params, state = jax.device_get((params, state))
        data_key = jax.random.wrap_key_data(
            np.asarray(jax.random.key_data(data_key)), impl=jax.random.key_impl(data_key)
        )
    state = precise_stats_from_data(
        model, params, state, x, batch_size=batch_size, num_batches=num_batches, key=data_key
    )
    return ts._replace(state=state)

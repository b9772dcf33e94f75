"""Checkpoints that lose nothing: any pytree of arrays and PRNG keys in one ``.npz``.

Format (version 2): an uncompressed NumPy ``.npz`` archive with

- one array per leaf of the pytree, named ``tree/<path>`` where ``<path>`` is the
  leaf's tree path (``jax.tree_util.keystr(path, simple=True, separator="/")``,
  e.g. ``tree/params/layers/0/dense/kernel`` or ``tree/opt_state/0/mu/...``);
  typed PRNG keys are stored as their raw bits (``jax.random.key_data``) and
  restored with ``jax.random.wrap_key_data``; leaves of a dtype NumPy cannot
  store by itself (``bfloat16``, the ``float8`` types) are stored as their bits
  (unsigned ints of the same width) and viewed back as the recorded dtype;
- ``__meta__``: a JSON string with ``format_version``, ``step``, the caller's
  ``config`` (a JSON-able dict, e.g. the architecture and the optimizer's
  hyperparameters), the structure (tree definition and every leaf's path, shape
  and dtype), free ``metadata``, and ``content_sha256``: a SHA-256 of every
  array (name, dtype, shape, bytes) and of the rest of the metadata, so that
  values edited after the save are detected at load even where the zip's CRC-32
  was rewritten.

Version-1 checkpoints (without the content hash) load too. A ``fingerprint``
entry (a hash of the config and the structure, which are compared themselves)
is read but not checked.

The second part of the module serves :func:`jaxbn.train.fit`: what a run's
checkpoint records and resuming compares (:func:`run_config`), and the checks of
a checkpoint path made before training (:func:`start_run`).

Why not a checkpointing library: the state of a training run here is a few small
dicts of arrays on one host; a plain ``.npz`` needs nothing beyond NumPy, can be
opened and inspected by anyone with ``numpy.load``, and the zip container checks a
CRC-32 of every member, so truncation and corruption are detected on read.

Writes are atomic: the archive goes to a temporary file in the target's directory,
is flushed and ``fsync``-ed, then moved over the target with ``os.replace``; a
crash leaves either the old checkpoint or the new one, never a mix, and a
temporary file left by a killed save is removed by the next save to the same
path. A failed write (a full disk) raises one ``OSError`` that names the file and
leaves the previous checkpoint intact. Non-finite values are refused at both
ends: a diverged state is never saved, and a checkpoint holding NaN or inf is
never loaded. Loading checks everything against a template tree (from a fresh
``init``) and the expected config, and raises :class:`CheckpointError` on any
difference: a checkpoint of another architecture or optimizer is never loaded,
nor silently ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "optimizer_hyperparams",
    "read_metadata",
    "run_config",
    "save_checkpoint",
    "start_run",
]

#: Version of the on-disk format written by :func:`save_checkpoint`.
FORMAT_VERSION = 2
#: The versions :func:`load_checkpoint` reads (1: without ``content_sha256``).
_READABLE_VERSIONS = (1, 2)

_META = "__meta__"
_PREFIX = "tree/"
_HASH = "content_sha256"
_TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored: corrupt, truncated or mismatched."""


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _as_bits(dtype: np.dtype) -> np.dtype | None:
    """The unsigned int dtype a leaf of ``dtype`` is stored as, or ``None`` (stored as is).

    NumPy's ``.npy`` format has no name for the dtypes that ``ml_dtypes`` adds
    (``bfloat16``, ``float8_*``): it would write them as opaque ``|V2`` records.
    """
    return np.dtype(f"u{dtype.itemsize}") if dtype.kind == "V" else None


def _non_finite(array: np.ndarray) -> bool:
    return bool(jax.numpy.issubdtype(array.dtype, jax.numpy.inexact)) and not bool(
        np.all(np.isfinite(array))
    )


def _content_hash(arrays: dict[str, np.ndarray], meta: dict) -> str:
    """SHA-256 of every stored array (name, dtype, shape, bytes) and the metadata."""
    digest = hashlib.sha256()
    rest = {k: v for k, v in meta.items() if k != _HASH}
    digest.update(json.dumps(rest, sort_keys=True).encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _flatten(tree) -> tuple[list[tuple[str, Any]], Any]:
    """``([(path, leaf), ...], treedef)`` with stable, readable path strings."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = [(jax.tree_util.keystr(p, simple=True, separator="/"), leaf) for p, leaf in leaves]
    paths = [p for p, _ in named]
    if len(set(paths)) != len(paths):
        raise ValueError("tree has two leaves with the same path string; cannot checkpoint it")
    return named, treedef


def _structure(named, treedef) -> dict:
    """What must match between a checkpoint and the tree it is loaded into."""
    leaves = []
    for path, leaf in named:
        if _is_key(leaf):
            leaves.append([path, list(leaf.shape), f"key<{jax.random.key_impl(leaf)}>"])
        else:
            leaf = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
            leaves.append([path, list(leaf.shape), str(leaf.dtype)])
    return {"treedef": str(treedef), "leaves": leaves}


def _canonical(config: dict | None) -> dict:
    """The config as it reads back from JSON (tuples become lists)."""
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or None, got {type(config).__name__}")
    return json.loads(json.dumps(config, sort_keys=True))


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    # Temporary files of saves to ``path`` are ``.<name>.<random>.tmp`` beside it; what a
    # killed save left behind is removed (nothing else).
    prefix = f".{os.path.basename(path)}."
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                os.unlink(os.path.join(directory, name))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=_TMP_SUFFIX, dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the usual mode instead.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable, where the platform lets a directory be opened.
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save_checkpoint(
    path: str | os.PathLike,
    tree: Any,
    *,
    step: int,
    config: dict | None = None,
    metadata: dict | None = None,
) -> None:
    """Writes ``tree`` to ``path`` atomically (temp file, fsync, ``os.replace``).

    Args:
        path: the ``.npz`` file to create or replace; its directory must exist.
        tree: a pytree of arrays (and typed PRNG keys), e.g. a
            :class:`jaxbn.train.TrainState`; every floating leaf finite.
        step: the training step the tree belongs to (stored in the metadata).
        config: JSON-able dict identifying what the tree was made with (the
            architecture, the optimizer and its hyperparameters); loading checks
            it for equality.
        metadata: JSON-able dict stored as is and not checked (e.g. a history).

    Raises:
        ValueError: if a leaf holds NaN or inf (nothing is written).
        OSError: if the file cannot be written (a missing directory, no
            permission, a full disk); the message names the file, and the
            previous checkpoint at ``path``, if any, is left intact.

    Examples:
        >>> import os, tempfile, jax, jax.numpy as jnp
        >>> from jaxbn.checkpoint import load_checkpoint, save_checkpoint
        >>> tree = {"w": jnp.arange(3.0), "key": jax.random.key(1)}
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
        >>> save_checkpoint(path, tree, step=7, config={"lr": 0.1})
        >>> restored, meta = load_checkpoint(path, tree, config={"lr": 0.1})
        >>> restored["w"], meta["step"]
        (Array([0., 1., 2.], dtype=float32), 7)
    """
    path = os.fspath(path)
    config = _canonical(config)
    named, treedef = _flatten(tree)
    structure = _structure(named, treedef)
    arrays = {}
    for name, leaf in named:
        array = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)
        if _non_finite(array):
            raise ValueError(
                f"leaf {name!r} holds non-finite values (NaN or inf); not saving it to {path!r}"
            )
        bits = _as_bits(array.dtype)
        arrays[_PREFIX + name] = array if bits is None else array.view(bits)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": config,
        "structure": structure,
        "metadata": {} if metadata is None else metadata,
    }
    meta = json.loads(json.dumps(meta, sort_keys=True))  # as it will read back
    meta[_HASH] = _content_hash(arrays, meta)
    arrays[_META] = np.asarray(json.dumps(meta, sort_keys=True))
    try:
        _write_atomically(path, arrays)
    except OSError as err:
        reason = err.strerror or str(err)
        raise type(err)(
            err.errno,
            f"cannot write checkpoint {path!r} ({reason}); the previous checkpoint there, "
            f"if any, is left intact",
        ) from err


def _describe_config_difference(saved: Any, expected: Any, prefix: str = "") -> list[str]:
    """``"a.b: checkpoint has X, expected Y"`` for every differing entry, nested dicts walked."""
    if isinstance(saved, dict) and isinstance(expected, dict):
        missing = "<missing>"
        diffs = []
        for k in sorted(set(saved) | set(expected), key=str):
            s, e = saved.get(k, missing), expected.get(k, missing)
            if s != e:
                diffs += _describe_config_difference(s, e, f"{prefix}{k}.")
        return diffs
    return [f"{prefix[:-1]}: checkpoint has {saved!r}, expected {expected!r}"]


def _describe_structure_difference(saved: dict, expected: dict) -> str:
    s = {p: (shape, dt) for p, shape, dt in saved["leaves"]}
    e = {p: (shape, dt) for p, shape, dt in expected["leaves"]}
    for p in sorted(set(s) | set(e)):
        if s.get(p) != e.get(p):
            return f"leaf {p!r}: checkpoint has {s.get(p, 'no such leaf')}, expected {e.get(p)}"
    return f"tree structure differs: checkpoint {saved['treedef']}, expected {expected['treedef']}"


def _read(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of the archive and its parsed metadata, checked for integrity."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError("not an .npz archive")
            with npz:
                stored = {name: npz[name] for name in npz.files}
        meta = json.loads(str(stored.pop(_META)))
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or truncated and cannot be read "
            f"({type(err).__name__}: {err})"
        ) from err
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in _READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint {path!r} has format_version {version!r}, expected one of "
            f"{_READABLE_VERSIONS}"
        )
    if version >= 2 and meta.get(_HASH) != _content_hash(stored, meta):
        raise CheckpointError(
            f"checkpoint {path!r} was modified after it was saved: its arrays or metadata "
            f"do not match the content hash ({_HASH}) recorded when it was written"
        )
    return stored, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a checkpoint (``step``, ``config``, ``metadata``, ...).

    The whole archive is read and checked, as by :func:`load_checkpoint`, but not
    compared with any template.

    Args:
        path: the ``.npz`` file.

    Returns:
        The metadata dict written by :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is corrupt, truncated, modified after it was
            saved, or of another version.
    """
    return _read(os.fspath(path))[1]


def load_checkpoint(
    path: str | os.PathLike, like: Any, *, config: dict | None = None
) -> tuple[Any, dict]:
    """Reads a checkpoint written by :func:`save_checkpoint` into ``like``'s structure.

    Args:
        path: the ``.npz`` file.
        like: a template tree with the expected structure, shapes and dtypes
            (e.g. a fresh ``init``); its values are not used.
        config: the config the checkpoint must have been saved with, or ``None``
            to load without comparing it (the tree's structure, shapes and
            dtypes are compared in any case).

    Returns:
        ``(tree, meta)``: the restored tree (JAX arrays, PRNG keys re-wrapped) and
        the metadata dict (``step``, ``config``, ``metadata``, ...).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is corrupt or truncated, was modified after
            it was saved (content hash), has another format version, holds
            non-finite values, or differs from ``like``/``config`` (the message
            says how).
    """
    path = os.fspath(path)
    stored, meta = _read(path)
    config = meta["config"] if config is None else _canonical(config)
    if meta["config"] != config:
        raise CheckpointError(
            f"checkpoint {path!r} was made with another configuration: "
            + "; ".join(_describe_config_difference(meta["config"], config))
        )
    named, treedef = _flatten(like)
    expected = _structure(named, treedef)
    if meta["structure"] != expected:
        raise CheckpointError(
            f"checkpoint {path!r} does not match the expected model/optimizer state: "
            f"{_describe_structure_difference(meta['structure'], expected)}"
        )
    leaves = []
    for name, template in named:
        # The structure matched; this finds an archive edited around it (version 1 has
        # no content hash).
        arr = stored.get(_PREFIX + name)
        want = np.asarray(jax.random.key_data(template) if _is_key(template) else template)
        stored_as = (want.shape, _as_bits(want.dtype) or want.dtype)
        if arr is None or (arr.shape, arr.dtype) != stored_as:
            raise CheckpointError(f"checkpoint {path!r}: leaf {name!r} is missing or malformed")
        arr = arr.view(want.dtype)
        if _non_finite(arr):
            raise CheckpointError(
                f"checkpoint {path!r}: leaf {name!r} holds non-finite values (NaN or "
                f"inf); a diverged state is never restored"
            )
        leaves.append(
            jax.random.wrap_key_data(arr, impl=jax.random.key_impl(template))
            if _is_key(template)
            else jax.numpy.asarray(arr)
        )
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


# --- a training run's checkpoints: what resuming compares, where they can be written ---


def _plain(value: Any) -> Any:
    """A model field as plain JSON data, the same in every process that builds the model.

    Tuples as lists, dtypes and scalar types by name (``jnp.float32``,
    ``np.float32`` and ``"float32"`` alike), functions and classes by their
    qualified name, a ``functools.partial`` by its function and arguments;
    anything else by its ``repr``, unless that holds a memory address (the
    default ``repr`` of an object), which differs from process to process and so
    could never match on resume: such a field is refused.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, functools.partial):
        keywords = {k: _plain(v) for k, v in value.keywords.items()}
        return {"partial": _plain(value.func), "args": _plain(value.args), "keywords": keywords}
    if isinstance(value, (np.dtype, type)):
        with contextlib.suppress(TypeError):
            dtype = np.dtype(value)
            # A class NumPy does not know becomes the object dtype: not a dtype it names.
            if dtype != np.dtype(object):
                return dtype.name
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '?')}.{value.__qualname__}"
    text = repr(value)
    if " at 0x" in text:
        raise TypeError(
            f"cannot record {text} in a checkpoint: its repr holds a memory address, so "
            f"a resumed run could never match it; give its type a __repr__ of its "
            f"settings, or hold its settings in the model's fields instead"
        )
    return text


def _describe_model(model: Any) -> dict:
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    if not dataclasses.is_dataclass(model):
        return {"type": kind}
    fields = {}
    for f in dataclasses.fields(model):
        if f.name == "axis_name":  # set by fit itself on a mesh
            continue
        try:
            fields[f.name] = _plain(getattr(model, f.name))
        except TypeError as err:
            raise TypeError(f"model field {f.name!r}: {err}") from None
    return {"type": kind, "fields": fields}


def _describe_data(x: Any, labels: Any) -> dict:
    arrays = {}
    for name, a in (("x", x), ("labels", labels)):
        a = np.asarray(a)
        arrays[name] = a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)
    described = {name: [list(a.shape), str(a.dtype)] for name, a in arrays.items()}
    return {**described, "sha256": _content_hash(arrays, {})}


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
    model: Any,
    opt_state: Any,
    x: Any,
    labels: Any,
    *,
    batch_size: int,
    key: jax.Array,
    config: dict | None = None,
) -> dict:
    """What a checkpoint of :func:`jaxbn.train.fit` records and ``resume=True`` requires to match.

    Compared, each by equality:

    - ``model``: the model's type and, for a dataclass, every field except
      ``axis_name`` (e.g. ``MLP``'s sizes, activation, momentum, eps, dtype), as
      plain data: a dtype by its name, a function by its qualified name (two
      functions of one name are not told apart: name them apart);
    - ``batch_size``;
    - ``key``: the run's PRNG key (its implementation and bits);
    - ``data``: the training set's shapes, dtypes and a SHA-256 of its values;
    - ``optimizer_hyperparams``: the hyperparameters that the optimizer's fresh
      state exposes (``optax.inject_hyperparams``: every hyperparameter, a
      schedule by its value at step 0);
    - ``config``: the caller's own dict, as given.

    Not compared: the number of devices (``jaxbn.train.fit`` on a mesh trains the network one
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
        key: the run's key, as given to :func:`jaxbn.train.fit`.
        config: the caller's JSON-able dict, or ``None``.

    Returns:
        A JSON-able dict.
    """
    typed_key = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return {
        "model": _describe_model(model),
        "batch_size": int(batch_size),
        "key": {
            "impl": str(jax.random.key_impl(key)) if typed_key else "raw",
            "data": np.asarray(jax.random.key_data(key) if typed_key else key).ravel().tolist(),
        },
        "data": _describe_data(x, labels),
        "optimizer_hyperparams": optimizer_hyperparams(opt_state),
        "config": {} if config is None else config,
    }


def check_json(name: str, value: Any) -> None:
    """Refuses a value that cannot be written into a checkpoint (before training).

    Args:
        name: what the value is, for the message (e.g. ``"config"``).
        value: the value to check.

    Raises:
        TypeError: naming ``name``, if ``value`` is not JSON-able.
    """
    try:
        json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be JSON-able (dicts, lists, str, int, float, bool, None; no "
            f"NumPy or JAX scalars): {err}"
        ) from None


def start_run(path: str, like: Any, expected: dict, *, steps: int, resume: bool, overwrite: bool):
    """The tree a run of ``steps`` steps checkpointed at ``path`` starts from.

    Everything about ``path`` that can be known before training is checked here,
    with one clear error each: the flags, the directory (it exists, takes a new
    file, has room for a checkpoint of ``like``), an existing checkpoint that
    neither ``resume`` nor ``overwrite`` allows to touch.

    Args:
        path: the checkpoint file.
        like: the fresh state of the run (a template for :func:`load_checkpoint`).
        expected: the run's :func:`run_config`, which a resumed checkpoint must match.
        steps: the run's total number of steps.
        resume: continue the checkpoint at ``path``.
        overwrite: replace the checkpoint at ``path`` with this new run.

    Returns:
        ``like``, or with ``resume`` the checkpoint restored into its structure.
    """
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
    if not resume and os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path!r} already holds a checkpoint{_step_of(path)}; pass resume=True to "
            f"continue it or overwrite=True to replace it"
        )
    _check_room(directory, like)
    if not resume:
        return like
    try:
        tree, meta = load_checkpoint(path, like, config=expected)
    except CheckpointError as err:
        raise CheckpointError(
            f"{err}. Resume with the settings of that run, or start a new one with overwrite=True"
        ) from err
    if meta["step"] > steps:
        raise ValueError(
            f"steps={steps} is below the step of the checkpoint {path!r} ({meta['step']}): "
            f"pass steps >= {meta['step']} to continue it"
        )
    return tree


def _step_of(path: str) -> str:
    try:
        return f" at step {read_metadata(path)['step']}"
    except (CheckpointError, OSError, KeyError):
        return ""


def _check_room(directory: str, tree: Any) -> None:
    """Refuses a directory that takes no new file, or has too little room for ``tree``."""
    try:  # permissions, a read-only file system
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise type(err)(
            err.errno, f"cannot write checkpoints to {directory!r}: {err.strerror or err}"
        ) from err
    arrays = sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if not _is_key(leaf))
    free, need = shutil.disk_usage(directory).free, arrays + (1 << 20)  # and the metadata
    if free < need:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space for checkpoints in {directory!r}: {free} bytes free, "
            f"a checkpoint needs about {need}",
        )

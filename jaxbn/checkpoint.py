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
  and dtype), a ``fingerprint`` (SHA-256 of config and structure), free
  ``metadata``, and ``content_sha256``: a SHA-256 of every array (name, dtype,
  shape, bytes) and of the rest of the metadata, so that values edited after
  the save are detected at load even where the zip's CRC-32 was rewritten.

Version-1 checkpoints (without the content hash) still load.

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
import hashlib
import json
import os
import tempfile
import zipfile
from typing import Any

import jax
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
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


def _fingerprint(config: dict, structure: dict) -> str:
    blob = json.dumps({"config": config, "structure": structure}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _temp_prefix(path: str) -> str:
    """Temporary files of saves to ``path`` are ``.<name>.<random>.tmp`` beside it."""
    return f".{os.path.basename(path)}."


def _remove_stale_temp_files(path: str) -> None:
    """Removes what a killed save to ``path`` left behind (nothing else)."""
    directory, prefix = os.path.dirname(os.path.abspath(path)), _temp_prefix(path)
    for name in os.listdir(directory):
        if name.startswith(prefix) and name.endswith(_TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                os.unlink(os.path.join(directory, name))


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    _remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TMP_SUFFIX, dir=directory)
    try:
        # mkstemp makes the file private (0600); give it the usual mode instead.
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
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
        "fingerprint": _fingerprint(config, structure),
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
    for p in e:
        if p not in s:
            return f"leaf {p!r} is missing from the checkpoint"
    for p in s:
        if p not in e:
            return f"the checkpoint has an unexpected leaf {p!r}"
    for p in e:
        if s[p] != e[p]:
            return f"leaf {p!r}: checkpoint has shape/dtype {s[p]}, expected {e[p]}"
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
    if not isinstance(meta, dict) or meta.get("format_version") not in _READABLE_VERSIONS:
        got = meta.get("format_version") if isinstance(meta, dict) else meta
        raise CheckpointError(
            f"checkpoint {path!r} has format_version {got!r}, expected one of {_READABLE_VERSIONS}"
        )
    if meta["format_version"] >= 2 and meta.get(_HASH) != _content_hash(stored, meta):
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
    if meta["fingerprint"] != _fingerprint(config, expected):
        raise CheckpointError(f"checkpoint {path!r} has a fingerprint that does not match")
    leaves = []
    for name, template in named:
        arr = stored.get(_PREFIX + name)
        if arr is None:
            raise CheckpointError(f"checkpoint {path!r} lacks the array for leaf {name!r}")
        if _is_key(template):
            want = jax.random.key_data(template)
            if arr.shape != want.shape or arr.dtype != want.dtype:
                raise CheckpointError(
                    f"checkpoint {path!r}: key {name!r} has bits {arr.shape}/{arr.dtype}, "
                    f"expected {want.shape}/{want.dtype}"
                )
            leaves.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(template)))
        else:
            shape, dtype = np.shape(template), np.asarray(template).dtype
            stored_dtype = _as_bits(dtype) or dtype
            if arr.shape != shape or arr.dtype != stored_dtype:
                raise CheckpointError(
                    f"checkpoint {path!r}: leaf {name!r} has {arr.shape}/{arr.dtype}, "
                    f"expected {shape}/{stored_dtype}"
                )
            arr = arr.view(dtype)
            if _non_finite(arr):
                raise CheckpointError(
                    f"checkpoint {path!r}: leaf {name!r} holds non-finite values (NaN or "
                    f"inf); a diverged state is never restored"
                )
            leaves.append(jax.numpy.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, leaves), meta

"""Checkpoints that lose nothing: any pytree of arrays and PRNG keys in one ``.npz``.

Format (version 1): an uncompressed NumPy ``.npz`` archive with

- one array per leaf of the pytree, named ``tree/<path>`` where ``<path>`` is the
  leaf's tree path (``jax.tree_util.keystr(path, simple=True, separator="/")``,
  e.g. ``tree/params/layers/0/dense/kernel`` or ``tree/opt_state/0/mu/...``);
  typed PRNG keys are stored as their raw bits (``jax.random.key_data``) and
  restored with ``jax.random.wrap_key_data``;
- ``__meta__``: a JSON string with ``format_version``, ``step``, the caller's
  ``config`` (a JSON-able dict, e.g. the architecture and the optimizer's
  hyperparameters), the structure (tree definition and every leaf's path, shape
  and dtype), a ``fingerprint`` (SHA-256 of config and structure) and free
  ``metadata``.

Why not a checkpointing library: the state of a training run here is a few small
dicts of arrays on one host; a plain ``.npz`` needs nothing beyond NumPy, can be
opened and inspected by anyone with ``numpy.load``, and the zip container checks a
CRC-32 of every member, so truncation and corruption are detected on read.

Writes are atomic: the archive goes to a temporary file in the target's directory,
is flushed and ``fsync``-ed, then moved over the target with ``os.replace``; a
crash leaves either the old checkpoint or the new one, never a mix. Loading checks
everything against a template tree (from a fresh ``init``) and the expected
config, and raises :class:`CheckpointError` on any difference: a checkpoint of
another architecture or optimizer is never loaded, nor silently ignored.
"""

from __future__ import annotations

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
FORMAT_VERSION = 1

_META = "__meta__"
_PREFIX = "tree/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored: corrupt, truncated or mismatched."""


def _is_key(leaf) -> bool:
    return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


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
            :class:`jaxbn.train.TrainState`.
        step: the training step the tree belongs to (stored in the metadata).
        config: JSON-able dict identifying what the tree was made with (the
            architecture, the optimizer and its hyperparameters); loading checks
            it for equality.
        metadata: JSON-able dict stored as is and not checked (e.g. a history).

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
    config = _canonical(config)
    named, treedef = _flatten(tree)
    structure = _structure(named, treedef)
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "config": config,
        "structure": structure,
        "fingerprint": _fingerprint(config, structure),
        "metadata": {} if metadata is None else metadata,
    }
    arrays = {_META: np.asarray(json.dumps(meta, sort_keys=True))}
    for name, leaf in named:
        arrays[_PREFIX + name] = np.asarray(jax.random.key_data(leaf) if _is_key(leaf) else leaf)

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".ckpt.tmp", dir=directory)
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


def _describe_config_difference(saved: dict, expected: dict) -> str:
    keys = sorted(set(saved) | set(expected), key=str)
    missing = "<missing>"
    diffs = [
        f"{k}: checkpoint has {saved.get(k, missing)!r}, expected {expected.get(k, missing)!r}"
        for k in keys
        if saved.get(k, missing) != expected.get(k, missing)
    ]
    return "; ".join(diffs)


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
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        got = meta.get("format_version") if isinstance(meta, dict) else meta
        raise CheckpointError(
            f"checkpoint {path!r} has format_version {got!r}, expected {FORMAT_VERSION}"
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
        CheckpointError: if the file is corrupt, truncated or of another version.
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
        config: the config the checkpoint must have been saved with.

    Returns:
        ``(tree, meta)``: the restored tree (JAX arrays, PRNG keys re-wrapped) and
        the metadata dict (``step``, ``config``, ``metadata``, ...).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        CheckpointError: if the file is corrupt or truncated, has another format
            version, or differs from ``like``/``config`` (the message says how).
    """
    path = os.fspath(path)
    config = _canonical(config)
    stored, meta = _read(path)
    if meta["config"] != config:
        raise CheckpointError(
            f"checkpoint {path!r} was made with another configuration: "
            f"{_describe_config_difference(meta['config'], config)}"
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
            if arr.shape != shape or arr.dtype != dtype:
                raise CheckpointError(
                    f"checkpoint {path!r}: leaf {name!r} has {arr.shape}/{arr.dtype}, "
                    f"expected {shape}/{dtype}"
                )
            leaves.append(jax.numpy.asarray(arr))
    return jax.tree_util.tree_unflatten(treedef, leaves), meta

"""Tests of jaxbn.checkpoint: round trips, low-precision leaves, nothing lost, nothing forged."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn.checkpoint as checkpoint_module
from jaxbn.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint


def _tree(dtype=jnp.float32):
    return {
        "params": {"w": jnp.linspace(-1.5, 2.5, 6, dtype=dtype).reshape(2, 3)},
        "state": {"mean": jnp.array([0.1, -0.2], dtype)},
        "key": jax.random.key(3),
        "step": jnp.array(7, jnp.int32),
    }


def _bits(leaf):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf).tobytes(), np.asarray(leaf).dtype


def _assert_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert _bits(x) == _bits(y)


def _arrays(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.mark.parametrize(
    "dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=["f32", "bf16", "f16"]
)
def test_round_trip_is_bit_exact(tmp_path, dtype):
    tree = _tree(dtype)
    save_checkpoint(tmp_path / "c.npz", tree, step=7, metadata={"note": [1, 2]})
    restored, meta = load_checkpoint(tmp_path / "c.npz", _tree(dtype))
    _assert_identical(restored, tree)
    assert restored["params"]["w"].dtype == dtype
    assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(tree["key"])
    assert meta["metadata"] == {"note": [1, 2]} and meta["step"] == 7
    # Readable with NumPy alone: bfloat16 as its 16 bits, never an opaque record.
    stored = _arrays(tmp_path / "c.npz")["tree/params/w"]
    assert stored.dtype.kind != "V"
    if dtype == jnp.bfloat16:
        assert stored.dtype == np.uint16
        np.testing.assert_array_equal(stored.view(jnp.bfloat16), np.asarray(tree["params"]["w"]))


def test_dtype_mismatch_is_refused(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _tree(jnp.bfloat16), step=1)
    with pytest.raises(CheckpointError, match=r"bfloat16.*expected.*float16"):
        load_checkpoint(tmp_path / "c.npz", _tree(jnp.float16))


def test_config_is_compared_entry_by_entry(tmp_path):
    save_checkpoint(tmp_path / "c.npz", _tree(), step=1, config={"model": {"width": 8}, "lr": 1})
    with pytest.raises(CheckpointError, match=r"model\.width: checkpoint has 8, expected 16$"):
        load_checkpoint(tmp_path / "c.npz", _tree(), config={"model": {"width": 16}, "lr": 1})
    # Without a config, only the structure is compared.
    _, meta = load_checkpoint(tmp_path / "c.npz", _tree())
    assert meta["config"] == {"model": {"width": 8}, "lr": 1}


def test_stale_temporary_file_is_removed_by_the_next_save(tmp_path):
    stale = tmp_path / ".c.npz.k1ll3d.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"PK\x03\x04 partial")
    other = tmp_path / ".other.npz.abc.tmp"  # a save to another file: not ours to remove
    other.write_bytes(b"x")
    save_checkpoint(tmp_path / "c.npz", _tree(), step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.npz.abc.tmp", "c.npz"]


def test_non_finite_values_are_never_saved(tmp_path):
    tree = _tree()
    tree["state"]["mean"] = jnp.array([0.0, jnp.nan])
    with pytest.raises(ValueError, match="leaf 'state/mean' holds non-finite values"):
        save_checkpoint(tmp_path / "c.npz", tree, step=1)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_checkpoint_is_refused_at_load(tmp_path, monkeypatch, bad):
    tree = _tree()
    tree["params"]["w"] = tree["params"]["w"].at[0, 1].set(bad)
    # A checkpoint holding NaN, written by a save that did not check (an older
    # version, another tool): its content hash is valid, its values are not.
    monkeypatch.setattr(checkpoint_module, "_non_finite", lambda array: False)
    save_checkpoint(tmp_path / "c.npz", tree, step=1)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="leaf 'params/w' holds non-finite values"):
        load_checkpoint(tmp_path / "c.npz", _tree())


def _rewrite(path, arrays):
    """Rewrites the archive with new contents: a valid zip (fresh CRCs)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_modified_values_are_detected(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _tree(), step=1)
    arrays = _arrays(path)
    arrays["tree/params/w"] = arrays["tree/params/w"] * 1.001  # finite, same shape and dtype
    _rewrite(path, arrays)
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        load_checkpoint(path, _tree())
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        read_metadata(path)


def test_modified_metadata_is_detected(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _tree(), step=100)
    arrays = _arrays(path)
    meta = json.loads(str(arrays["__meta__"]))
    meta["step"] = 400
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    _rewrite(path, arrays)
    with pytest.raises(CheckpointError, match="modified after it was saved"):
        load_checkpoint(path, _tree())


def test_version_1_checkpoints_still_load(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _tree(), step=5)
    arrays = _arrays(path)
    meta = json.loads(str(arrays["__meta__"]))
    del meta["content_sha256"]
    meta["format_version"] = 1
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    _rewrite(path, arrays)
    restored, meta = load_checkpoint(path, _tree())
    _assert_identical(restored, _tree())
    assert meta["format_version"] == 1


def test_corrupted_bytes_are_detected(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, _tree(), step=1)
    data = bytearray(path.read_bytes())
    # Flip bytes inside the first array's data (past the zip and npy headers).
    start = data.index(b"tree/") + 200
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt or truncated|modified"):
        load_checkpoint(path, _tree())


def test_full_disk_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, _tree(), step=10)
    before = path.read_bytes()

    def full_disk(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*ckpt\.npz.*No space") as info:
        save_checkpoint(path, _tree(), step=20)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary file left

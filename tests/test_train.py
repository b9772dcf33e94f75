"""Tests of jaxbn.train and jaxbn.checkpoint: learning, scan, resume, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from jaxbn.data import batch_indices, load_digits, make_blobs
from jaxbn.mlp import MLP
from jaxbn.train import (
    TrainingDiverged,
    evaluate,
    fit,
    init_train_state,
    make_train_loop,
    make_train_step,
)

BLOBS = make_blobs(num_examples=400, num_features=8, num_classes=3, separation=1.0, seed=0)
MODEL = MLP((8, 16, 16, 3), activation="relu")
BATCH = 32
# Shared optimizer objects: the compiled loop is cached per (model, optimizer).
SGD = optax.sgd(0.1, momentum=0.9)
ADAM = optax.adam(1e-2)


def _fit(steps, optimizer=None, model=MODEL, **kwargs):
    optimizer = SGD if optimizer is None else optimizer
    kwargs.setdefault("chunk_size", 10)
    return fit(
        model,
        optimizer,
        BLOBS.x_train,
        BLOBS.y_train,
        steps=steps,
        batch_size=BATCH,
        key=jax.random.key(0),
        **kwargs,
    )


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_short_run_lowers_the_loss():
    ts0 = init_train_state(MODEL, SGD, jax.random.key(0))
    before = evaluate(MODEL, ts0.params, ts0.state, BLOBS.x_train, BLOBS.y_train)
    ts = _fit(60)
    after = evaluate(MODEL, ts.params, ts.state, BLOBS.x_train, BLOBS.y_train)
    assert int(ts.step) == 60
    assert float(after["loss"]) < 0.7 * float(before["loss"])


def test_batch_norm_mlp_learns_the_digits():
    data = load_digits()
    model = MLP((64, 100, 100, 10), activation="relu")
    ts = fit(
        model,
        optax.sgd(0.05, momentum=0.9),
        data.x_train,
        data.y_train,
        steps=300,
        batch_size=60,
        key=jax.random.key(0),
        chunk_size=300,
    )
    metrics = evaluate(model, ts.params, ts.state, data.x_test, data.y_test)
    assert float(metrics["accuracy"]) >= 0.95


def test_state_changes_in_training_not_in_evaluation():
    ts0 = init_train_state(MODEL, SGD, jax.random.key(0))
    ts = _fit(10)
    bn0, bn = ts0.state["layers"][0]["batch_norm"], ts.state["layers"][0]["batch_norm"]
    assert not np.allclose(bn0["mean"], bn["mean"])
    # evaluate normalizes with the running statistics: each example's prediction is
    # independent of the others, so scoring one by one gives the same accuracy.
    x, y = BLOBS.x_test[:40], BLOBS.y_test[:40]
    whole = evaluate(MODEL, ts.params, ts.state, x, y)
    single = [evaluate(MODEL, ts.params, ts.state, x[i : i + 1], y[i : i + 1]) for i in range(40)]
    np.testing.assert_allclose(
        float(whole["accuracy"]), np.mean([float(m["accuracy"]) for m in single]), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(whole["loss"]), np.mean([float(m["loss"]) for m in single]), rtol=1e-5
    )


@pytest.mark.parametrize("precompute", [True, False], ids=["epoch-orders", "per-step"])
def test_scan_equals_single_steps(precompute, monkeypatch):
    """K scan steps equal K single steps on the batches of batch_indices, across
    epoch boundaries (25 steps of 3 per epoch), with the epochs' orders drawn up
    front and with one permutation per step."""
    import jaxbn.train as train_module

    if not precompute:
        monkeypatch.setattr(train_module, "MAX_PRECOMPUTED_INDICES", 0)
        # The per-step branch must be traced anew, not taken from the compile cache;
        # and it must not draw any epoch's order up front.
        train_module._train_loop.clear_cache()
        monkeypatch.setattr(train_module, "epoch_order", None)
    optimizer = ADAM
    ts = init_train_state(MODEL, optimizer, jax.random.key(0))
    x, y = jnp.asarray(BLOBS.x_train[:100]), jnp.asarray(BLOBS.y_train[:100])
    run = make_train_loop(MODEL, optimizer, batch_size=BATCH)
    first, _ = run(ts, x, y, 4)  # starting mid-epoch in the second call
    scanned, metrics = run(first, x, y, 21)

    step = jax.jit(make_train_step(MODEL, optimizer))
    params, state, opt_state = ts.params, ts.state, ts.opt_state
    losses = []
    for t in range(25):
        idx = batch_indices(ts.key, t, num_examples=x.shape[0], batch_size=BATCH)
        params, state, opt_state, m = step(params, state, opt_state, (x[idx], y[idx]))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(metrics["loss"], losses[4:], rtol=1e-6)
    _assert_trees_equal(
        (scanned.params, scanned.state, scanned.opt_state), (params, state, opt_state)
    )
    assert int(scanned.step) == 25
    train_module._train_loop.clear_cache()


class _Interrupt(Exception):
    pass


def _interrupt_at(stop):
    def callback(ts, chunk):
        if int(ts.step) >= stop:
            raise _Interrupt

    return callback


def test_resume_equals_uninterrupted_run(tmp_path):
    path = tmp_path / "ckpt.npz"
    config = {"lr": 1e-2}
    with pytest.raises(_Interrupt):  # interrupted after step 30, checkpoints every 20
        _fit(50, ADAM, checkpoint_path=path, checkpoint_every=20, config=config,
             callback=_interrupt_at(30))  # fmt: skip
    template = init_train_state(MODEL, ADAM, jax.random.key(0))
    _, meta = load_checkpoint(path, template, config=config)
    assert meta["step"] == 20  # the last checkpoint before the interruption
    resumed = _fit(50, ADAM, checkpoint_path=path, checkpoint_every=20, config=config,
                   resume=True)  # fmt: skip
    straight = _fit(50, ADAM)
    assert int(resumed.step) == 50
    _assert_trees_equal(resumed, straight)


def test_checkpoint_round_trip_keeps_key_and_step(tmp_path):
    ts = _fit(10)
    save_checkpoint(tmp_path / "c.npz", ts, step=10, metadata={"note": [1, 2]})
    template = init_train_state(MODEL, SGD, jax.random.key(9))
    restored, meta = load_checkpoint(tmp_path / "c.npz", template)
    _assert_trees_equal(restored, ts)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(ts.key)
    assert meta["metadata"] == {"note": [1, 2]} and meta["step"] == 10


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.npz"
    _fit(10, checkpoint_path=path, config={"lr": 0.1})
    return path


def test_truncated_checkpoint(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _fit(8, checkpoint_path=saved, config={"lr": 0.1}, resume=True)


def test_corrupted_checkpoint(saved):
    data = bytearray(saved.read_bytes())
    # Flip bytes inside the first array's data (past the zip and npy headers).
    start = data.index(b"tree/") + 200
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _fit(8, checkpoint_path=saved, config={"lr": 0.1}, resume=True)


def test_checkpoint_of_another_architecture(saved):
    other = MLP((8, 16, 24, 3), activation="relu")
    with pytest.raises(
        CheckpointError, match=r"does not match.*layers/1.*\[16\].*expected \(\[24\]"
    ):
        _fit(8, model=other, checkpoint_path=saved, config={"lr": 0.1}, resume=True)


def test_checkpoint_of_another_optimizer(saved):
    with pytest.raises(CheckpointError, match="does not match the expected"):
        _fit(8, ADAM, checkpoint_path=saved, config={"lr": 0.1}, resume=True)


def test_checkpoint_of_another_config(saved):
    with pytest.raises(CheckpointError, match=r"lr: checkpoint has 0\.1, expected 0\.5"):
        _fit(8, checkpoint_path=saved, config={"lr": 0.5}, resume=True)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _fit(8, checkpoint_path=tmp_path / "missing.npz", resume=True)


def _nan_at(step):
    """An optax transformation that turns the update of one step into NaN."""

    def init(params):
        del params
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None):
        del params
        scale = jnp.where(count == step, jnp.nan, 1.0)
        return jax.tree.map(lambda u: u * scale, updates), count + 1

    return optax.GradientTransformation(init, update)


def test_divergence_names_the_step_and_keeps_the_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    optimizer = optax.chain(optax.sgd(0.1), _nan_at(23))
    with pytest.raises(TrainingDiverged, match=r"step 24 \(0-based\)") as info:
        _fit(40, optimizer, checkpoint_path=path, checkpoint_every=10)
    # The update of step 23 is NaN, so the loss of step 24 is the first bad one.
    assert info.value.step == 24 and isinstance(info.value, ValueError)
    template = init_train_state(MODEL, optimizer, jax.random.key(0))
    restored, meta = load_checkpoint(path, template)
    assert meta["step"] == 20
    _assert_trees_equal(restored, _fit(20, optimizer))


def test_huge_learning_rate_diverges():
    model = MLP((8, 16, 16, 3), activation="relu", use_batch_norm=False)
    with pytest.raises(TrainingDiverged) as info:
        _fit(200, optax.sgd(1e8), model=model, chunk_size=200)
    assert 0 < info.value.step < 200
    assert not np.isfinite(info.value.loss)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": -1}, "steps must be an int >= 0, got -1"),
        ({"steps": 5, "chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
        ({"steps": 5, "batch_size": 10_000}, r"batch_size must be between 1 .*got 10000"),
    ],
    ids=["steps", "chunk", "batch"],
)
def test_bad_fit_arguments(kwargs, match):
    args = {"batch_size": BATCH, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(MODEL, SGD, BLOBS.x_train, BLOBS.y_train, key=jax.random.key(0), **args)


def test_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    ts = _fit(10)
    save_checkpoint(path, ts, step=10)
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, ts, step=20)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.npz"]  # no temporary file left


def test_non_finite_state_is_never_checkpointed(tmp_path):
    # The update of step 19 is NaN: every loss of the chunk 10..19 is finite, but
    # the state reached at the checkpoint step 20 is not, and must not be saved.
    path = tmp_path / "ckpt.npz"
    optimizer = optax.chain(optax.sgd(0.1), _nan_at(19))
    with pytest.raises(TrainingDiverged, match="step 20"):
        _fit(40, optimizer, checkpoint_path=path, checkpoint_every=10)
    template = init_train_state(MODEL, optimizer, jax.random.key(0))
    _, meta = load_checkpoint(path, template)
    assert meta["step"] == 10


def test_runs_are_deterministic_for_a_seed():
    a, b = _fit(20), _fit(20)
    _assert_trees_equal(a, b)
    other = fit(
        MODEL, SGD, BLOBS.x_train, BLOBS.y_train, steps=20, batch_size=BATCH,
        key=jax.random.key(1), chunk_size=10,
    )  # fmt: skip
    first_kernel = lambda ts: ts.params["layers"][0]["dense"]["kernel"]  # noqa: E731
    assert not np.allclose(first_kernel(a), first_kernel(other))

"""Tests of jaxbn.train: learning, the loop, any model, resume, nothing lost."""

import dataclasses
import errno
import functools
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import jaxbn.train as train_module
from jaxbn.checkpoint import CheckpointError, load_checkpoint, read_metadata
from jaxbn.data import batch_indices, load_digits, make_blobs
from jaxbn.mlp import MLP
from jaxbn.parallel import data_mesh
from jaxbn.train import (
    Model,
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


@dataclasses.dataclass(frozen=True)
class TinyConv:
    """A second model type for the protocol: NHWC conv 3x3 -> relu -> spatial mean ->
    centring -> dense. The state is a running mean of the pooled features, and
    training centres with the batch's own mean (synchronized over ``axis_name``),
    like batch norm."""

    channels: int = 4
    num_classes: int = 3
    momentum: float = 0.9
    axis_name: Any = None

    def init(self, key):
        k_conv, k_dense = jax.random.split(key)
        params = {
            "conv": jax.random.normal(k_conv, (3, 3, 1, self.channels)) / 3,
            "dense": jax.random.normal(k_dense, (self.channels, self.num_classes)),
        }
        return params, {"feature_mean": jnp.zeros(self.channels)}

    def apply(self, params, state, x, *, training):
        h = lax.conv_general_dilated(
            x, params["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = jax.nn.relu(h).mean(axis=(1, 2))
        mean = state["feature_mean"]
        if training:
            mean = h.mean(axis=0)
            if self.axis_name is not None:
                mean = lax.pmean(mean, self.axis_name)
            m = self.momentum
            state = {"feature_mean": m * state["feature_mean"] + (1 - m) * mean}
        return (h - mean) @ params["dense"], state


IMAGES = make_blobs(num_examples=200, num_features=16, num_classes=3, separation=2.0, seed=1)
X_IMAGES = IMAGES.x_train.reshape(-1, 4, 4, 1)
TINY = TinyConv()


def _fit(steps, optimizer=None, model=MODEL, **kwargs):
    optimizer = SGD if optimizer is None else optimizer
    kwargs.setdefault("chunk_size", 10)
    x, y = kwargs.pop("data", (BLOBS.x_train, BLOBS.y_train))
    kwargs.setdefault("batch_size", BATCH)
    kwargs.setdefault("key", jax.random.key(0))
    return fit(model, optimizer, x, y, steps=steps, **kwargs)


def _assert_trees_equal(a, b, rtol=1e-6, atol=1e-7):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


def _never_called(ts, chunk):
    raise AssertionError("training started; the error should have come before")


# --- learning --------------------------------------------------------------------


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


def test_another_model_type_learns_step_by_step():
    """fit is not MLP-only: a conv model of the protocol learns, one step per call."""
    ts0 = init_train_state(TINY, ADAM, jax.random.key(0))
    before = evaluate(TINY, ts0.params, ts0.state, X_IMAGES, IMAGES.y_train)
    ts = _fit(30, ADAM, model=TINY, data=(X_IMAGES, IMAGES.y_train), batch_size=16, scan=False)
    after = evaluate(TINY, ts.params, ts.state, X_IMAGES, IMAGES.y_train)
    assert float(after["loss"]) < 0.8 * float(before["loss"])
    assert not np.allclose(ts.state["feature_mean"], 0)


def test_state_changes_in_training_not_in_evaluation():
    ts0 = init_train_state(MODEL, SGD, jax.random.key(0))
    ts = _fit(10)
    bn0, bn = ts0.state["layers"][0]["batch_norm"], ts.state["layers"][0]["batch_norm"]
    assert not np.allclose(bn0["mean"], bn["mean"])
    # evaluate normalizes with the running statistics: each example's prediction is
    # independent of the others, so scoring one by one gives the same accuracy.
    x, y = BLOBS.x_test[:16], BLOBS.y_test[:16]
    whole = evaluate(MODEL, ts.params, ts.state, x, y)
    single = [evaluate(MODEL, ts.params, ts.state, x[i : i + 1], y[i : i + 1]) for i in range(16)]
    np.testing.assert_allclose(
        float(whole["accuracy"]), np.mean([float(m["accuracy"]) for m in single]), rtol=1e-6
    )
    np.testing.assert_allclose(
        float(whole["loss"]), np.mean([float(m["loss"]) for m in single]), rtol=1e-5
    )


# --- the loop: scan, step by step, any model --------------------------------------

LOOPS = {
    "scan-epoch-orders": dict(scan=True, precompute_orders=True),
    "scan-per-step-permutation": dict(scan=True, precompute_orders=False),
    "one-step-per-call": dict(scan=False),
}


def _top_level_primitives(run, *args):
    """The primitives of the compiled loop outside its scan."""
    (call,) = jax.make_jaxpr(run, static_argnums=3)(*args).jaxpr.eqns
    return [eqn.primitive.name for eqn in call.params["jaxpr"].jaxpr.eqns]


LOOP_DATA = {
    "mlp": (MODEL, BLOBS.x_train[:100], BLOBS.y_train[:100]),
    "conv": (TINY, X_IMAGES[:100], IMAGES.y_train[:100]),
}


@functools.cache
def _single_steps(model_name):
    """22 jitted single steps of ``make_train_step`` on the batches of ``batch_indices``."""
    model, x, y = LOOP_DATA[model_name]
    ts = init_train_state(model, ADAM, jax.random.key(0))
    step = jax.jit(make_train_step(model, ADAM))
    params, state, opt_state = ts.params, ts.state, ts.opt_state
    losses = []
    for t in range(22):
        idx = batch_indices(ts.key, t, num_examples=x.shape[0], batch_size=BATCH)
        params, state, opt_state, m = step(params, state, opt_state, (x[idx], y[idx]))
        losses.append(float(m["loss"]))
    return (params, state, opt_state), losses


@pytest.mark.parametrize(
    "model_name, loop",
    [("mlp", loop) for loop in LOOPS] + [("conv", "one-step-per-call")],
    ids=[f"mlp-{loop}" for loop in LOOPS] + ["conv-one-step-per-call"],
)
def test_loop_equals_single_steps(model_name, loop):
    """K loop steps equal K jitted single steps on the batches of batch_indices,
    across epoch boundaries (2 x 11 steps, 3 per epoch: the second call starts
    mid-epoch), for every way of running the loop, and for a conv model."""
    model, x, y = LOOP_DATA[model_name]
    x, y = jnp.asarray(x), jnp.asarray(y)
    ts = init_train_state(model, ADAM, jax.random.key(0))
    run = make_train_loop(model, ADAM, batch_size=BATCH, **LOOPS[loop])
    first, _ = run(ts, x, y, 11)
    looped, metrics = run(first, x, y, 11)
    expected, losses = _single_steps(model_name)
    assert metrics["loss"].shape == (11,)
    np.testing.assert_allclose(metrics["loss"], losses[11:], rtol=1e-6)
    _assert_trees_equal((looped.params, looped.state, looped.opt_state), expected)
    assert int(looped.step) == 22
    if LOOPS[loop]["scan"]:
        # The epochs' orders are drawn before the scan exactly when asked for.
        drawn_up_front = "random_fold_in" in _top_level_primitives(run, first, x, y, 11)
        assert drawn_up_front == LOOPS[loop]["precompute_orders"]


def test_step_by_step_loop_with_zero_steps():
    ts = init_train_state(MODEL, SGD, jax.random.key(0))
    for scan in (True, False):
        run = make_train_loop(MODEL, SGD, batch_size=BATCH, scan=scan)
        out, metrics = run(ts, BLOBS.x_train, BLOBS.y_train, 0)
        assert int(out.step) == 0
        assert metrics["loss"].shape == (0,) and metrics["loss"].dtype == jnp.float32


def test_model_protocol_is_checked():
    assert isinstance(MODEL, Model) and isinstance(TINY, Model)
    with pytest.raises(TypeError, match=r"model must have init\(key\).*got object"):
        make_train_step(object(), SGD)

    class NoAxisName:  # follows the protocol, but cannot be synchronized over a mesh
        def init(self, key):
            return TINY.init(key)

        def apply(self, params, state, x, *, training):
            return TINY.apply(params, state, x, training=training)

    class Unhashable(NoAxisName):
        __hash__ = None

    with pytest.raises(TypeError, match="model must be hashable"):
        make_train_loop(Unhashable(), SGD, batch_size=BATCH)
    with pytest.raises(TypeError, match="needs a dataclass model with an axis_name field"):
        make_train_step(NoAxisName(), SGD, mesh=data_mesh(1))


# --- resume and the divergence guard -------------------------------------------


class _Interrupt(Exception):
    pass


def _interrupt_at(stop):
    def callback(ts, chunk):
        if int(ts.step) >= stop:
            raise _Interrupt

    return callback


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """Interrupted mid-chunk after step 25, with checkpoints every 10: the resumed run
    (from step 20) ends with the bits of an uninterrupted one, bfloat16 params included."""
    model, path = MLP((8, 16, 3), param_dtype=jnp.bfloat16), tmp_path / "ckpt.npz"
    kwargs = dict(model=model, chunk_size=5)  # one compiled chunk for the three runs
    with pytest.raises(_Interrupt):
        _fit(30, ADAM, checkpoint_path=path, checkpoint_every=10, config={"lr": 1e-2},
             callback=_interrupt_at(25), **kwargs)  # fmt: skip
    assert read_metadata(path)["step"] == 20  # the last checkpoint before the interruption
    resumed = _fit(30, ADAM, checkpoint_path=path, checkpoint_every=10, config={"lr": 1e-2},
                   resume=True, **kwargs)  # fmt: skip
    straight = _fit(30, ADAM, **kwargs)
    assert int(resumed.step) == 30
    assert resumed.params["layers"][0]["dense"]["kernel"].dtype == jnp.bfloat16
    _assert_trees_equal(resumed, straight, rtol=0, atol=0)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "ckpt.npz"
    _fit(10, checkpoint_path=path, config={"lr": 0.1})
    return path


def test_existing_checkpoint_is_not_overwritten(saved):
    before = saved.read_bytes()
    with pytest.raises(FileExistsError) as info:
        _fit(5, checkpoint_path=saved, config={"lr": 0.1}, callback=_never_called)
    message = str(info.value)
    for part in (str(saved), "at step 10", "resume=True", "overwrite=True"):
        assert part in message
    assert saved.read_bytes() == before
    _fit(5, checkpoint_path=saved, config={"lr": 0.1}, overwrite=True)
    assert read_metadata(saved)["step"] == 5
    with pytest.raises(ValueError, match="not both"):
        _fit(20, checkpoint_path=saved, resume=True, overwrite=True)


#: What a resume must share with the run it continues: one change each, and the
#: difference the error must name.
MISMATCHES = {
    "activation": (
        dict(model=MLP((8, 16, 16, 3), activation="tanh")),
        "model.fields.activation: checkpoint has 'relu', expected 'tanh'",
    ),
    "momentum-of-batch-norm": (
        dict(model=MLP((8, 16, 16, 3), momentum=0.9)),
        "model.fields.momentum: checkpoint has 0.99, expected 0.9",
    ),
    "width": (
        dict(model=MLP((8, 16, 24, 3))),
        r"model.fields.layer_sizes: checkpoint has \[8, 16, 16, 3\], expected \[8, 16, 24, 3\]",
    ),
    "batch-size": (dict(batch_size=16), "batch_size: checkpoint has 32, expected 16"),
    "key": (dict(key=jax.random.key(1)), r"key.data: checkpoint has \[0, 0\], expected \[0, 1\]"),
    "data": (dict(data=(BLOBS.x_train[::-1], BLOBS.y_train[::-1])), "data.sha256"),
    "config": (dict(config={"lr": 0.5}), r"config.lr: checkpoint has 0\.1, expected 0\.5"),
    "optimizer-structure": (dict(optimizer=ADAM), "does not match the expected"),
}


@pytest.mark.parametrize("change", MISMATCHES, ids=list(MISMATCHES))
def test_resume_refuses_another_run(saved, change):
    kwargs, match = MISMATCHES[change]
    kwargs = {"config": {"lr": 0.1}, **kwargs}
    with pytest.raises(CheckpointError, match=match) as info:
        _fit(20, checkpoint_path=saved, resume=True, callback=_never_called, **kwargs)
    assert "overwrite=True" in str(info.value)


def test_resume_refuses_other_injected_hyperparameters(tmp_path):
    path = tmp_path / "ckpt.npz"
    sgd = optax.inject_hyperparams(optax.sgd)
    _fit(10, sgd(learning_rate=0.1, momentum=0.9), checkpoint_path=path)
    for changed, name in (
        (sgd(learning_rate=0.2, momentum=0.9), "learning_rate"),
        (sgd(learning_rate=0.1, momentum=0.8), "momentum"),
    ):
        with pytest.raises(CheckpointError, match=f"optimizer_hyperparams.{name}: checkpoint"):
            _fit(20, changed, checkpoint_path=path, resume=True, callback=_never_called)
    resumed = _fit(20, sgd(learning_rate=0.1, momentum=0.9), checkpoint_path=path, resume=True)
    assert int(resumed.step) == 20


def test_resume_with_fewer_steps_than_the_checkpoint(saved):
    with pytest.raises(ValueError, match=r"steps=8 is below the step of the checkpoint .* \(10\)"):
        _fit(8, checkpoint_path=saved, config={"lr": 0.1}, resume=True)
    same = _fit(10, checkpoint_path=saved, config={"lr": 0.1}, resume=True)
    assert int(same.step) == 10


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _fit(8, checkpoint_path=tmp_path / "missing.npz", resume=True)


def test_truncated_checkpoint(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        _fit(20, checkpoint_path=saved, config={"lr": 0.1}, resume=True)


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


def test_non_finite_state_is_never_checkpointed(tmp_path):
    # The update of step 19 is NaN: every loss of the chunk 10..19 is finite, but
    # the state reached at the checkpoint step 20 is not, and must not be saved.
    path = tmp_path / "ckpt.npz"
    optimizer = optax.chain(optax.sgd(0.1), _nan_at(19))
    with pytest.raises(TrainingDiverged, match="step 20"):
        _fit(40, optimizer, checkpoint_path=path, checkpoint_every=10)
    assert read_metadata(path)["step"] == 10


def test_diverged_last_step_is_caught_without_checkpoints():
    """A schedule that turns NaN at the last step: every loss is finite, the params
    returned would not be. No checkpoint_path: the check runs all the same."""
    schedule = lambda count: jnp.where(count == 19, jnp.nan, 0.05)  # noqa: E731
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    with pytest.raises(TrainingDiverged, match=r"at the start of step 20 \(0-based\)") as info:
        _fit(20, optimizer)
    assert info.value.step == 20


@pytest.mark.parametrize(
    "optimizer, match",
    [
        (optax.sgd(float("nan")), "first update is not finite"),
        (optax.adam(float("inf")), "first update is not finite"),
        (optax.inject_hyperparams(optax.sgd)(learning_rate=float("nan")), "learning_rate"),
        (optax.inject_hyperparams(optax.sgd)(learning_rate=-0.1), r"learning_rate must be >= 0"),
    ],
    ids=["sgd-nan", "adam-inf", "injected-nan", "injected-negative"],
)
def test_bad_learning_rate_is_a_bad_argument(optimizer, match):
    with pytest.raises(ValueError, match=match) as info:
        _fit(10, optimizer, callback=_never_called)
    assert not isinstance(info.value, TrainingDiverged)


# --- checkpoints that cannot be written: one clear error, nothing lost ------------


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*create"):
        _fit(10, checkpoint_path=tmp_path / "no" / "ckpt.npz", callback=_never_called)


def test_unwritable_checkpoint_directory(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", denied)
    with pytest.raises(PermissionError, match=r"cannot write checkpoints to .*Permission denied"):
        _fit(10, checkpoint_path=tmp_path / "ckpt.npz", callback=_never_called)


def test_too_little_free_space_is_found_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(OSError, match="not enough free space") as info:
        _fit(10, checkpoint_path=tmp_path / "ckpt.npz", callback=_never_called)
    assert info.value.errno == errno.ENOSPC


# --- arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": -1}, "steps must be an int >= 0, got -1"),
        ({"steps": 5, "chunk_size": 0}, "chunk_size must be a positive int, got 0"),
        ({"steps": 5, "checkpoint_every": -2}, "checkpoint_every must be an int >= 0, got -2"),
        ({"steps": 5, "batch_size": 10_000}, r"batch_size must be between 1 .*got 10000"),
        ({"steps": 5, "resume": True}, "resume=True needs a checkpoint_path"),
        ({"steps": 5, "overwrite": True}, "overwrite=True needs a checkpoint_path"),
    ],
    ids=["steps", "chunk", "checkpoint-every", "batch", "resume", "overwrite"],
)
def test_bad_fit_arguments(kwargs, match):
    args = {"batch_size": BATCH, **kwargs}
    with pytest.raises(ValueError, match=match):
        fit(MODEL, SGD, BLOBS.x_train, BLOBS.y_train, key=jax.random.key(0), **args)


def test_chunks_end_at_checkpoints_and_report_their_time(tmp_path):
    chunks, saves = [], []
    _fit(
        25,
        chunk_size=7,
        checkpoint_path=tmp_path / "c.npz",
        checkpoint_every=10,
        callback=lambda ts, chunk: chunks.append(chunk),
        on_checkpoint=lambda step, seconds: saves.append((step, seconds)),
    )
    assert [int(c["step"][-1]) + 1 for c in chunks] == [7, 10, 17, 20, 25]
    assert all(c["seconds"] > 0 for c in chunks)
    assert [s for s, _ in saves] == [10, 20, 25] and all(t > 0 for _, t in saves)
    # From a resumed step 3: to 10, 17, 20 (a checkpoint), 25.
    assert list(train_module._chunk_lengths(3, 25, 7, 10)) == [7, 7, 3, 5]


def test_runs_are_deterministic_for_a_seed():
    a, b = _fit(5), _fit(5)
    _assert_trees_equal(a, b)
    other = _fit(5, key=jax.random.key(1))
    first_kernel = lambda ts: ts.params["layers"][0]["dense"]["kernel"]  # noqa: E731
    assert not np.allclose(first_kernel(a), first_kernel(other))

"""What ``fit`` and the loops refuse before training: data, optimizers, what a checkpoint records.

Each case would otherwise train without a word and return a wrong model (JAX clamps
an index out of range), or train to the end and then fail to write its checkpoint.
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn.checkpoint as checkpoint_module
from jaxbn.data import make_blobs
from jaxbn.mlp import MLP
from jaxbn.train import check_labels, evaluate, fit, init_train_state, make_train_loop

DATA = make_blobs(num_examples=120, num_features=8, num_classes=3, separation=1.0, seed=0)
X, Y = DATA.x_train, DATA.y_train
MODEL = MLP((8, 8, 3))
SGD = optax.sgd(0.1)


def _never_called(ts, chunk):
    raise AssertionError("training started; the error should have come before")


def _fit(x=X, labels=Y, optimizer=SGD, model=MODEL, **kwargs):
    kwargs.setdefault("callback", _never_called)
    return fit(model, optimizer, x, labels, steps=4, batch_size=16, key=jax.random.key(0), **kwargs)


# --- labels and x -----------------------------------------------------------------


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (Y[:-5], ValueError, r"labels must have shape \(\d+,\), one label per example"),
        (Y[:, None], ValueError, r"labels must have shape"),
        (Y.astype(np.float32), TypeError, r"labels must be integer class indices, got dtype"),
        (Y - 1, ValueError, r"labels must be class indices in \[0, 3\).*from -1 to 1"),
        (Y + 1, ValueError, r"labels must be class indices in \[0, 3\).*from 1 to 3"),
    ],
    ids=["too-few", "2-d", "float", "negative", "past-the-last-class"],
)
def test_fit_refuses_labels_that_are_not_one_class_index_per_example(labels, error, match):
    assert np.array_equal(np.unique(Y), [0, 1, 2])  # the cases above are what they say
    with pytest.raises(error, match=match):
        _fit(labels=labels)


def test_the_number_of_classes_comes_from_the_model():
    # Labels 0..2 are fine for 3 classes and out of range for 2.
    with pytest.raises(ValueError, match=r"\[0, 2\) \(the model has 2 classes\)"):
        _fit(model=MLP((8, 8, 2)))
    ts = _fit(callback=None)
    assert int(ts.step) == 4


def test_fit_refuses_non_finite_x():
    x = np.array(X)
    x[7, 3] = np.nan
    with pytest.raises(ValueError, match="x must be finite"):
        _fit(x=x)


def test_evaluate_and_the_loops_check_the_labels():
    ts = init_train_state(MODEL, SGD, jax.random.key(0))
    with pytest.raises(ValueError, match=r"in \[0, 3\)"):
        evaluate(MODEL, ts.params, ts.state, X, Y + 1)
    with pytest.raises(ValueError, match="one label per example"):
        evaluate(MODEL, ts.params, ts.state, X, Y[:10])
    for scan in (True, False):
        run = make_train_loop(MODEL, SGD, batch_size=16, scan=scan)
        with pytest.raises(ValueError, match="one label per example"):
            run(ts, X, Y[:-5], 2)
        with pytest.raises(TypeError, match="integer class indices"):
            run(ts, X, Y.astype(np.float32), 2)
    assert np.isfinite(float(evaluate(MODEL, ts.params, ts.state, X, Y)["loss"]))


def test_check_labels_of_traced_labels_checks_shape_and_dtype_only():
    def f(labels):
        check_labels(labels, 3, num_classes=2)  # values unknown while tracing
        return labels

    assert jax.eval_shape(f, jnp.array([0, 5, 1])).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(f, jnp.array([0, 1]))


# --- optimizers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [optax.sgd(-0.1), optax.adam(-1e-3), optax.chain(optax.clip(1.0), optax.sgd(-0.5))],
    ids=["sgd", "adam", "chain"],
)
def test_a_negative_learning_rate_hidden_in_the_optimizer_gets_a_warning(optimizer):
    # A warning, not an error: sharpness-aware minimization's first step ascends by design.
    with pytest.warns(UserWarning, match="goes uphill"):
        ts = _fit(optimizer=optimizer, callback=None)
    assert int(ts.step) == 4


def test_an_optimizer_that_ascends_by_design_still_trains():
    sam = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.05))
    with pytest.warns(UserWarning, match="sharpness-aware"):
        ts = _fit(optimizer=sam, callback=None)
    assert int(ts.step) == 4


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.sgd(optax.linear_schedule(0.0, 0.1, 10)),  # a warm-up from 0: a zero update
        optax.adamw(1e-3, weight_decay=1e-2),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    ],
    ids=["warm-up-from-zero", "adamw", "nesterov"],
)
def test_optimizers_that_descend_are_accepted_without_a_warning(optimizer):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ts = _fit(optimizer=optimizer, callback=None)
    assert not [w for w in caught if "uphill" in str(w.message)]
    assert int(ts.step) == 4


# --- what a checkpoint records ------------------------------------------------------


def test_a_config_that_is_not_json_is_refused_before_training(tmp_path):
    path = tmp_path / "run.npz"
    with pytest.raises(TypeError, match="config must be JSON-able"):
        _fit(checkpoint_path=path, config={"lr": np.float32(0.1)})
    with pytest.raises(TypeError, match=r"checkpoint_metadata\(\) must be JSON-able"):
        _fit(checkpoint_path=path, checkpoint_metadata=lambda: {"when": jnp.float32(1)})
    assert not path.exists()
    # Infinity is fine: JSON as the checkpoint writes it, and it reads back.
    _fit(checkpoint_path=path, config={"lr": 0.1, "max_norm": float("inf")}, callback=None)
    assert path.exists()
    ts = fit(
        MODEL, SGD, X, Y, steps=6, batch_size=16, key=jax.random.key(0), checkpoint_path=path,
        resume=True, config={"lr": 0.1, "max_norm": float("inf")},
    )  # fmt: skip
    assert int(ts.step) == 6


@dataclasses.dataclass(frozen=True)
class WithActivation:
    """A user's model with a function-valued field."""

    activation: Callable = jax.nn.relu
    sizes: tuple = (8, 8, 3)

    def init(self, key):
        return MLP(self.sizes).init(key)

    def apply(self, params, state, x, *, training):
        return MLP(self.sizes).apply(params, state, self.activation(x), training=training)


def _function_copies():
    """Two distinct function objects with the same code, as two processes would build."""
    return [(lambda v: jnp.tanh(v) * 2) for _ in range(2)]


def test_model_fields_are_recorded_as_plain_data_the_same_in_every_process():
    plain = checkpoint_module._plain
    # Dtypes by name whatever their spelling, as checkpoints have always held them.
    assert {plain(d) for d in (jnp.float32, np.float32, np.dtype("float32"))} == {"float32"}
    assert plain(jnp.bfloat16) == "bfloat16"
    assert checkpoint_module._describe_model(MODEL)["fields"]["param_dtype"] == "float32"
    # Functions by qualified name: equal for two processes' copies, never a memory address.
    a, b = _function_copies()
    assert a is not b and repr(a) != repr(b) and plain(a) == plain(b)
    assert plain(jax.nn.relu) != plain(jax.nn.gelu)
    leaky = functools.partial(jax.nn.leaky_relu, negative_slope=0.1)
    assert plain(leaky) != plain(functools.partial(jax.nn.leaky_relu, negative_slope=0.2))


def test_a_model_with_a_function_field_resumes_and_a_changed_one_is_refused(tmp_path):
    a, b = _function_copies()
    path = tmp_path / "run.npz"
    _fit(model=WithActivation(a), checkpoint_path=path, callback=None)
    ts = fit(
        WithActivation(b), SGD, X, Y, steps=6, batch_size=16, key=jax.random.key(0),
        checkpoint_path=path, resume=True,
    )  # fmt: skip
    assert int(ts.step) == 6
    with pytest.raises(Exception, match="activation"):
        fit(
            WithActivation(jax.nn.gelu), SGD, X, Y, steps=8, batch_size=16,
            key=jax.random.key(0), checkpoint_path=path, resume=True,
        )  # fmt: skip


class _Opaque:
    """An object whose repr is the default one, with its memory address."""

    def __call__(self, v):
        return v


def test_a_field_that_cannot_be_recorded_is_refused_before_training(tmp_path):
    with pytest.raises(TypeError, match=r"model field 'activation'.*memory address"):
        _fit(model=WithActivation(_Opaque()), checkpoint_path=tmp_path / "run.npz")
    assert not (tmp_path / "run.npz").exists()
    # Without a checkpoint nothing is recorded, and nothing is refused.
    assert int(_fit(model=WithActivation(_Opaque()), callback=None).step) == 4


@pytest.mark.parametrize(
    "model, error, match",
    [
        (MLP((8, 8, 3), use_batch_norm=False), ValueError, "no batch-norm statistics"),
        (WithActivation(), TypeError, "momentum"),
    ],
    ids=["no-batch-norm", "no-momentum"],
)
def test_precise_stats_batches_for_a_model_it_cannot_update_is_refused_before_training(
    model, error, match
):
    with pytest.raises(error, match=f"precise_stats_batches=2: .*{match}"):
        _fit(model=model, precise_stats_batches=2)

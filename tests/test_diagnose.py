"""jaxbn.diagnose: the stale, healthy, dead, collapsed and noisy cases, and bad inputs.

The models are the digits MLP trained for a few steps (module fixtures, trained
once); every diagnosis runs on the test split or the training split.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import diagnosis
from jaxbn.data import load_digits
from jaxbn.train import evaluate, init_train_state, make_train_loop

BATCH = 32


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def train(digits, *, momentum, steps):
    """``(model, params, state)`` of the digits MLP after ``steps`` steps."""
    model = jaxbn.MLP((64, 64, 64, 10), momentum=momentum)
    optimizer = optax.sgd(0.05, momentum=0.9)
    ts = init_train_state(model, optimizer, jax.random.key(0))
    run = make_train_loop(model, optimizer, batch_size=BATCH)
    ts, _ = run(ts, digits.x_train, digits.y_train, steps)
    return model, ts.params, ts.state


def precise(model, params, state, x):
    """The fix the report names, as it prints it (training inputs in batches of BATCH)."""
    return jaxbn.precise_stats(
        model, params, state, [x[i : i + BATCH] for i in range(0, len(x), BATCH)]
    )


@pytest.fixture(scope="module")
def stale(digits):
    """Few steps at momentum 0.999: the running averages are still near their 0 and 1."""
    return train(digits, momentum=0.999, steps=100)


@pytest.fixture(scope="module")
def healthy(stale, digits):
    """The stale model with population statistics of the training inputs."""
    model, params, state = stale
    return model, params, precise(model, params, state, digits.x_train)


def on_test(net, digits, **kwargs):
    model, params, state = net
    kwargs.setdefault("labels", digits.y_test)
    return jaxbn.diagnose(model, params, state, digits.x_test, batch_size=BATCH, **kwargs)


@pytest.fixture(scope="module")
def stale_diagnosis(stale, digits):
    return on_test(stale, digits)


def test_stale_statistics_name_the_layers_and_precise_stats_first(stale, stale_diagnosis, digits):
    d = stale_diagnosis
    assert d.stale and not d.healthy
    assert d.gap > 0.05  # the case is a real one: the running averages cost points
    assert d.costly_layers
    by_name = {layer.name: layer for layer in d.layers}
    assert all(by_name[name].stale for name in d.costly_layers)
    assert "jaxbn.precise_stats(" in d.fixes[0][0]
    codes = [code for code, _ in d.fixes]
    assert any("debias=True" in c for c in codes) and any("momentum=0.99" in c for c in codes)
    report = str(d)
    assert "stale running statistics" in report and d.costly_layers[0] in report
    assert report.index("precise_stats") < report.index("debias=True")

    # The named fix, run as printed, recovers at least 90% of the gap.
    model, params, state = stale
    scope = {"jaxbn": jaxbn, "model": model, "params": params, "state": state}
    exec(d.fixes[0][0], {**scope, "x_train": digits.x_train}, scope)
    after = float(evaluate(model, params, scope["state"], digits.x_test, digits.y_test)["accuracy"])
    assert after - d.running_score >= 0.9 * d.gap, (after, d.running_score, d.gap)


def test_the_diagnosis_measures_what_evaluation_gives(stale, stale_diagnosis, digits):
    d = stale_diagnosis
    model, params, state = stale
    running = evaluate(model, params, state, digits.x_test, digits.y_test)["accuracy"]
    assert d.running_score == pytest.approx(float(running), abs=1e-6)
    assert d.metric == "accuracy" and d.num_examples == len(digits.y_test)
    # Without labels: agreement with the predictions of population statistics.
    unlabeled = on_test(stale, digits, labels=None)
    assert unlabeled.metric == "agreement" and unlabeled.population_score == 1.0
    assert unlabeled.stale


@pytest.fixture(scope="module")
def long_run(digits):
    return train(digits, momentum=0.9, steps=600)


@pytest.mark.parametrize("net", ["healthy", "long_run"], ids=["precise", "long_run"])
def test_good_statistics_report_no_problem(net, digits, request):
    # The precise case runs under strict dtype promotion: diagnose mixes no dtypes.
    with jax.numpy_dtype_promotion("strict" if net == "healthy" else "standard"):
        d = on_test(request.getfixturevalue(net), digits)
    assert d.healthy, str(d)
    assert d.fixes == () and d.problems == ()
    assert d.gap < diagnosis.MATERIAL_GAP
    assert not any(layer.stale or layer.noisy or layer.dead for layer in d.layers)
    assert "verdict: no problem found" in str(d) and "fixes" not in str(d)


def test_dead_feature_and_collapsed_scale_are_named(healthy, digits):
    model, params, state = healthy
    layers = [dict(layer) for layer in params["layers"]]
    # Feature 3 of the first layer: a zero kernel column, so a constant input.
    kernel = layers[0]["dense"]["kernel"].at[:, 3].set(0.0)
    layers[0] = {**layers[0], "dense": {**layers[0]["dense"], "kernel": kernel}}
    # Feature 5 of the second layer: its scale collapsed to zero.
    scale = layers[1]["batch_norm"]["scale"].at[5].set(0.0)
    layers[1] = {**layers[1], "batch_norm": {**layers[1]["batch_norm"], "scale": scale}}
    d = on_test((model, {**params, "layers": layers}, state), digits)
    first, second = d.layers
    assert (first.dead, first.collapsed) == ((3,), ())
    assert (second.dead, second.collapsed) == ((), (5,))
    problems = " ".join(d.problems)
    assert "dead features (variance near 0) in layers/0/batch_norm [3]" in problems
    assert "collapsed scales (near 0) in layers/1/batch_norm [5]" in problems
    codes = " ".join(code for code, _ in d.fixes)
    assert "eps=0.001" in codes and "optax.adamw" in codes


@pytest.mark.parametrize(("batch_size", "noisy"), [(2, True), (256, False)])
def test_small_batch_noise_is_reported(healthy, digits, batch_size, noisy):
    model, params, state = healthy
    d = jaxbn.diagnose(model, params, state, digits.x_train, batch_size=batch_size)
    assert any(layer.noisy for layer in d.layers) == noisy, str(d)
    codes = " ".join(code for code, _ in d.fixes)
    assert ("mesh=jaxbn.parallel.data_mesh()" in codes) == noisy
    if noisy:
        assert f"noisy batch statistics at batch size {batch_size}" in str(d)


def test_layer_figures_match_numpy():
    """One layer whose running statistics are the initial ones, against numpy's."""
    bn = jaxbn.BatchNorm(3, momentum=0.9)
    params, state = bn.init()
    x = np.asarray(2.0 + 3.0 * jax.random.normal(jax.random.key(1), (128, 3)), np.float64)
    layer = jaxbn.diagnose(bn, params, state, x, batch_size=16).layers[0]
    mean, var = x.mean(0), x.var(0)
    shift = np.sqrt(np.mean(mean**2 / (var + bn.eps)))
    ratio = np.exp(np.mean(np.log((1 + bn.eps) / (var + bn.eps))))
    np.testing.assert_allclose([layer.mean_shift, layer.var_ratio], [shift, ratio], rtol=1e-4)
    assert layer.name == "state" and layer.num_features == 3
    assert layer.horizon == pytest.approx(10.0)
    assert layer.init_weight == pytest.approx(1.0) and layer.count is None


def test_debiased_state_reports_its_update_count():
    bn = jaxbn.BatchNorm(3, momentum=0.99, debias=True)
    params, state = bn.init()
    x = jax.random.normal(jax.random.key(2), (64, 3))
    for _ in range(3):
        _, state = bn.apply(params, state, x, training=True)
    d = jaxbn.diagnose(bn, params, state, x, batch_size=16)
    assert (d.layers[0].count, d.layers[0].horizon) == (3, pytest.approx(100.0))
    assert "3 / 100" in str(d)


def _no_work(*args, **kwargs):
    raise AssertionError("the inputs should have been refused before any work")


NO_BN = jaxbn.MLP((64, 8, 10), use_batch_norm=False)


@dataclasses.dataclass(frozen=True)
class NoMomentum:
    """A model of the protocol whose batch norm has no momentum field."""

    def apply(self, params, state, x, *, training):
        return jaxbn.BatchNorm(64).apply(params, state, x, training=training)


@pytest.mark.parametrize(
    ("case", "error", "match"),
    [
        ("wrong_shape", ValueError, r"x \(shape \(359, 10\)\) does not fit the model"),
        ("no_batch_norm", ValueError, "no batch-norm statistics"),
        ("nan", ValueError, r"x must be finite: x\[7\] holds NaN"),
        ("batch_size_1", ValueError, r"batch_size must be .* in \[2, 359\]"),
        ("batch_size_large", ValueError, r"batch_size must be .* in \[2, 359\]"),
        ("labels_short", ValueError, "labels"),
        ("no_momentum", TypeError, "momentum"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(healthy, digits, monkeypatch, case, error, match):
    model, params, state = healthy
    x, kwargs = jnp.asarray(digits.x_test), {"batch_size": BATCH}
    if case == "wrong_shape":
        x = x[:, :10]
    elif case == "no_batch_norm":
        model = NO_BN
        params, state = NO_BN.init(jax.random.key(0))
    elif case == "nan":
        x = x.at[7, 3].set(jnp.nan)
    elif case == "batch_size_1":
        kwargs["batch_size"] = 1
    elif case == "batch_size_large":
        kwargs["batch_size"] = 360
    elif case == "labels_short":
        kwargs["labels"] = digits.y_test[:-1]
    elif case == "no_momentum":
        model = NoMomentum()
        params, state = jaxbn.BatchNorm(64).init()
    monkeypatch.setattr(diagnosis, "population_stats", _no_work)
    with pytest.raises(error, match=match):
        jaxbn.diagnose(model, params, state, x, **kwargs)

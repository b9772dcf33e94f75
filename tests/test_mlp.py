"""Tests of jaxbn.mlp: layout, the forward pass against NumPy, gradients against the oracle."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxbn import reference
from jaxbn.cnn import CNN
from jaxbn.mlp import ACTIVATIONS, MLP
from tests._op_cases import normal

SIZES = (5, 7, 6, 3)


def _x(n=8, seed=1):
    """A float32 NumPy batch (test inputs are drawn with NumPy)."""
    return normal(seed, (n, SIZES[0]))


def test_layout_with_batch_norm():
    model = MLP(SIZES, use_batch_norm=True)
    params, state = model.init(jax.random.key(0))
    assert len(params["layers"]) == len(state["layers"]) == 3
    for i in range(2):
        layer = params["layers"][i]
        assert layer["dense"]["kernel"].shape == (SIZES[i], SIZES[i + 1])
        assert "bias" not in layer["dense"], "batch norm's bias replaces the dense bias"
        assert set(layer["batch_norm"]) == {"scale", "bias"}
        assert set(state["layers"][i]["batch_norm"]) == {"mean", "var"}
    assert set(params["layers"][2]["dense"]) == {"kernel", "bias"}
    assert "batch_norm" not in params["layers"][2]
    assert state["layers"][2] == {}


def test_layout_without_batch_norm():
    model = MLP(SIZES, use_batch_norm=False)
    params, state = model.init(jax.random.key(0))
    for i, layer in enumerate(params["layers"]):
        assert set(layer) == {"dense"}
        assert layer["dense"]["bias"].shape == (SIZES[i + 1],)
    assert state == {"layers": [{}, {}, {}]}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_forward_without_batch_norm_matches_numpy(activation):
    model = MLP(SIZES, activation=activation, use_batch_norm=False)
    params, state = model.init(jax.random.key(0))
    # Non-zero biases, so that a forgotten bias would show.
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1, params)
    x = _x()
    np_act = {
        "relu": lambda v: np.maximum(v, 0),
        "tanh": np.tanh,
    }[activation]
    h = x.astype(np.float64)
    for i, layer in enumerate(params["layers"]):
        h = h @ np.asarray(layer["dense"]["kernel"], np.float64) + np.asarray(
            layer["dense"]["bias"], np.float64
        )
        if i < len(params["layers"]) - 1:
            h = np_act(h)
    logits, new_state = model.apply(params, state, x, training=True)
    np.testing.assert_allclose(logits, h, rtol=1e-5, atol=1e-5)
    assert new_state == state


def test_pre_activations_are_normalized_in_training():
    model = MLP(SIZES, activation="sigmoid")
    params, state = model.init(jax.random.key(0))
    pre = jax.jit(functools.partial(model.pre_activations, training=True))(params, state, _x(64))
    assert [p.shape for p in pre] == [(64, 7), (64, 6)]
    for p in pre:  # scale 1 and bias 0 at init: zero mean, unit variance per unit
        np.testing.assert_allclose(p.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(p.var(axis=0), 1.0, rtol=1e-3)


def test_training_updates_state_evaluation_uses_it():
    model = MLP(SIZES, momentum=0.5)
    params, state = model.init(jax.random.key(0))
    x = _x(16)
    _, trained_state = model.apply(params, state, x, training=True)
    bn0, bn0_new = state["layers"][0]["batch_norm"], trained_state["layers"][0]["batch_norm"]
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    batch_mean = (x.astype(np.float64) @ kernel).mean(axis=0)
    np.testing.assert_allclose(bn0_new["mean"], 0.5 * bn0["mean"] + 0.5 * batch_mean, atol=1e-6)

    logits, eval_state = model.apply(params, trained_state, x, training=False)
    jax.tree.map(np.testing.assert_array_equal, eval_state, trained_state)
    # Running statistics: an example's logits do not depend on the rest of the batch.
    alone, _ = model.apply(params, trained_state, x[:1], training=False)
    np.testing.assert_allclose(alone, logits[:1], rtol=1e-5, atol=1e-6)
    with_batch, _ = model.apply(params, trained_state, x, training=True)
    assert not np.allclose(with_batch, logits, atol=1e-3)


def _reference_mlp_logits(model, params, x):
    """The same network written independently, with reference.batch_norm."""
    act = ACTIVATIONS[model.activation]
    h = x
    for i, layer in enumerate(params["layers"]):
        h = h @ layer["dense"]["kernel"]
        if "batch_norm" in layer:
            bn = layer["batch_norm"]
            h, _, _ = reference.batch_norm(h, bn["scale"], bn["bias"], eps=model.eps)
        if "bias" in layer["dense"]:
            h = h + layer["dense"]["bias"]
        if i < len(params["layers"]) - 1:
            h = act(h)
    return h


def test_gradients_match_reference_batch_norm():
    model = MLP(SIZES, activation="sigmoid")
    params, state = model.init(jax.random.key(0))
    # Move scale and bias away from 1 and 0 so that their gradients are generic.
    params = jax.tree.map(lambda p: np.asarray(p) + 0.3 * normal(2, p.shape), params)
    x = _x(12)
    labels = np.random.default_rng(3).integers(0, SIZES[-1], 12, dtype=np.int32)

    def loss_custom(params, x):
        logits, _ = model.apply(params, state, x, training=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def loss_ref(params, x):
        logits = _reference_mlp_logits(model, params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    (l1, (g1, gx1)) = jax.jit(jax.value_and_grad(loss_custom, argnums=(0, 1)))(params, x)
    (l2, (g2, gx2)) = jax.jit(jax.value_and_grad(loss_ref, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), g1, g2)
    np.testing.assert_allclose(gx1, gx2, rtol=2e-4, atol=2e-6)
    assert float(jnp.abs(gx1).max()) > 1e-4  # a real, non-vanishing gradient was compared


def test_model_is_hashable_and_jittable():
    model = MLP(SIZES)
    params, state = model.init(jax.random.key(0))
    apply = jax.jit(MLP.apply, static_argnums=0, static_argnames="training")
    logits, _ = apply(model, params, state, _x(), training=True)
    direct, _ = model.apply(params, state, _x(), training=True)
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-6)
    assert hash(model) == hash(MLP(SIZES))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"layer_sizes": [5, 3]}, TypeError, "layer_sizes must be a tuple"),
        ({"layer_sizes": (5,)}, ValueError, "layer_sizes must hold at least two"),
        ({"layer_sizes": (5, 0, 3)}, ValueError, r"got \(5, 0, 3\)"),
        ({"layer_sizes": (5, 3), "activation": "swish2"}, ValueError, "'swish2'"),
        ({"layer_sizes": (5, 4, 3), "momentum": 1.5}, ValueError, "momentum"),
        ({"layer_sizes": (5, 4, 3), "init_stddev": 0.0}, ValueError, "init_stddev"),
    ],
    ids=["list", "too-short", "zero-width", "activation", "momentum", "init-stddev"],
)
def test_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        MLP(**kwargs)


NO_BN = {
    "mlp": lambda **kw: MLP(SIZES, use_batch_norm=False, **kw),
    "cnn": lambda **kw: CNN(2, (4, 6), 3, use_batch_norm=False, **kw),
}
BN_ONLY = [
    ({"debias": True}, ValueError, "debias=True needs use_batch_norm=True"),
    ({"frozen": True}, ValueError, "frozen=True needs use_batch_norm=True"),
    (
        {"fuse_activation": True, "activation": "leaky_relu"},
        ValueError,
        "fuse_activation=True needs use_batch_norm=True",
    ),
    ({"frozen": 1}, TypeError, "frozen must be a bool"),
]


@pytest.mark.parametrize("kwargs, error, match", BN_ONLY, ids=["debias", "frozen", "fuse", "type"])
@pytest.mark.parametrize("model", NO_BN.values(), ids=NO_BN.keys())
def test_a_batch_norm_option_without_batch_norm_is_refused_by_both_models(
    model, kwargs, error, match
):
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_fold_gives_the_same_outputs_as_evaluation_mode():
    model = MLP((8, 16, 16, 3), activation="tanh")
    params, state = model.init(jax.random.key(0))
    train = jax.jit(functools.partial(model.apply, training=True))
    # A few training batches so the running statistics and the params are not trivial.
    for seed in (1, 2, 3):
        _, state = train(params, state, 3.0 * normal(seed, (32, 8)) + 1)
    params = jax.tree.map(lambda v: np.asarray(v) * 1.3 + 0.1, params)
    x = normal(4, (20, 8))
    folded, fparams, fstate = model.fold(params, state)
    assert not folded.use_batch_norm
    assert all("batch_norm" not in layer for layer in fparams["layers"])
    want = jax.jit(functools.partial(model.apply, training=False))(params, state, x)[0]
    got = jax.jit(functools.partial(folded.apply, training=False))(fparams, fstate, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_fold_of_a_debiased_frozen_model_drops_the_batch_norm_options():
    model = MLP(SIZES, debias=True, frozen=True)
    folded, _, _ = model.fold(*_params_of(model))
    assert not (folded.use_batch_norm or folded.debias or folded.frozen)


def test_bad_input_shape():
    model = MLP(SIZES)
    params, state = model.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"x must have shape \[batch, 5\].*got \(4, 6\)"):
        model.apply(params, state, np.ones((4, 6), np.float32), training=True)
    with pytest.raises(TypeError, match="training must be a Python bool"):
        model.apply(params, state, np.ones((4, 5), np.float32), training=1)


def _params_of(model):
    return model.init(jax.random.key(0))


@pytest.mark.parametrize(
    ("other", "use_state_of", "error", "match"),
    [
        (
            MLP((5, 9, 6, 3)),
            "other",
            ValueError,
            r"params\['layers'\]\[0\]\['batch_norm'\]\['bias'\] must have shape \(7,\)"
            r".*got \(9,\)",
        ),
        (
            MLP((5, 7, 6, 3), use_batch_norm=False),
            "other",
            ValueError,
            r"params does not match.*missing params\['layers'\]\[0\]\['batch_norm'\]",
        ),
        (MLP((5, 7, 3)), "other", ValueError, "params has 2 layers, expected 3"),
        (
            MLP((5, 7, 6, 3), use_batch_norm=False),
            "self",
            ValueError,
            r"unexpected params\['layers'\]\[0\]\['dense'\]\['bias'\]",
        ),
        (
            MLP((5, 7, 8, 3)),
            "self",
            ValueError,
            r"params\['layers'\]\[1\]\['batch_norm'\]\['bias'\] must have shape \(6,\)"
            r".*got \(8,\)",
        ),
    ],
    ids=[
        "wider",
        "no-batch-norm",
        "fewer-layers",
        "no-bn-params-with-bn-state",
        "width-of-layer-2",
    ],
)
def test_apply_checks_params_and_state_against_the_config(other, use_state_of, error, match):
    """Params (and state) of another MLP are refused while tracing, naming the entry."""
    model = MLP(SIZES)
    _, own_state = _params_of(model)
    params, state = _params_of(other)
    if use_state_of == "self":
        state = own_state
    with pytest.raises(error, match=match):
        jax.eval_shape(
            lambda p, s: model.apply(p, s, jnp.ones((4, 5)), training=True), params, state
        )


def test_apply_checks_state_against_the_config():
    model = MLP(SIZES)
    params, state = _params_of(model)
    _, no_bn_state = _params_of(MLP(SIZES, use_batch_norm=False))
    with pytest.raises(
        ValueError,
        match=r"state does not match.*missing state\['layers'\]\[0\]\['batch_norm'\]\['mean'\]",
    ):
        model.apply(params, no_bn_state, np.ones((4, 5), np.float32), training=False)
    wide = jax.tree.map(lambda v: np.ones((*v.shape, 1), np.float32), state)
    with pytest.raises(
        ValueError, match=r"state\['layers'\]\[0\]\['batch_norm'\]\['mean'\] must have shape \(7,\)"
    ):
        model.apply(params, wide, np.ones((4, 5), np.float32), training=True)
    with pytest.raises(TypeError, match=r'params must be a dict \{"layers"'):
        model.apply([params], state, np.ones((4, 5), np.float32), training=True)


def test_remat_gives_the_same_training_step():
    """Recomputing each hidden layer in the backward changes memory, not results."""
    from jaxbn import train

    x = normal(1, (30, 6))
    labels = np.arange(30, dtype=np.int32) % 4
    outs = []
    for remat in (False, True):
        model = MLP((6, 16, 16, 4), activation="sigmoid", remat=remat)
        params, state = model.init(jax.random.key(0))
        opt = optax.sgd(0.1)
        step = jax.jit(train.make_train_step(model, opt))
        outs.append(step(params, state, opt.init(params), (x, labels)))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *outs)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP((4, 8, 2), axis_name=["data"]),
        lambda: CNN(1, (4,), 2, axis_name=["data"]),
    ],
    ids=["MLP", "CNN"],
)
def test_model_configs_refuse_unhashable_fields(make):
    with pytest.raises(TypeError, match=r"\.axis_name must be hashable \(a tuple, not a list"):
        make()

"""Every public function under strict dtype promotion and rank promotion "raise".

Careful JAX users (and Equinox's own tests) turn on
``jax_numpy_dtype_promotion="strict"`` and ``jax_numpy_rank_promotion="raise"``;
jaxbn promotes explicitly where it means to, so each entry point works, with
the same results, under both settings. (The framework modules are tested the
same way in tests/test_frameworks.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbn
from jaxbn import reference, stats
from jaxbn.train import evaluate, fit, init_train_state, make_train_loop, make_train_step

KEY = jax.random.key(0)
X = jax.random.normal(KEY, (16, 6)) * 2.0 + 1.0
IMAGES = jax.random.normal(KEY, (8, 6, 6, 2))
LABELS = jnp.arange(16) % 3


def strict(fn):
    """``fn()`` under strict promotion and rank promotion "raise"."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        return fn()


def grads_of(op, x, *params):
    def loss(x, *params):
        y, mean, var = op(x, *params)
        return jnp.sum(jnp.sin(y.astype(jnp.float32))) + jnp.sum(mean) + jnp.sum(var)

    return jax.grad(loss, argnums=tuple(range(1 + len(params))))(x, *params)


C = X.shape[-1]
ONES, ZEROS = jnp.ones(C), jnp.zeros(C)
MASK = jnp.arange(16)[:, None] < 12

CASES = {
    "batch_norm": lambda: grads_of(jaxbn.batch_norm, X, ONES, ZEROS),
    "batch_norm_bf16": lambda: grads_of(jaxbn.batch_norm, X.astype(jnp.bfloat16), ONES, ZEROS),
    "batch_norm_mask": lambda: grads_of(
        functools.partial(jaxbn.batch_norm, mask=MASK), X, ONES, ZEROS
    ),
    "batch_norm_act": lambda: grads_of(jaxbn.batch_norm_act, X, ONES, ZEROS),
    "batch_norm_act_bf16": lambda: grads_of(
        functools.partial(jaxbn.batch_norm_act, activation="elu"),
        X.astype(jnp.bfloat16),
        ONES,
        ZEROS,
    ),
    "reference": lambda: grads_of(reference.batch_norm, X, ONES, ZEROS),
    "batch_stats": lambda: jaxbn.batch_stats(X, mask=MASK),
    "batch_norm_inference": lambda: jaxbn.batch_norm_inference(
        X.astype(jnp.bfloat16), ONES, ZEROS, ZEROS, ONES
    ),
    "fold_into_dense": lambda: jaxbn.fold_into_dense(
        {"kernel": jnp.ones((4, C)), "bias": ZEROS},
        {"scale": ONES},
        {"mean": ONES, "var": ONES},
        eps=1e-5,
    ),
    "fold_into_conv": lambda: jaxbn.fold_into_conv(
        {"kernel": jnp.ones((3, 3, 2, C))}, {"bias": ZEROS}, {"mean": ONES, "var": ONES}, eps=1e-5
    ),
}

LAYERS = {
    "plain": {},
    "bf16_state": {"dtype": jnp.bfloat16, "param_dtype": jnp.bfloat16},
    "debias": {"debias": True},
    "cumulative": {"momentum": None},
    "ghost": {"virtual_batch_size": 4},
    "renorm": {"renorm": True},
    "fused": {"activation": "leaky_relu"},
}

MODELS = {
    "mlp": jaxbn.MLP((C, 8, 8, 3)),
    "mlp_fused": jaxbn.MLP((C, 8, 3), activation="leaky_relu", fuse_activation=True),
    "mlp_no_bn": jaxbn.MLP((C, 8, 3), use_batch_norm=False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op(name):
    jax.tree.map(np.testing.assert_array_equal, strict(CASES[name]), CASES[name]())


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer(name):
    bn = jaxbn.BatchNorm(C, **LAYERS[name])

    def run():
        params, state = bn.init()
        x = X.astype(bn.dtype or jnp.float32)
        (y, new), pull = jax.vjp(lambda p: bn.apply(p, state, x, training=True), params)
        grads = pull((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))
        y_eval, _ = bn.apply(params, new, x, training=False)
        return y, new, grads, y_eval

    jax.tree.map(np.testing.assert_array_equal, strict(run), run())


@pytest.mark.parametrize("name", list(MODELS))
def test_mlp_step_eval_and_fold(name):
    model = MODELS[name]

    def run():
        ts = init_train_state(model, optax.sgd(0.1), KEY)
        step = make_train_step(model, optax.sgd(0.1))
        params, state, _, metrics = step(ts.params, ts.state, ts.opt_state, (X, LABELS))
        folded, f_params, f_state = model.fold(params, state)
        logits, _ = folded.apply(f_params, f_state, X, training=False)
        return params, state, metrics, logits, evaluate(model, params, state, X, LABELS)

    jax.tree.map(np.testing.assert_array_equal, strict(run), run())


def test_cnn_step_and_fold():
    model = jaxbn.CNN(2, (4, 8), 3, pooling="max")

    def run():
        ts = init_train_state(model, optax.sgd(0.1), KEY)
        loop = make_train_loop(model, optax.sgd(0.1), batch_size=4)
        ts, metrics = loop(ts, IMAGES, LABELS[:8], 2)
        folded, f_params, f_state = model.fold(ts.params, ts.state)
        return ts.params, metrics, folded.apply(f_params, f_state, IMAGES, training=False)[0]

    jax.tree.map(np.testing.assert_array_equal, strict(run), run())


def test_precise_stats():
    model = MODELS["mlp"]

    def run():
        params, state = model.init(KEY)
        return stats.precise_stats(model, params, state, [X[:8], X[8:]])

    jax.tree.map(np.testing.assert_array_equal, strict(run), run())


def test_fit():
    model = MODELS["mlp"]

    def run():
        ts = fit(model, optax.sgd(0.1), X, LABELS, steps=4, batch_size=8, key=KEY)
        return ts.params

    jax.tree.map(np.testing.assert_array_equal, strict(run), run())

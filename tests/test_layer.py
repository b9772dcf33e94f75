"""The BatchNorm layer: init, train/eval, running statistics, composition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn


def data(shape=(32, 5), seed=0, offset=3.0):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape) + offset


def test_init_needs_no_mode_and_gives_flax_names():
    bn = jaxbn.BatchNorm(5)
    params, state = bn.init()
    assert set(params) == {"scale", "bias"} and set(state) == {"mean", "var"}
    np.testing.assert_array_equal(params["scale"], np.ones(5))
    np.testing.assert_array_equal(params["bias"], np.zeros(5))
    np.testing.assert_array_equal(state["mean"], np.zeros(5))
    np.testing.assert_array_equal(state["var"], np.ones(5))
    assert all(v.dtype == jnp.float32 for v in (*params.values(), *state.values()))
    p16, s16 = bn.init(jnp.bfloat16)
    # Params in the requested dtype; running averages never below float32.
    assert p16["scale"].dtype == jnp.bfloat16 and s16["var"].dtype == jnp.float32
    params, _ = jaxbn.BatchNorm(5, use_scale=False, use_bias=False).init()
    assert params == {}


def test_config_is_hashable_and_static():
    bn = jaxbn.BatchNorm(5, momentum=0.9)
    assert hash(bn) == hash(jaxbn.BatchNorm(5, momentum=0.9))
    params, state = bn.init()

    @jax.jit
    def step(params, state, x):
        return bn.apply(params, state, x, training=True)

    f = jax.jit(lambda layer, p, s, x: layer.apply(p, s, x, training=False), static_argnums=0)
    y, _ = step(params, state, data())
    y2, _ = f(bn, params, state, data())
    assert y.shape == y2.shape == (32, 5)


def test_training_uses_batch_statistics_and_updates_running_averages():
    bn = jaxbn.BatchNorm(5, momentum=0.9)
    params, state = bn.init()
    x = data()
    y, new_state = bn.apply(params, state, x, training=True)
    xn = np.asarray(x, np.float64)
    np.testing.assert_allclose(
        y, (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5), rtol=1e-5, atol=1e-5
    )
    # momentum * old + (1 - momentum) * batch (biased batch variance).
    np.testing.assert_allclose(new_state["mean"], 0.1 * xn.mean(0), rtol=1e-5)
    np.testing.assert_allclose(new_state["var"], 0.9 + 0.1 * xn.var(0), rtol=1e-5)


def test_running_averages_over_many_steps_match_numpy():
    bn = jaxbn.BatchNorm(4, momentum=0.8)
    params, state = bn.init()
    mean, var = np.zeros(4), np.ones(4)
    step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
    for i in range(6):
        x = data((16, 4), seed=i, offset=float(i))
        state = step(state, x)
        xn = np.asarray(x, np.float64)
        mean = 0.8 * mean + 0.2 * xn.mean(0)
        var = 0.8 * var + 0.2 * xn.var(0)
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(state["var"], var, rtol=1e-5)


def test_evaluation_uses_running_statistics_and_keeps_state():
    bn = jaxbn.BatchNorm(5)
    params = {"scale": jnp.arange(1.0, 6.0), "bias": jnp.full(5, 0.5)}
    state = {"mean": jnp.linspace(-1, 1, 5), "var": jnp.linspace(0.5, 2, 5)}
    x = data()
    y, new_state = bn.apply(params, state, x, training=False)
    jax.tree.map(np.testing.assert_array_equal, new_state, state)
    want = (np.asarray(x) - np.asarray(state["mean"])) / np.sqrt(
        np.asarray(state["var"]) + 1e-5
    ) * np.arange(1, 6) + 0.5
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    # Evaluation of a single example works (no batch statistics needed).
    y1, _ = bn.apply(params, state, x[:1], training=False)
    np.testing.assert_allclose(y1, y[:1], rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_no_gradient_flows_into_state(training):
    bn = jaxbn.BatchNorm(5)
    params, state = bn.init()
    x = data()
    c = jax.random.normal(jax.random.key(1), x.shape)

    def loss(params, state):
        y, new_state = bn.apply(params, state, x, training=training)
        return jnp.sum(y * c) + sum(jnp.sum(v) for v in new_state.values())

    g_params, g_state = jax.grad(loss, argnums=(0, 1))(params, state)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in g_state.values())
    assert float(jnp.abs(g_params["scale"]).max()) > 0


def test_training_step_recipe_with_has_aux():
    """The README recipe: loss returns (value, new_state); grads only for params."""
    bn = jaxbn.BatchNorm(5, momentum=0.5)
    params, state = bn.init()
    x, target = data(), data(seed=2, offset=0.0)

    def loss_fn(params, state):
        y, new_state = bn.apply(params, state, x, training=True)
        return jnp.mean((y - target) ** 2), new_state

    (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state)

    def ref_loss(params):
        y = jaxbn.reference.batch_norm(x, params["scale"], params["bias"])[0]
        return jnp.mean((y - target) ** 2)

    np.testing.assert_allclose(loss, ref_loss(params), rtol=1e-6)
    want = jax.grad(ref_loss)(params)
    for k in grads:
        np.testing.assert_allclose(grads[k], want[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(new_state["mean"], state["mean"])


def test_nchw_and_tuple_axes():
    x = data((8, 3, 4, 4))
    bn = jaxbn.BatchNorm(3, axis=1)
    params, state = bn.init()
    y, new_state = bn.apply(params, state, x, training=True)
    assert new_state["mean"].shape == (3,)
    y_nhwc, _ = jaxbn.BatchNorm(3).apply(
        params, state, jnp.transpose(x, (0, 2, 3, 1)), training=True
    )
    np.testing.assert_allclose(jnp.transpose(y, (0, 2, 3, 1)), y_nhwc, rtol=1e-5, atol=1e-5)
    bn2 = jaxbn.BatchNorm((3, 4), axis=(1, 2))
    p2, s2 = bn2.init()
    y2, s2 = bn2.apply(p2, s2, x, training=True)
    assert s2["var"].shape == (3, 4) and y2.shape == x.shape


def test_bfloat16_input_keeps_float32_state():
    bn = jaxbn.BatchNorm(5)
    params, state = bn.init()
    y, new_state = bn.apply(params, state, data().astype(jnp.bfloat16), training=True)
    assert y.dtype == jnp.bfloat16
    assert new_state["mean"].dtype == new_state["var"].dtype == jnp.float32


def test_layer_under_vmap_and_scan():
    bn = jaxbn.BatchNorm(5, momentum=0.5)
    params, state = bn.init()
    xs = data((3, 16, 5))

    def body(state, x):
        y, state = bn.apply(params, state, x, training=True)
        return state, y

    final, ys = jax.lax.scan(body, state, xs)
    s = state
    for i in range(3):
        _, s = bn.apply(params, s, xs[i], training=True)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), final, s)
    y_v, s_v = jax.vmap(lambda x: bn.apply(params, state, x, training=True))(xs)
    np.testing.assert_allclose(y_v, ys, rtol=1e-5, atol=1e-6)
    assert s_v["mean"].shape == (3, 5)


@pytest.mark.parametrize(
    "options", [{"debias": True}, {"momentum": None}], ids=["debias", "cumulative"]
)
def test_update_count_saturates_instead_of_overflowing(options):
    bn = jaxbn.BatchNorm(3, **options)
    params, state = bn.init()
    state = {**state, "count": jnp.asarray(np.iinfo(np.int32).max, jnp.int32)}
    x = jax.random.normal(jax.random.key(0), (8, 3)) + 2.0
    _, new = bn.apply(params, state, x, training=True)
    assert int(new["count"]) == np.iinfo(np.int32).max
    assert np.isfinite(np.asarray(new["mean"])).all() and np.isfinite(np.asarray(new["var"])).all()
    # There the debiased average is the plain moving average (m^t = 0), and the
    # cumulative one hardly moves (a weight of 2^-31).
    take = 0.0 if bn.momentum is None else 1.0 - bn.momentum
    want = (1.0 - take) * state["mean"] + take * np.mean(np.asarray(x), axis=0)
    np.testing.assert_allclose(new["mean"], want, rtol=1e-6, atol=1e-6)

"""The BatchNorm layer (jaxbn/layer.py): init, train/eval, running statistics, options.

Each option's values and gradients are compared with ``jax.grad`` of the reference
op extended with the same option (written here in plain ``jnp``), with finite
differences in float64, and PyTorch's running statistics with PyTorch itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference
from tests._op_cases import normal, traced

RTOL, ATOL = 2e-5, 2e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def data(shape=(32, 5), seed=0, offset=1.0):
    """float32 NumPy values ``~ N(offset, 2^2)``: test inputs are drawn with NumPy."""
    return 2.0 * normal(seed, shape) + offset


def random_params(bn, seed=1):
    _, state = bn.init()
    scale, bias = normal(seed, (2, *bn.feature_shape))  # one draw: independent values
    params = {"scale": 1.0 + 0.3 * scale, "bias": bias}
    return params, state


def grads_of(apply, params, x, ct):
    """Gradients of <y, ct> with respect to params and x (compiled: one program)."""
    return jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) * ct), argnums=(0, 1)))(params, x)


def running_var(bn, x, mask=None):
    """The running variance after one step from zero with momentum 0: the batch's own."""
    params, state = bn.init()
    _, new_state = bn.apply(params, state, x, training=True, mask=mask)
    return np.asarray(new_state["var"], np.float64)


def float64_grads_check(bn, params, state, x, ct):
    """``check_grads`` of ``<apply(x), ct>`` in float64, order 2 (finite differences)."""
    with jax.enable_x64(True):
        p64, s64, x64, c64 = jax.tree.map(
            lambda v: jnp.asarray(np.asarray(v), jnp.float64), (params, state, x, ct)
        )

        def f(p, x):
            return jnp.sum(bn.apply(p, s64, x, training=True)[0] * c64)

        check_grads(jax.jit(f), (p64, x64), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


# --- init, train, eval, state ------------------------------------------------------


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
    """y from the batch statistics; momentum * old + (1 - momentum) * batch, step by step."""
    bn = jaxbn.BatchNorm(4, momentum=0.8)
    params, state = bn.init()
    mean, var = np.zeros(4), np.ones(4)
    step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True))
    for i in range(4):
        x = data((16, 4), seed=i, offset=float(i))
        y, state = step(state, x)
        xn = np.asarray(x, np.float64)
        if i == 0:
            want = (xn - xn.mean(0)) / np.sqrt(xn.var(0) + 1e-5)
            np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        # The biased batch variance.
        mean = 0.8 * mean + 0.2 * xn.mean(0)
        var = 0.8 * var + 0.2 * xn.var(0)
        np.testing.assert_allclose(state["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(state["var"], var, rtol=1e-5)


def test_evaluation_uses_running_statistics_and_keeps_state():
    bn = jaxbn.BatchNorm(5)
    params = {"scale": np.arange(1.0, 6.0, dtype=np.float32), "bias": np.full(5, 0.5, np.float32)}
    state = {
        "mean": np.linspace(-1, 1, 5, dtype=np.float32),
        "var": np.linspace(0.5, 2, 5, dtype=np.float32),
    }
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
    c = normal(1, x.shape)

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
        params, state, np.transpose(x, (0, 2, 3, 1)), training=True
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
    x = normal(0, (8, 3)) + 2.0
    _, new = bn.apply(params, state, x, training=True)
    assert int(new["count"]) == np.iinfo(np.int32).max
    assert np.isfinite(np.asarray(new["mean"])).all() and np.isfinite(np.asarray(new["var"])).all()
    # There the debiased average is the plain moving average (m^t = 0), and the
    # cumulative one hardly moves (a weight of 2^-31).
    take = 0.0 if bn.momentum is None else 1.0 - bn.momentum
    want = (1.0 - take) * np.asarray(state["mean"]) + take * np.mean(x, axis=0)
    np.testing.assert_allclose(new["mean"], want, rtol=1e-6, atol=1e-6)


# --- the counts behind the unbiased running variance -----------------------------


def test_ghost_unbiased_variance_is_the_mean_of_each_groups_unbiased_variance():
    groups = 4
    x = np.random.default_rng(0).normal(2.0, 3.0, (16, 5)).astype(np.float32)
    bn = jaxbn.BatchNorm(
        5, momentum=0.0, virtual_batch_size=16 // groups, unbiased_running_var=True
    )
    want = np.mean([g.var(0, ddof=1) for g in np.split(x.astype(np.float64), groups)], 0)
    np.testing.assert_allclose(running_var(bn, x), want, rtol=1e-5)
    # The biased one, as a control that the correction is the group's n / (n - 1).
    biased = jaxbn.BatchNorm(5, momentum=0.0, virtual_batch_size=16 // groups)
    k = 16 // groups
    np.testing.assert_allclose(running_var(biased, x) * k / (k - 1), want, rtol=1e-5)


def test_a_mask_over_some_of_the_feature_axes_gives_each_feature_its_own_count():
    # x [N, C, W] with features (C, W); the mask varies along C only: [N, C, 1].
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, (10, 3, 4)).astype(np.float32)
    mask = rng.random((10, 3, 1)) > 0.3
    assert len({int(n) for n in mask.sum(0).ravel()}) > 1  # the counts differ per C
    bn = jaxbn.BatchNorm((3, 4), axis=(1, 2), momentum=0.0, unbiased_running_var=True)
    got = running_var(bn, x, jnp.asarray(mask))
    xd = x.astype(np.float64)
    want = np.stack([xd[mask[:, c, 0], c, :].var(0, ddof=1) for c in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The layer's mean agrees with the op's statistics under the same mask.
    _, mean, _ = jaxbn.batch_norm(x, None, None, axis=(1, 2), mask=mask)
    params, state = bn.init()
    _, new_state = bn.apply(params, state, x, training=True, mask=mask)
    np.testing.assert_allclose(new_state["mean"], mean, rtol=1e-6, atol=1e-6)


# --- precision policy -------------------------------------------------------------


@pytest.mark.parametrize(
    ("x_dtype", "dtype"),
    [
        (jnp.bfloat16, None),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.bfloat16),
        (jnp.float32, jnp.bfloat16),
    ],
    ids=["bf16-in", "bf16-in-f32-out", "f16-in-bf16-out", "f32-in-bf16-out"],
)
def test_precision_policy(x_dtype, dtype):
    bn = jaxbn.BatchNorm(6, dtype=dtype, param_dtype=jnp.float32)
    params, state = random_params(bn)
    x = data((32, 6), offset=4.0).astype(x_dtype)
    ct = data((32, 6), seed=3)
    out_dtype = x_dtype if dtype is None else dtype

    def apply(p, x):
        return bn.apply(p, state, x, training=True)[0]

    y, new_state = bn.apply(params, state, x, training=True)
    assert y.dtype == out_dtype
    assert all(v.dtype == jnp.float32 for v in new_state.values())
    g_params, g_x = grads_of(apply, params, x, ct.astype(out_dtype))
    assert g_x.dtype == x_dtype
    assert all(v.dtype == jnp.float32 for v in g_params.values())
    # Error against float32 computed on the same (rounded) input, rounded to the output dtype.
    y32 = reference.batch_norm(x.astype(jnp.float32), params["scale"], params["bias"])[0]
    ulp = float(jnp.finfo(out_dtype).eps)
    err = np.abs(np.asarray(y, np.float32) - np.asarray(y32.astype(out_dtype), np.float32))
    # One rounding to the output dtype, plus float32 arithmetic differences.
    assert err.max() <= (ulp + 1e-5) * float(jnp.abs(y32).max())
    g32 = grads_of(
        lambda p, x: reference.batch_norm(x, p["scale"], p["bias"])[0],
        params,
        x.astype(jnp.float32),
        ct.astype(out_dtype).astype(jnp.float32),
    )
    close(g_params, g32[0], rtol=1e-4, atol=1e-3)
    gx_tol = (2 * float(jnp.finfo(x_dtype).eps) + 1e-5) * float(jnp.abs(g32[1]).max())
    np.testing.assert_allclose(np.asarray(g_x, np.float32), g32[1], atol=gx_tol)


def test_params_follow_param_dtype_and_state_stays_float32():
    bn = jaxbn.BatchNorm(4, param_dtype=jnp.bfloat16, momentum=0.99)
    params, state = bn.init()
    assert all(v.dtype == jnp.bfloat16 for v in params.values())
    assert all(v.dtype == jnp.float32 for v in state.values())
    xs = 1.2 * normal(0, (300, 64, 4))  # 300 batches

    def step(state, x):
        y, state = bn.apply(params, state, x, training=True)
        return state, y

    state, ys = jax.lax.scan(step, state, xs)
    y = ys[-1]
    assert y.dtype == jnp.float32 and state["var"].dtype == jnp.float32
    # 1 - 0.99^300 = 95% of the way from 1 to 1.44: a bfloat16 average would stall near 1.
    np.testing.assert_allclose(state["var"], 1.0 + 0.95 * 0.44, rtol=0.05)


# --- ghost batch norm -------------------------------------------------------------


def ghost_reference(x, scale, bias, k, axis=-1):
    """Each group of k examples normalized by the reference op on its own."""
    groups = [
        reference.batch_norm(x[i : i + k], scale, bias, axis=axis) for i in range(0, len(x), k)
    ]
    y = jnp.concatenate([g[0] for g in groups])
    return (
        y,
        jnp.mean(jnp.stack([g[1] for g in groups]), 0),
        jnp.mean(jnp.stack([g[2] for g in groups]), 0),
    )


@pytest.mark.parametrize(
    ("shape", "axis", "k"), [((24, 5), -1, 8), ((12, 3, 4, 4), 1, 4)], ids=["NC", "NCHW"]
)
def test_ghost_batch_norm_values_grads_and_running_stats(shape, axis, k):
    bn = jaxbn.BatchNorm(shape[axis], axis=axis, virtual_batch_size=k, momentum=0.5)
    params, state = random_params(bn)
    x, ct = data(shape), data(shape, seed=4)
    y, new_state = bn.apply(params, state, x, training=True)
    y_ref, mean_ref, var_ref = ghost_reference(x, params["scale"], params["bias"], k, axis)
    close(y, y_ref)
    close(new_state["mean"], 0.5 * mean_ref)
    close(new_state["var"], 0.5 + 0.5 * var_ref)

    got = grads_of(lambda p, x: bn.apply(p, state, x, training=True)[0], params, x, ct)
    want = grads_of(
        lambda p, x: ghost_reference(x, p["scale"], p["bias"], k, axis)[0], params, x, ct
    )
    close(got, want)
    # Groups differ from the whole batch: ghost batch norm is not plain batch norm.
    assert not np.allclose(
        y, reference.batch_norm(x, params["scale"], params["bias"], axis=axis)[0]
    )


def test_ghost_batch_norm_finite_differences():
    bn = jaxbn.BatchNorm(3, virtual_batch_size=4)
    params, state = random_params(bn)
    float64_grads_check(bn, params, state, data((8, 3)), data((8, 3), seed=5))


def test_ghost_batch_norm_with_mask_equals_kept_rows_per_group():
    bn = jaxbn.BatchNorm(3, virtual_batch_size=4)
    params, state = random_params(bn)
    x = data((8, 3))
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    y, _ = bn.apply(params, state, x, training=True, mask=mask)
    y0 = reference.batch_norm(x[:3], params["scale"], params["bias"])[0]
    y1 = reference.batch_norm(x[4:], params["scale"], params["bias"])[0]
    close(y[:3], y0)
    close(y[4:], y1)


def test_ghost_batch_norm_bad_batch_size_names_both_numbers():
    bn = jaxbn.BatchNorm(3, virtual_batch_size=4)
    params, state = bn.init()
    with pytest.raises(ValueError, match=r"batch size 10 .* virtual_batch_size=4"):
        bn.apply(params, state, np.ones((10, 3), np.float32), training=True)
    with pytest.raises(ValueError, match="virtual_batch_size must be an int >= 2"):
        jaxbn.BatchNorm(3, virtual_batch_size=0)
    with pytest.raises(ValueError, match="cannot be combined"):
        jaxbn.BatchNorm(3, virtual_batch_size=4, renorm=True)


# --- batch renormalization --------------------------------------------------------


def renorm_reference(x, scale, bias, run_mean, run_var, rmax, dmax, eps=1e-5):
    """Ioffe (2017), Algorithm 1, in plain jnp: r and d are stop-gradient."""
    mean_b = jnp.mean(x, 0)
    std_b = jnp.sqrt(jnp.mean((x - mean_b) ** 2, 0) + eps)
    run_std = jnp.sqrt(run_var + eps)
    r = jax.lax.stop_gradient(jnp.clip(std_b / run_std, 1 / rmax, rmax))
    d = jax.lax.stop_gradient(jnp.clip((mean_b - run_mean) / run_std, -dmax, dmax))
    return ((x - mean_b) / std_b * r + d) * scale + bias


@pytest.mark.parametrize(
    "clipping", [(1.0, 0.0), (1.5, 0.5), (100.0, 100.0)], ids=["bn", "clipped", "free"]
)
def test_batch_renorm_values_and_grads(clipping):
    bn = jaxbn.BatchNorm(5, renorm=True, renorm_clipping=clipping, renorm_momentum=0.5)
    params, state = random_params(bn)
    state["renorm_mean"] = np.linspace(-1.0, 2.0, 5, dtype=np.float32)
    state["renorm_var"] = np.linspace(0.5, 6.0, 5, dtype=np.float32)
    x, ct = data((16, 5)), data((16, 5), seed=6)
    rmax, dmax = clipping

    def ref(p, x):
        return renorm_reference(
            x, p["scale"], p["bias"], state["renorm_mean"], state["renorm_var"], rmax, dmax
        )

    y, new_state = bn.apply(params, state, x, training=True)
    close(y, ref(params, x))
    close(
        grads_of(lambda p, x: bn.apply(p, state, x, training=True)[0], params, x, ct),
        grads_of(ref, params, x, ct),
    )
    xn = np.asarray(x, np.float64)
    close(new_state["renorm_mean"], 0.5 * np.asarray(state["renorm_mean"]) + 0.5 * xn.mean(0))
    close(new_state["renorm_var"], 0.5 * np.asarray(state["renorm_var"]) + 0.5 * xn.var(0))
    if clipping == (1.0, 0.0):  # r = 1, d = 0: plain batch norm
        close(y, reference.batch_norm(x, params["scale"], params["bias"])[0])


def test_batch_renorm_clipping_scheduled_per_step_under_jit():
    bn = jaxbn.BatchNorm(5, renorm=True)
    params, state = random_params(bn)
    state["renorm_var"] = np.full(5, 9.0, np.float32)
    x = data((16, 5))

    @jax.jit
    def step(state, rmax, dmax):
        return bn.apply(params, state, x, training=True, renorm_clipping=(rmax, dmax))[0]

    for rmax, dmax in [(1.0, 0.0), (2.0, 1.0)]:
        want = renorm_reference(x, params["scale"], params["bias"], 0.0, 9.0, rmax, dmax)
        close(step(state, rmax, dmax), want)
    with pytest.raises(ValueError, match="renorm=False"):
        jaxbn.BatchNorm(5).apply(params, state, x, training=True, renorm_clipping=(1.0, 0.0))


def test_batch_renorm_finite_differences():
    """Where r and d sit at their clipping bounds they are locally constant, so the
    stop-gradient rule is the true derivative and finite differences apply. (Where
    they are not clipped, the paper's gradient deliberately differs from the
    derivative of the forward; the test against the reference above covers it.)"""
    bn = jaxbn.BatchNorm(3, renorm=True, renorm_clipping=(1.5, 0.5))
    params, state = random_params(bn)
    state["renorm_mean"] = np.array([50.0, -50.0, 50.0], np.float32)
    state["renorm_var"] = np.array([100.0, 0.01, 100.0], np.float32)
    float64_grads_check(bn, params, state, data((8, 3)), data((8, 3), seed=7))


# --- PyTorch-compatible running statistics ----------------------------------------


def test_unbiased_running_var_and_cumulative_average_against_numpy():
    bn = jaxbn.BatchNorm(4, momentum=None, unbiased_running_var=True)
    params, state = bn.init()
    assert int(state["count"]) == 0
    batches = [data((n, 4), seed=i, offset=float(i)) for i, n in enumerate([5, 9, 7])]
    step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
    for x in batches:
        state = step(state, x)
    xs = [np.asarray(x, np.float64) for x in batches]
    close(state["mean"], np.mean([x.mean(0) for x in xs], 0))
    close(state["var"], np.mean([x.var(0, ddof=1) for x in xs], 0))
    assert int(state["count"]) == 3


def test_like_torch_translates_momentum():
    bn = jaxbn.BatchNorm.like_torch(4, momentum=0.1)
    assert (bn.momentum, bn.axis, bn.unbiased_running_var) == (pytest.approx(0.9), 1, True)
    assert jaxbn.BatchNorm.like_torch(4, momentum=None).momentum is None


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("shape", [(16, 4), (6, 4, 5, 5)], ids=["N,C", "NCHW"])
def test_matches_torch_functional_batch_norm(momentum, shape):
    torch = pytest.importorskip("torch")
    bn = jaxbn.BatchNorm.like_torch(4, momentum=momentum)
    params, state = random_params(bn)
    run_mean, run_var = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    w = torch.tensor(np.asarray(params["scale"], np.float64), requires_grad=True)
    b = torch.tensor(np.asarray(params["bias"], np.float64), requires_grad=True)

    def loss(p, s, x, ct):
        y, new_state = bn.apply(p, s, x, training=True)
        return jnp.sum(y * ct), (y, new_state)

    step = jax.jit(jax.grad(loss, argnums=(0, 2), has_aux=True))
    for i in range(4):
        x = data(shape, seed=10 + i, offset=float(i))
        ct = data(shape, seed=20 + i)
        (gp, gx), (y, state) = step(params, state, x, ct)
        # torch's momentum=None: exponential_average_factor = 1 / num_batches_tracked.
        factor = 1.0 / (i + 1) if momentum is None else momentum
        xt = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
        yt = torch.nn.functional.batch_norm(xt, run_mean, run_var, w, b, True, factor, 1e-5)
        yt.backward(torch.tensor(np.asarray(ct, np.float64)))
        close(y, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        close(state["mean"], run_mean.numpy(), rtol=1e-5, atol=1e-6)
        close(state["var"], run_var.numpy(), rtol=1e-5, atol=1e-6)
        close(gx, xt.grad.numpy(), rtol=1e-4, atol=1e-5)
        close((gp["scale"], gp["bias"]), (w.grad.numpy(), b.grad.numpy()), rtol=1e-4, atol=1e-4)
        w.grad, b.grad = None, None


# Bad input: a clear error naming the argument, raised while tracing.

x43 = np.ones((4, 3), np.float32)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_features": 0}, ValueError, "num_features must be a positive int"),
        ({"num_features": 3, "momentum": 1.5}, ValueError, r"momentum must be in \[0, 1\]"),
        ({"num_features": 3, "momentum": -0.1}, ValueError, r"momentum must be in \[0, 1\]"),
        ({"num_features": 3, "eps": 0.0}, ValueError, "eps must be > 0"),
        ({"num_features": (3, 4)}, ValueError, "one size per feature axis"),
        ({"num_features": 3, "axis": [1]}, TypeError, "not lists"),
        ({"num_features": 3, "param_dtype": jnp.int32}, TypeError, "param_dtype"),
        ({"num_features": 3, "eps": float("inf")}, ValueError, "eps must be finite"),
        ({"num_features": 3, "axis_name": 5}, TypeError, "axis_name must be None, a str"),
        ({"num_features": 3, "renorm_clipping": ("a", 1.0)}, TypeError, "two real numbers"),
        ({"num_features": 3, "renorm_clipping": (float("nan"), 1.0)}, ValueError, "rmax >= 1"),
        ({"num_features": 1.5}, ValueError, "num_features must be a positive int"),
        ({"num_features": None}, ValueError, "num_features must be a positive int"),
        # A frozen config is hashed by jax.jit: a list would fail far from its cause.
        (
            {"num_features": 3, "axis_name": ["data"]},
            TypeError,
            r"BatchNorm.axis_name must be hashable",
        ),
        (
            {"num_features": 3, "renorm": True, "renorm_clipping": [3.0, 5.0]},
            TypeError,
            r"BatchNorm.renorm_clipping must be hashable \(a tuple, not a list",
        ),
    ],
)
def test_layer_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.BatchNorm(**kwargs)


def test_layer_apply_errors():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    with pytest.raises(ValueError, match=r"x has \(5,\) features.*num_features=3"):
        traced(lambda x: bn.apply(params, state, x, training=True), np.ones((4, 5), np.float32))
    with pytest.raises(TypeError, match="training must be a Python bool"):
        bn.apply(params, state, x43, training=jnp.array(True))
    with pytest.raises(TypeError, match="training must be a Python bool"):
        bn.apply(params, state, x43, training="yes")
    with pytest.raises(ValueError, match=r"more than 1 value per feature.*\(1, 3\)"):
        bn.apply(params, state, np.ones((1, 3), np.float32), training=True)
    with pytest.raises(ValueError, match="x must have rank"):
        bn.apply(params, state, jnp.float32(1), training=False)


def test_layer_checks_params_state_mask_and_clipping():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    with pytest.raises(ValueError, match=r"params must hold the keys \['scale', 'bias'\]"):
        bn.apply({"bias": params["bias"]}, state, x43, training=True)
    with pytest.raises(ValueError, match="params may only hold the keys"):
        jaxbn.BatchNorm(3, use_scale=False).apply(params, state, x43, training=True)
    with pytest.raises(ValueError, match=r'state\["var"\] must have shape \(3,\)'):
        bn.apply(params, {"mean": state["mean"], "var": np.ones(1, np.float32)}, x43, training=True)
    with pytest.raises(ValueError, match=r"state must hold the keys.*count"):
        jaxbn.BatchNorm(3, momentum=None).apply(params, state, x43, training=True)
    with pytest.raises(ValueError, match="mask is only used in training"):
        bn.apply(params, state, x43, training=False, mask=np.ones(4, bool))
    rn = jaxbn.BatchNorm(3, renorm=True)
    p2, s2 = rn.init()
    with pytest.raises(ValueError, match="rmax >= 1 and dmax >= 0"):
        rn.apply(p2, s2, x43, training=True, renorm_clipping=(0.5, -1.0))
    with pytest.raises(ValueError, match=r"momentum \(PyTorch's\) must be in \[0, 1\]"):
        jaxbn.BatchNorm.like_torch(3, momentum=1.5)
    # numpy scalars are fine where Python numbers are.
    jaxbn.BatchNorm(3, momentum=np.float32(0.9), virtual_batch_size=np.int64(2))


def test_layer_refuses_masked_batch_of_one_like_a_batch_of_one():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        bn.apply(params, state, x43, training=True, mask=np.array([False, True, False, False]))


def test_layer_init_and_state_errors():
    bn = jaxbn.BatchNorm(3, momentum=None)
    with pytest.raises(TypeError, match=r"dtype must be floating.*int32"):
        bn.init(dtype=jnp.int32)
    params, state = bn.init()
    bad = {**state, "count": np.zeros(3, np.int32)}
    with pytest.raises(ValueError, match=r'state\["count"\] must be an integer scalar.*\(3,\)'):
        traced(lambda x: bn.apply(params, bad, x, training=True), x43)
    bad = {**state, "count": np.zeros((), np.float32)}
    with pytest.raises(ValueError, match=r'state\["count"\] must be an integer scalar'):
        traced(lambda x: bn.apply(params, bad, x, training=True), x43)
    rn = jaxbn.BatchNorm(3, renorm=True)
    p2, s2 = rn.init()
    for clip, error, match in [
        ((jnp.array([2.0, 3.0]), 1.0), ValueError, "two scalars"),
        (("3", 1.0), TypeError, "two real numbers"),
        ((jnp.float32(float("nan")), 1.0), ValueError, "rmax >= 1"),
        ((2.0, jnp.array(-1.0)), ValueError, "dmax >= 0"),
    ]:
        with pytest.raises(error, match=match):
            traced(
                lambda x, clip=clip: rn.apply(p2, s2, x, training=True, renorm_clipping=clip), x43
            )


def test_a_tuple_of_features_is_read_in_the_order_of_the_sorted_axes():
    x4 = np.ones((4, 3, 5, 6), np.float32)
    bn = jaxbn.BatchNorm((3, 6), axis=(3, 1))  # sizes of axes 1 and 3
    params, state = bn.init()
    assert bn.apply(params, state, x4, training=True)[0].shape == x4.shape
    wrong = jaxbn.BatchNorm((6, 3), axis=(3, 1))  # sizes in the order of `axis`
    params, state = wrong.init()
    with pytest.raises(ValueError, match=r"the sizes of axes \(1, 3\), in that order"):
        traced(lambda p, s, x: wrong.apply(p, s, x, training=True), params, state, x4)

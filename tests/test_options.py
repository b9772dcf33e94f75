"""Layer options beyond the core: precision policy, ghost batch norm, batch
renormalization and PyTorch-compatible running statistics.

Each option's gradients are compared with ``jax.grad`` of the reference op
extended with the same option (written here in plain ``jnp``), and with finite
differences in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference

RTOL, ATOL = 2e-5, 2e-5


def close(a, b, rtol=RTOL, atol=ATOL):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def data(shape, seed=0, offset=1.0):
    return 2.0 * jax.random.normal(jax.random.key(seed), shape) + offset


def random_params(bn, seed=1):
    params, state = bn.init()
    ks = jax.random.split(jax.random.key(seed), 2)
    shape = bn.feature_shape
    params = {
        "scale": 1.0 + 0.3 * jax.random.normal(ks[0], shape),
        "bias": jax.random.normal(ks[1], shape),
    }
    return params, state


def grads_of(apply, params, x, ct):
    """Gradients of <y, ct> with respect to params and x (compiled: one program)."""
    return jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) * ct), argnums=(0, 1)))(params, x)


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
    step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True))
    for i in range(300):
        y, state = step(state, 1.2 * jax.random.normal(jax.random.key(i), (64, 4)))
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
    x, ct = data((8, 3)), data((8, 3), seed=5)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), params)
        x64, c64 = (jnp.asarray(np.asarray(v), jnp.float64) for v in (x, ct))

        def f(p, x):
            return jnp.sum(bn.apply(p, state, x, training=True)[0] * c64)

        check_grads(jax.jit(f), (p64, x64), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_ghost_batch_norm_with_mask_equals_kept_rows_per_group():
    bn = jaxbn.BatchNorm(3, virtual_batch_size=4)
    params, state = random_params(bn)
    x = data((8, 3))
    mask = jnp.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
    y, _ = bn.apply(params, state, x, training=True, mask=mask)
    y0 = reference.batch_norm(x[:3], params["scale"], params["bias"])[0]
    y1 = reference.batch_norm(x[4:], params["scale"], params["bias"])[0]
    close(y[:3], y0)
    close(y[4:], y1)


def test_ghost_batch_norm_bad_batch_size_names_both_numbers():
    bn = jaxbn.BatchNorm(3, virtual_batch_size=4)
    params, state = bn.init()
    with pytest.raises(ValueError, match=r"batch size 10 .* virtual_batch_size=4"):
        bn.apply(params, state, jnp.ones((10, 3)), training=True)
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
    state["renorm_mean"] = jnp.linspace(-1.0, 2.0, 5)
    state["renorm_var"] = jnp.linspace(0.5, 6.0, 5)
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
    state["renorm_var"] = jnp.full(5, 9.0)
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
    state["renorm_mean"] = jnp.array([50.0, -50.0, 50.0])
    state["renorm_var"] = jnp.array([100.0, 0.01, 100.0])
    x, ct = data((8, 3)), data((8, 3), seed=7)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), params)
        x64, c64 = (jnp.asarray(np.asarray(v), jnp.float64) for v in (x, ct))
        s64 = jax.tree.map(lambda v: jnp.asarray(np.asarray(v), jnp.float64), state)

        def f(p, x):
            return jnp.sum(bn.apply(p, s64, x, training=True)[0] * c64)

        check_grads(jax.jit(f), (p64, x64), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


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

"""The Equinox module: jaxbn.equinox.BatchNorm against eqx.nn.BatchNorm(mode="batch").

Both are called per example inside ``jax.vmap(..., axis_name="batch")``. Training
outputs, the gradients of the input and of ``weight``/``bias`` under a random
cotangent, the batch counter and the hidden mean are equal; the hidden variance
differs by exactly ``momentum**t``, Equinox's initial one (see the module's
docstring), so evaluation is compared with the same hidden statistics in both, and
the difference in the inference statistics is shown against the true ones.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests._op_cases import normal

eqx = pytest.importorskip("equinox")
from jaxbn import equinox as bn_eqx  # noqa: E402

# float32: as for Flax (32 roundings on the scale of each array). bfloat16 inputs:
# Equinox computes the statistics in bfloat16 (means rounded to it), jaxbn in
# float32, so outputs and gradients agree to a few bfloat16 places.
F32_TOL = 32 * float(jnp.finfo(jnp.float32).eps)
BF16_TOL = 4 * float(jnp.finfo(jnp.bfloat16).eps)
TOLS = {"f32": F32_TOL, "bf16": BF16_TOL}
DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16}
SHAPES = {"NC": (16, 5), "NCHW": (4, 3, 5, 6)}


def make_batches(shape, steps, x_dtype, seed=0):
    """NumPy batches and cotangents, drawn with the seeds ``seed`` to ``seed + 2 * steps - 1``."""
    xs = [(2.0 * normal(seed + i, shape) + 0.5 + 0.3 * i).astype(x_dtype) for i in range(steps)]
    cts = [normal(seed + steps + i, shape) for i in range(steps)]
    return xs, cts


@eqx.filter_jit  # compiled once per model and shape, not op by op at every step
def step(model, state, x, ct, *, inference):
    """One vmapped call: ``(y, grads {x, weight, bias}, new_state)``."""

    def loss(weight_bias, x):
        m = eqx.tree_at(lambda m: (m.weight, m.bias), model, weight_bias)
        f = jax.vmap(
            lambda xi, s: m(xi, s, inference=inference),
            in_axes=(0, None),
            out_axes=(0, None),
            axis_name="batch",
        )
        y, new_state = f(x, state)
        return jnp.sum(y.astype(jnp.float32) * ct), (y, new_state)

    grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
    ((gw, gb), gx), (y, new_state) = grad((model.weight, model.bias), x)
    return y, {"x": gx, "weight": gw, "bias": gb}, new_state


@eqx.filter_jit
def run_batch(model, x, state):
    """``model`` on each example of ``x`` under ``vmap(axis_name="batch")``: ``(y, state)``."""
    return jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")(x, state)


def with_params(model, seed):
    """``model`` with random ``weight`` and ``bias`` (JAX arrays, as Equinox's own)."""
    c = model.input_size
    weight = jnp.asarray(1.0 + 0.5 * normal(seed, (c,)))
    model = eqx.tree_at(lambda m: m.weight, model, weight)
    return eqx.tree_at(lambda m: m.bias, model, jnp.asarray(normal(seed + 1, (c,))))


def hidden(model, state):
    """``(counter, hidden_mean, hidden_var)`` from a batch-mode state."""
    return (state.get(model.batch_counter), *state.get(model.batch_state_index))


def as_equinox_state(ours, state, theirs, theirs_state):
    """Equinox's state holding our hidden statistics.

    Both evaluate with ``hidden / (1 - momentum**t)``: with the same hidden values
    they normalize with the same statistics.
    """
    t, mean, var = hidden(ours, state)
    theirs_state = theirs_state.set(theirs.batch_counter, jnp.array(int(t)))  # weak, as theirs
    return theirs_state.set(theirs.batch_state_index, (mean, var))


@pytest.mark.parametrize("precision", list(DTYPES))
@pytest.mark.parametrize("case", list(SHAPES))
def test_equals_equinox(case, precision, assert_trees_close):
    shape, tol, momentum, steps = SHAPES[case], TOLS[precision], 0.8, 3
    xs, cts = make_batches(shape, steps + 1, DTYPES[precision])
    c = shape[1]
    ours, s_ours = eqx.nn.make_with_state(bn_eqx.BatchNorm)(c, "batch", momentum=momentum)
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        c, "batch", momentum=momentum, mode="batch"
    )
    # Seeds apart from make_batches' (0 to 7).
    ours, theirs = with_params(ours, 10), with_params(theirs, 10)
    for i in range(steps):
        y_o, g_o, s_ours = step(ours, s_ours, xs[i], cts[i], inference=False)
        y_t, g_t, s_theirs = step(theirs, s_theirs, xs[i], cts[i], inference=False)
        assert y_o.dtype == y_t.dtype and g_o["x"].dtype == g_t["x"].dtype
        assert_trees_close((y_o, g_o), (y_t, g_t), tol=tol, err_msg=f"train {i}")
        assert float(jnp.max(jnp.abs(g_t["weight"]))) > 1e-2
        (t_o, mean_o, var_o), (t_t, mean_t, var_t) = hidden(ours, s_ours), hidden(theirs, s_theirs)
        assert int(t_o) == int(t_t) == i + 1
        assert_trees_close(mean_o, mean_t, tol=tol)
        # The one difference: Equinox's hidden variance started at one.
        assert_trees_close(var_o + momentum ** (i + 1), var_t, tol=tol)
    # Evaluation with the same statistics.
    s_theirs = as_equinox_state(ours, s_ours, theirs, s_theirs)
    y_o, g_o, s_after = step(ours, s_ours, xs[-1], cts[-1], inference=True)
    y_t, g_t, _ = step(theirs, s_theirs, xs[-1], cts[-1], inference=True)
    assert y_o.dtype == y_t.dtype
    assert_trees_close((y_o, g_o), (y_t, g_t), tol=tol, err_msg="inference")
    assert_trees_close(hidden(ours, s_after), hidden(ours, s_ours), tol=0.0)


def test_inference_statistics_after_a_few_steps_against_the_truth():
    """Equinox's first inference variances are far too large; jaxbn's are the data's."""
    momentum, steps, true_mean, true_std = 0.99, 5, 3.0, 2.0
    ours, s_ours = eqx.nn.make_with_state(bn_eqx.BatchNorm)(4, "batch", momentum=momentum)
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(
        4, "batch", momentum=momentum, mode="batch"
    )
    xs = [true_mean + true_std * normal(i, (1024, 4)) for i in range(steps)]
    for x in xs:
        ct = np.zeros_like(x)
        _, _, s_ours = step(ours, s_ours, x, ct, inference=False)
        _, _, s_theirs = step(theirs, s_theirs, x, ct, inference=False)

    def inference_stats(model, state):
        t, mean, var = hidden(model, state)
        debias = 1.0 - momentum**steps
        assert int(t) == steps
        return np.asarray(mean) / debias, np.asarray(var) / debias

    # The debiased averages of the batch statistics, computed in numpy.
    w = np.array([(1 - momentum) * momentum ** (steps - 1 - i) for i in range(steps)])
    w /= w.sum()
    batch = np.stack([np.asarray(x, np.float64) for x in xs])
    expected_mean = np.einsum("s,sc->c", w, batch.mean(1))
    expected_var = np.einsum("s,sc->c", w, batch.var(1))
    mean_o, var_o = inference_stats(ours, s_ours)
    mean_t, var_t = inference_stats(theirs, s_theirs)
    np.testing.assert_allclose(mean_o, expected_mean, rtol=1e-4)
    np.testing.assert_allclose(var_o, expected_var, rtol=1e-4)
    np.testing.assert_allclose(mean_t, expected_mean, rtol=1e-4)  # Equinox's mean is right
    excess = momentum**steps / (1 - momentum**steps)  # 19.4 at t = 5, momentum 0.99
    np.testing.assert_allclose(var_t, expected_var + excess, rtol=1e-4)
    # Against the true statistics of the data: jaxbn within sampling error,
    # Equinox's variance about 5.8 times too large.
    np.testing.assert_allclose(mean_o, true_mean, atol=0.15)
    np.testing.assert_allclose(var_o, true_std**2, rtol=0.1)
    assert np.all(var_t > 5 * true_std**2)
    # And the outputs in evaluation: jaxbn's are standardized, Equinox's shrunk.
    x = xs[0]
    y_o = step(ours, s_ours, x, np.zeros_like(x), inference=True)[0]
    y_t = step(theirs, s_theirs, x, np.zeros_like(x), inference=True)[0]
    assert 0.9 < float(jnp.std(y_o)) < 1.1
    assert float(jnp.std(y_t)) < 0.5


def test_before_any_training_step_inference_is_the_identity_map():
    """Counter zero: mean 0, variance 1, as Equinox's (and Flax's) initial statistics."""
    x = normal(0, (8, 3))
    results = []
    for cls, kw in ((bn_eqx.BatchNorm, {}), (eqx.nn.BatchNorm, {"mode": "batch"})):
        model, state = eqx.nn.make_with_state(cls)(3, "batch", inference=True, **kw)
        results.append(step(model, state, x, np.zeros_like(x), inference=True)[0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)
    np.testing.assert_allclose(results[0], x / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_training_runs_the_custom_vjp_op():
    """The traced call holds jaxbn's custom_vjp: gradients take its backward."""
    x = np.ones((4, 3), np.float32) * np.arange(4.0, dtype=np.float32)[:, None]

    def jaxpr(cls, **kw):
        model, state = eqx.nn.make_with_state(cls)(3, "batch", **kw)
        f = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
        return str(jax.make_jaxpr(lambda x: f(x, state))(x))

    assert "custom_vjp_call" in jaxpr(bn_eqx.BatchNorm)
    assert "custom_vjp_call" not in jaxpr(eqx.nn.BatchNorm, mode="batch")  # the control


def test_equinox_api_sequential_inference_mode_and_dtypes(assert_trees_close):
    """Sequential passes the state; inference_mode toggles; fields and state as Equinox's."""
    key = jax.random.key(0)
    x = normal(0, (16, 6)) + 1.0
    models = []
    for bn in (bn_eqx.BatchNorm(8, "batch"), eqx.nn.BatchNorm(8, "batch", mode="batch")):
        seq = eqx.nn.Sequential([eqx.nn.Linear(6, 8, key=key), bn, eqx.nn.Lambda(jax.nn.relu)])
        models.append(eqx.nn.make_with_state(lambda seq=seq: seq)())
    outs = []
    for model, state in models:
        y, state = run_batch(model, x, state)
        y_eval, _ = run_batch(eqx.nn.inference_mode(model), x, state)
        outs.append((y, y_eval, state))
    assert_trees_close(outs[0][0], outs[1][0], tol=F32_TOL)
    # The state has Equinox's structure and dtypes (counter int32, statistics float32).
    leaves = [jax.tree.leaves(o[2]) for o in outs]
    assert [(v.shape, v.dtype) for v in leaves[0]] == [(v.shape, v.dtype) for v in leaves[1]]
    ours = bn_eqx.BatchNorm(3, "batch", channelwise_affine=False, dtype=jnp.bfloat16)
    assert ours.weight is None and ours.bias is None
    _, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch", dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in jax.tree.leaves(state)}
    assert dtypes == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int32)}


def test_without_affine_trains_and_evaluates_as_equinox(assert_trees_close):
    x = 2.0 * normal(3, (8, 3)) + 1.0
    outs = []
    for cls in (eqx.nn.BatchNorm, bn_eqx.BatchNorm):
        kwargs = {"mode": "batch"} if cls is eqx.nn.BatchNorm else {}
        model, state = eqx.nn.make_with_state(cls)(
            3, "batch", channelwise_affine=False, momentum=0.5, **kwargs
        )
        y, state = run_batch(model, x, state)
        for _ in range(40):  # enough steps that Equinox's initial variance has faded
            _, state = run_batch(model, x, state)
        y_eval, _ = run_batch(eqx.nn.inference_mode(model), x, state)
        outs.append((y, y_eval))
    assert_trees_close(outs[1], outs[0], tol=1e-5)


def test_numpy_scalars_are_numbers(assert_trees_close):
    """NumPy reals are taken where Python numbers are, and give the same layer."""
    x = 2.0 * normal(2, (8, 3)) + 1.0
    results = []
    for input_size, eps, momentum in (
        (3, 1e-3, 0.5),
        (np.int64(3), np.float64(1e-3), np.float32(0.5)),
    ):
        model, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(
            input_size, "batch", eps=eps, momentum=momentum
        )
        assert type(model.momentum) is float and type(model.input_size) is int
        y, _, state = step(model, state, x, np.zeros_like(x), inference=False)
        y_eval = step(model, state, x, np.zeros_like(x), inference=True)[0]
        results.append((y, y_eval, hidden(model, state)))
    assert_trees_close(results[1], results[0], tol=F32_TOL)


def test_is_an_equinox_batch_norm_with_its_fields():
    """Selecting layers by type finds it; the leaves are those of Equinox's layer."""
    ours, s_ours = eqx.nn.make_with_state(bn_eqx.BatchNorm)(4, "batch")
    theirs, s_theirs = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, "batch", mode="batch")
    assert isinstance(ours, eqx.nn.BatchNorm)
    model = eqx.nn.Sequential([eqx.nn.Linear(3, 4, key=jax.random.key(0)), ours])
    assert [m for m in model.layers if isinstance(m, eqx.nn.BatchNorm)] == [ours]
    assert ours.ema_state_index is None and ours.ema_first_time_index is None

    def specs(tree):
        return [(v.shape, v.dtype) if eqx.is_array(v) else v for v in jax.tree.leaves(tree)]

    assert specs((ours, s_ours)) == specs((theirs, s_theirs))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(mode="ema"), ValueError, 'mode must be "batch"'),
        (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(momentum=-0.1), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(momentum=False), ValueError, r"momentum must be in \[0, 1\), got False"),
        (dict(momentum=np.bool_(False)), ValueError, r"momentum must be in \[0, 1\)"),
        (dict(eps=True), TypeError, "eps must be a Python float, got bool"),
        (dict(eps=0.0), ValueError, "eps must be > 0"),
        (dict(input_size=0), ValueError, "num_features must be a positive int"),
        (dict(input_size=True), ValueError, "num_features must be a positive int"),
        (dict(dtype=jnp.int32), TypeError, "param_dtype must be floating"),
    ],
    ids=[
        "ema",
        "momentum_one",
        "momentum_negative",
        "momentum_bool",
        "momentum_numpy_bool",
        "eps_bool",
        "eps",
        "input_size",
        "input_size_bool",
        "dtype",
    ],
)
def test_bad_arguments(kwargs, err, match):
    kwargs = {"input_size": 3, "axis_name": "batch", **kwargs}
    with pytest.raises(err, match=match):
        bn_eqx.BatchNorm(**kwargs)


def test_bad_input_raises_while_tracing():
    model, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch")
    f = jax.vmap(model, in_axes=(0, None), out_axes=(0, None), axis_name="batch")
    with pytest.raises(ValueError, match=r"input_size=3 channels on axis 0, got shape \(4,\)"):
        jax.eval_shape(f, np.ones((8, 4), np.float32), state)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        jax.eval_shape(f, np.ones((8, 3), np.int32), state)
    with pytest.raises(NameError):  # outside a vmap with its axis name, as Equinox
        jax.eval_shape(lambda x: model(x, state), np.ones((3,), np.float32))


def test_update_counter_saturates_instead_of_overflowing():
    """At 2**31 - 1 updates the counter stays there; the statistics stay finite."""
    x = normal(3, (8, 3)) + 2.0
    model, state = eqx.nn.make_with_state(bn_eqx.BatchNorm)(3, "batch", momentum=0.9)
    state = state.set(model.batch_counter, jnp.asarray(int(np.iinfo(np.int32).max)))
    state = step(model, state, x, np.zeros_like(x), inference=False)[2]
    assert int(state.get(model.batch_counter)) == np.iinfo(np.int32).max
    y = step(model, state, x, np.zeros_like(x), inference=True)[0]
    assert np.isfinite(np.asarray(y)).all()

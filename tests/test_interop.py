"""jaxbn against flax.linen.BatchNorm: variables, configs, outputs, statistics, gradients."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

nn = pytest.importorskip("flax.linen")
interop = pytest.importorskip("jaxbn.interop")

# Float32 tolerance, in units of the float32 machine epsilon (1.19e-7): normalized
# outputs are O(1) with a handful of roundings each, but Flax's default variance
# E[x^2] - E[x]^2 loses about (1 + mean^2 / var) more units to cancellation, and
# the running statistics and gradients sum over the batch. Measured differences
# reach at most 0.15 of this tolerance (3.8e-6); a wrong convention (momentum,
# eps, biased variance) is off by 1e-3 or more.
F32 = float(jnp.finfo(jnp.float32).eps)
RTOL = ATOL = 32 * F32

# (shape, axis): (N, C), NCHW, two feature axes.
CASES = [
    ((16, 5), -1),
    ((4, 3, 5, 6), 1),
    ((4, 3, 5, 2), (1, 3)),
]
IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]


def assert_close(a, b, rtol=RTOL, atol=ATOL):
    """Compares two pytrees leaf by leaf, with the same structure."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


def feature_shape(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def random_params(key, fshape):
    k1, k2 = jax.random.split(key)
    return {
        "scale": 1.0 + 0.5 * jax.random.normal(k1, fshape),
        "bias": jax.random.normal(k2, fshape),
    }


def batches(shape, n, seed=0):
    """Batches with a per-step offset, so the running statistics keep moving."""
    keys = jax.random.split(jax.random.key(seed), n)
    return [2.0 * jax.random.normal(k, shape) + 0.5 + i for i, k in enumerate(keys)]


def test_import_jaxbn_does_not_import_flax():
    code = "import sys, jaxbn; sys.exit('flax' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"import jaxbn imported flax\n{proc.stderr}"


@pytest.mark.parametrize("fast_variance", [True, False], ids=["fast_var", "two_pass_var"])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=IDS)
def test_training_and_eval_match_flax(shape, axis, fast_variance):
    """nn.BatchNorm, the jaxbn layer and the wrapper: same outputs and statistics."""
    fshape = feature_shape(shape, axis)
    flax_bn = nn.BatchNorm(axis=axis, momentum=0.8, use_fast_variance=fast_variance)
    wrapper = interop.FlaxBatchNorm(axis=axis, momentum=0.8)
    layer = interop.batch_norm_from_flax(flax_bn, fshape if isinstance(axis, tuple) else fshape[0])
    xs = batches(shape, 4)

    flax_vars = flax_bn.init(jax.random.key(0), xs[0], use_running_average=True)
    flax_vars = {**flax_vars, "params": random_params(jax.random.key(1), fshape)}
    wrap_vars = dict(flax_vars)
    params, state = interop.from_flax(flax_vars)

    def flax_step(module, variables, x):
        y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, {**variables, **updates}

    flax_step = jax.jit(flax_step, static_argnums=0)
    layer_step = jax.jit(lambda p, s, x: layer.apply(p, s, x, training=True))
    for x in xs:
        y_flax, flax_vars = flax_step(flax_bn, flax_vars, x)
        y_wrap, wrap_vars = flax_step(wrapper, wrap_vars, x)
        y_layer, state = layer_step(params, state, x)
        assert_close(y_wrap, y_flax)
        assert_close(y_layer, y_flax)
    # The statistics moved far from their initial 0 and 1 (a check that can fail).
    assert np.min(np.asarray(flax_vars["batch_stats"]["mean"])) > 1.0
    assert_close(wrap_vars["batch_stats"], flax_vars["batch_stats"])
    assert_close(interop.to_flax(params, state), flax_vars)

    x_eval = xs[-1] * 0.5 - 1.0
    y_flax = flax_bn.apply(flax_vars, x_eval, use_running_average=True)
    y_wrap = wrapper.apply(wrap_vars, x_eval, use_running_average=True)
    y_layer, same_state = layer.apply(params, state, x_eval, training=False)
    assert_close(same_state, state, rtol=0, atol=0)
    assert_close(y_wrap, y_flax)
    assert_close(y_layer, y_flax)


def test_running_statistics_follow_flax_convention():
    """One step from (0, 1), checked against numpy: m * old + (1 - m) * batch."""
    x = batches((32, 3), 1, seed=3)[0]
    wrapper = interop.FlaxBatchNorm(use_running_average=False, momentum=0.7)
    variables = wrapper.init(jax.random.key(0), x)
    _, updates = wrapper.apply(variables, x, mutable=["batch_stats"])
    xn = np.asarray(x, np.float64)
    assert_close(
        updates["batch_stats"],
        {"mean": 0.3 * xn.mean(0), "var": 0.7 + 0.3 * xn.var(0)},
    )


@pytest.mark.parametrize(
    ("use_scale", "use_bias"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["scale-bias", "scale", "bias", "none"],
)
def test_variables_layout_and_round_trip(use_scale, use_bias):
    x = jnp.ones((4, 2, 3))
    flax_bn = nn.BatchNorm(use_running_average=True, use_scale=use_scale, use_bias=use_bias)
    flax_vars = flax_bn.init(jax.random.key(0), x)
    wrap_vars = interop.FlaxBatchNorm(
        use_running_average=True, use_scale=use_scale, use_bias=use_bias
    ).init(jax.random.key(0), x)
    bn = interop.batch_norm_from_flax(flax_bn, 3)
    ours = interop.to_flax(*bn.init())
    for got in (wrap_vars, ours):
        assert jax.tree.structure(got) == jax.tree.structure(flax_vars)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(flax_vars), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)

    trained = jax.tree.map(lambda v: v + jax.random.normal(jax.random.key(1), v.shape), flax_vars)
    params, state = interop.from_flax(trained)
    assert set(params) == {k for k, on in (("scale", use_scale), ("bias", use_bias)) if on}
    assert jax.tree.structure(interop.to_flax(params, state)) == jax.tree.structure(trained)
    assert_close(interop.to_flax(params, state), trained, rtol=0, atol=0)
    again = interop.from_flax(interop.to_flax(params, state))
    assert_close(again, (params, state), rtol=0, atol=0)


def test_config_translation_both_ways():
    flax_bn = nn.BatchNorm(
        axis=1,
        momentum=0.9,
        epsilon=1e-3,
        use_scale=False,
        use_bias=True,
        axis_name="batch",
        param_dtype=jnp.float64,
        # Accepted: constant initializers equal to the defaults, built anew.
        scale_init=nn.initializers.ones_init(),
        bias_init=nn.initializers.zeros_init(),
    )
    bn = interop.batch_norm_from_flax(flax_bn, 7)
    assert bn == jaxbn.BatchNorm(
        7,
        axis=1,
        momentum=0.9,
        eps=1e-3,
        use_scale=False,
        use_bias=True,
        axis_name="batch",
        param_dtype=jnp.float64,
    )
    back = interop.to_flax_module(bn)
    assert isinstance(back, nn.BatchNorm)
    for name in ("axis", "momentum", "use_scale", "use_bias", "axis_name", "param_dtype"):
        assert getattr(back, name) == getattr(flax_bn, name), name
    assert back.epsilon == 1e-3
    assert back.use_fast_variance is False
    assert back.use_running_average is None
    assert interop.batch_norm_from_flax(back, 7) == bn
    # Both libraries' defaults agree.
    assert interop.batch_norm_from_flax(nn.BatchNorm(), 5) == jaxbn.BatchNorm(5)
    assert interop.batch_norm_from_flax(nn.BatchNorm(axis=[1, 2]), (2, 3)).axis == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(axis_index_groups=[[0, 1]]), r"axis_index_groups.*expected None, got \[\[0, 1\]\]"),
        (dict(dtype=jnp.bfloat16), "dtype.*expected None.*bfloat16"),
        (dict(force_float32_reductions=False), "force_float32_reductions.*expected True"),
        (dict(scale_init=nn.initializers.normal()), "scale_init must be the default"),
        (dict(bias_init=nn.initializers.constant(0.5)), "bias_init must be the default"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    ],
    ids=["axis_index_groups", "dtype", "float32_reductions", "scale_init", "bias_init", "momentum"],
)
def test_unsupported_flax_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.batch_norm_from_flax(nn.BatchNorm(**kwargs), 4)


def test_converters_reject_bad_input():
    with pytest.raises(TypeError, match=r"module must be a flax\.linen\.BatchNorm, got LayerNorm"):
        interop.batch_norm_from_flax(nn.LayerNorm(), 4)
    with pytest.raises(TypeError, match=r"bn must be a jaxbn\.BatchNorm, got BatchNorm"):
        interop.to_flax_module(nn.BatchNorm())
    params, state = jaxbn.BatchNorm(3).init()
    with pytest.raises(ValueError, match=r"state must hold the keys \['mean', 'var'\].*\['var'\]"):
        interop.to_flax(params, {"mean": state["mean"]})
    with pytest.raises(ValueError, match=r"params may only hold.*extra keys \['gamma'\]"):
        interop.to_flax({"gamma": params["scale"]}, state)
    with pytest.raises(ValueError, match=r'share one shape.*params\["bias"\]: \(4,\)'):
        interop.to_flax({**params, "bias": jnp.zeros(4)}, state)
    variables = interop.to_flax(params, state)
    with pytest.raises(ValueError, match=r"variables must hold the keys \['batch_stats'\]"):
        interop.from_flax({"params": variables["params"]})
    with pytest.raises(ValueError, match=r"variables may only hold.*extra keys \['cache'\]"):
        interop.from_flax({**variables, "cache": {}})
    with pytest.raises(ValueError, match=r'share one shape.*batch_stats"\]\["var"\]: \(2, 3\)'):
        interop.from_flax(
            {**variables, "batch_stats": {"mean": state["mean"], "var": jnp.ones((2, 3))}}
        )
    with pytest.raises(TypeError, match=r'variables\["batch_stats"\] must be a dict, got list'):
        interop.from_flax({"batch_stats": [1, 2]})


class MLP(nn.Module):
    """Dense -> batch norm -> relu -> Dense, with the batch norm class as a field."""

    norm: type

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16, use_bias=False)(x)
        x = self.norm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(3)(nn.relu(x))


def test_swapping_the_module_in_a_flax_model_keeps_loss_and_gradients():
    x = jax.random.normal(jax.random.key(0), (32, 10)) * 1.5 + 0.5
    labels = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    flax_model, wrap_model = MLP(nn.BatchNorm), MLP(interop.FlaxBatchNorm)
    flax_vars = flax_model.init(jax.random.key(2), x, train=False)
    wrap_vars = wrap_model.init(jax.random.key(2), x, train=False)
    assert_close(wrap_vars, flax_vars, rtol=0, atol=0)

    def loss_fn(params, model, batch_stats, x):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return loss, updates["batch_stats"]

    @jax.jit
    def step(variables_pair, x):
        out = []
        for model, v in zip((flax_model, wrap_model), variables_pair, strict=True):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                v["params"], model, v["batch_stats"], x
            )
            new_params = jax.tree.map(lambda p, g: p - 0.1 * g, v["params"], grads)
            out.append((loss, grads, {"params": new_params, "batch_stats": stats}))
        return out

    pair = (flax_vars, wrap_vars)
    for i in range(3):
        (loss_f, grads_f, new_f), (loss_w, grads_w, new_w) = step(pair, x + 0.3 * i)
        np.testing.assert_allclose(loss_w, loss_f, rtol=RTOL)
        # Gradients are compared on the scale of the largest one of each array.
        jax.tree.map(
            lambda gw, gf: np.testing.assert_allclose(
                gw, gf, rtol=RTOL, atol=ATOL * float(np.max(np.abs(gf)))
            ),
            grads_w,
            grads_f,
        )
        assert float(np.max(np.abs(grads_f["bn"]["scale"]))) > 1e-3
        pair = (new_f, new_w)
    assert_close(pair[1], pair[0])

    logits_f = flax_model.apply(pair[0], x, train=False)
    logits_w = wrap_model.apply(pair[1], x, train=False)
    assert_close(logits_w, logits_f)


def test_mask_matches_flax():
    x = batches((12, 4), 1, seed=5)[0]
    mask = (jnp.arange(12) % 3 != 0)[:, None]  # Flax-style: broadcasts against x
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.5)
    wrapper = interop.FlaxBatchNorm(use_running_average=False, momentum=0.5)
    variables = flax_bn.init(jax.random.key(0), x)
    y_f, up_f = flax_bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_w, up_w = wrapper.apply(variables, x, mask=mask, mutable=["batch_stats"])
    assert_close(y_w, y_f)
    assert_close(up_w, up_f)
    # And the statistics are those of the kept rows only (numpy).
    kept = np.asarray(x, np.float64)[np.asarray(mask[:, 0])]
    assert_close(up_w["batch_stats"], {"mean": 0.5 * kept.mean(0), "var": 0.5 + 0.5 * kept.var(0)})
    with pytest.raises(ValueError, match=r"mask must have size 1 on the feature axes \(1,\)"):
        wrapper.apply(variables, x, mask=jnp.ones((12, 4), bool), mutable=["batch_stats"])


def test_init_on_a_single_example_as_flax():
    """A common Flax idiom: initialize in training mode on one dummy example."""
    x = jnp.arange(3.0)[None, :]
    flax_bn = nn.BatchNorm(use_running_average=False)
    wrapper = interop.FlaxBatchNorm(use_running_average=False)
    y_f, v_f = flax_bn.init_with_output(jax.random.key(0), x)
    y_w, v_w = wrapper.init_with_output(jax.random.key(0), x)
    assert_close(v_w, v_f, rtol=0, atol=0)
    assert_close(y_w, y_f)
    np.testing.assert_array_equal(y_w, jnp.zeros((1, 3)))  # (x - mean) = 0, bias = 0


def test_axis_name_matches_flax_under_vmap():
    """Statistics averaged over a named (vmapped) axis, as over devices."""
    xs = batches((4, 8, 3), 1, seed=7)[0]  # 4 "devices" of 8 examples each
    flax_bn = nn.BatchNorm(use_running_average=False, axis_name="devices", momentum=0.5)
    wrapper = interop.FlaxBatchNorm(use_running_average=False, axis_name="devices", momentum=0.5)
    variables = flax_bn.init(jax.random.key(0), xs[0])

    def run(module):
        f = lambda x: module.apply(variables, x, mutable=["batch_stats"])  # noqa: E731
        return jax.vmap(f, axis_name="devices")(xs)

    (y_f, up_f), (y_w, up_w) = run(flax_bn), run(wrapper)
    assert_close(y_w, y_f)
    assert_close(up_w, up_f)
    whole = np.asarray(xs, np.float64).reshape(-1, 3)
    expected = {"mean": 0.5 * whole.mean(0), "var": 0.5 + 0.5 * whole.var(0)}
    assert_close(up_w["batch_stats"], jax.tree.map(lambda v: np.broadcast_to(v, (4, 3)), expected))


def test_wrapper_output_dtype_and_merge_param():
    x = batches((8, 3), 1)[0].astype(jnp.bfloat16)
    wrapper = interop.FlaxBatchNorm(use_running_average=True)
    variables = wrapper.init(jax.random.key(0), x)
    assert wrapper.apply(variables, x).dtype == jnp.bfloat16
    as_f32 = interop.FlaxBatchNorm(use_running_average=True, dtype=jnp.float32)
    assert as_f32.apply(variables, x).dtype == jnp.float32
    # Flax's rule: use_running_average set once, either on the module or the call.
    with pytest.raises(ValueError, match="use_running_average"):
        wrapper.apply(variables, x, use_running_average=False)
    with pytest.raises(ValueError, match="use_running_average"):
        interop.FlaxBatchNorm().apply(variables, x)

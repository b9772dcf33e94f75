"""The converters of jaxbn.interop (= jaxbn.linen): variables and configs, both ways.

The Linen module itself is tested in tests/test_frameworks_flax.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn

nn = pytest.importorskip("flax.linen")
interop = pytest.importorskip("jaxbn.interop")
bn_linen = pytest.importorskip("jaxbn.linen")

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


@pytest.mark.parametrize("fast_variance", [True, False], ids=["fast_var", "two_pass_var"])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=IDS)
def test_training_and_eval_match_flax(shape, axis, fast_variance):
    """nn.BatchNorm, the jaxbn layer and the wrapper: same outputs and statistics."""
    fshape = feature_shape(shape, axis)
    flax_bn = nn.BatchNorm(axis=axis, momentum=0.8, use_fast_variance=fast_variance)
    wrapper = bn_linen.BatchNorm(axis=axis, momentum=0.8)
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
    wrapper = bn_linen.BatchNorm(use_running_average=False, momentum=0.7)
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
    wrap_vars = bn_linen.BatchNorm(
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
        (dict(force_float32_reductions=False), "force_float32_reductions.*expected True"),
        (dict(scale_init=nn.initializers.normal()), "scale_init must be the default"),
        (dict(bias_init=nn.initializers.constant(0.5)), "bias_init must be the default"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    ],
    ids=["axis_index_groups", "float32_reductions", "scale_init", "bias_init", "momentum"],
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


def test_dtype_maps_both_ways():
    flax_bn = nn.BatchNorm(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    bn = interop.batch_norm_from_flax(flax_bn, 4)
    assert bn.dtype == jnp.bfloat16 and bn.param_dtype == jnp.float32
    back = interop.to_flax_module(bn)
    assert back.dtype == jnp.bfloat16
    # And the output dtypes agree where both have the dtype set.
    x = jnp.ones((4, 4), jnp.float32) * jnp.arange(4.0)[:, None]
    params, state = bn.init()
    y_bn, _ = bn.apply(params, state, x, training=True)
    y_flax, _ = back.apply(interop.to_flax(params, state), x, False, mutable=["batch_stats"])
    assert y_bn.dtype == y_flax.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(momentum=None), r"cannot express momentum=None: expected a float"),
        (dict(unbiased_running_var=True), r"cannot express unbiased_running_var=True"),
        (dict(virtual_batch_size=4), r"cannot express virtual_batch_size=4: expected None"),
        (dict(renorm=True), r"cannot express renorm=True: expected False"),
        (dict(debias=True), r"cannot express debias=True: expected False"),
        (dict(frozen=True), r"cannot express frozen=True: expected False"),
        (dict(activation="elu"), r"cannot express activation='elu': expected None"),
    ],
    ids=["cumulative", "unbiased", "ghost", "renorm", "debias", "frozen", "activation"],
)
def test_to_flax_module_refuses_what_flax_cannot_express(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.to_flax_module(jaxbn.BatchNorm(4, **kwargs))


def test_converters_refuse_non_floating_arrays():
    params, state = jaxbn.BatchNorm(3).init()
    with pytest.raises(
        TypeError, match=r'state\["mean"\] must have a floating-point dtype, got int32'
    ):
        interop.to_flax(params, {**state, "mean": jnp.zeros(3, jnp.int32)})
    with pytest.raises(
        TypeError, match=r'params\["scale"\] must have a floating-point dtype, got bool'
    ):
        interop.to_flax({**params, "scale": jnp.ones(3, bool)}, state)
    variables = interop.to_flax(params, state)
    bad = {**variables, "batch_stats": {**variables["batch_stats"], "var": jnp.ones(3, jnp.int8)}}
    with pytest.raises(TypeError, match=r'\["batch_stats"\]\["var"\] must have a floating-point'):
        interop.from_flax(bad)


def test_interop_is_the_linen_converters():
    for name in ("to_flax", "from_flax", "batch_norm_from_flax", "to_flax_module"):
        assert getattr(interop, name) is getattr(bn_linen, name)
    # The module once here is jaxbn.linen.BatchNorm (with Flax's dtype rule now).
    assert not hasattr(interop, "FlaxBatchNorm")

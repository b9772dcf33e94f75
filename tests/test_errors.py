"""Bad input gets a clear error naming the argument, raised while tracing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference

OPS = [jaxbn.batch_norm, reference.batch_norm, jaxbn.batch_norm_fwd]
OP_IDS = ["op", "reference", "fwd"]

x = jnp.ones((4, 3))
v3 = jnp.ones(3)


def traced(fn, *args, **kwargs):
    """Runs ``fn`` under ``jax.eval_shape``: errors must come at trace time."""
    return jax.eval_shape(functools.partial(fn, **kwargs), *args)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((jnp.float32(1.0), None, None), {}, ValueError, "x must have rank >= 1"),
        ((jnp.ones((4, 3), jnp.int32), None, None), {}, TypeError, "x must have a floating"),
        ((x, None, None), {"axis": 2}, ValueError, "axis 2 is out of range"),
        ((x, None, None), {"axis": -3}, ValueError, "axis -3 is out of range"),
        ((x, None, None), {"axis": (1, -1)}, ValueError, "axis has repeated"),
        ((x, None, None), {"axis": 1.0}, TypeError, "axis must be an int"),
        ((x, jnp.ones(4), None), {}, ValueError, r"scale must have shape \(3,\)"),
        ((x, None, jnp.ones((1, 3))), {}, ValueError, r"bias must have shape \(3,\)"),
        ((x, v3, v3), {"eps": 0.0}, ValueError, "eps must be > 0"),
        ((x, v3, v3), {"eps": -1e-5}, ValueError, "eps must be > 0"),
        ((jnp.ones((1, 3)), v3, v3), {}, ValueError, r"more than 1 value.*\(1, 3\)"),
        ((jnp.ones((5, 1, 1, 3)), None, None), {"axis": (0, 3)}, ValueError, "more than 1"),
        ((x, None, None), {"mask": jnp.ones(4)}, TypeError, "mask must be a boolean"),
        ((x, None, None), {"mask": jnp.ones(5, bool)}, ValueError, r"got \(5,\) for x"),
        ((x, None, None), {"mask": jnp.ones((4, 2), bool)}, ValueError, "mask must broadcast"),
        (
            (jnp.ones((4, 3, 4, 4)), None, None),
            {"axis": 1, "mask": jnp.ones(4, bool)},  # [N] on NCHW: ambiguous, refused
            ValueError,
            r"one axis per reduction axis.*got \(4,\)",
        ),
        ((x, v3, v3), {"eps": 1e-45}, ValueError, "eps must be a normal number.*float32"),
        ((x, v3, v3), {"eps": 1e-39}, ValueError, "eps must be a normal number"),
        ((x, v3, v3), {"eps": float("inf")}, ValueError, "eps must be finite"),
        ((x, v3, v3), {"eps": float("nan")}, ValueError, "eps must be > 0"),
        ((x, None, None), {"axis_name": 5}, TypeError, "axis_name must be None, a str"),
        ((x, None, None), {"axis_name": ("i", 5)}, TypeError, "axis_name must be None, a str"),
        # A concrete mask keeping one value (of every feature, or of one feature).
        (
            (x, None, None),
            {"mask": np.array([True, False, False, False])},
            ValueError,
            r"more than 1 value per feature.*mask keeping 1",
        ),
        (
            (x, None, None),
            {"mask": np.array([[1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 0, 1]], bool)},
            ValueError,
            r"more than 1 value per feature.*mask keeping 1",
        ),
    ],
)
def test_op_errors(op, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        traced(op, *args, **kwargs)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((x, v3, v3, jnp.zeros(2), v3), ValueError, r"mean must have shape \(3,\)"),
        ((x, v3, v3, v3, jnp.ones((3, 1))), ValueError, r"var must have shape \(3,\)"),
        ((x, v3, v3, v3, jnp.ones(3, jnp.int32)), TypeError, "var must have a floating"),
        ((x.astype(jnp.int8), v3, v3, v3, v3), TypeError, "x must have a floating"),
        ((x, v3, v3, None, v3), TypeError, r"mean must be a \[3\] array of statistics, got None"),
        ((x, v3, v3, v3, None), TypeError, r"var must be a \[3\] array of statistics, got None"),
    ],
)
def test_inference_errors(args, error, match):
    with pytest.raises(error, match=match):
        traced(jaxbn.batch_norm_inference, *args)


def test_inference_accepts_a_single_example():
    """Evaluation normalizes with given statistics: one example is fine."""
    y = jaxbn.batch_norm_inference(jnp.ones((1, 3)), v3, v3, v3, v3)
    assert y.shape == (1, 3)


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
        traced(lambda x: bn.apply(params, state, x, training=True), jnp.ones((4, 5)))
    with pytest.raises(TypeError, match="training must be a Python bool"):
        bn.apply(params, state, x, training=jnp.array(True))
    with pytest.raises(TypeError, match="training must be a Python bool"):
        bn.apply(params, state, x, training="yes")
    with pytest.raises(ValueError, match=r"more than 1 value per feature.*\(1, 3\)"):
        bn.apply(params, state, jnp.ones((1, 3)), training=True)
    with pytest.raises(ValueError, match="x must have rank"):
        bn.apply(params, state, jnp.float32(1), training=False)


def test_layer_checks_params_state_mask_and_clipping():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    with pytest.raises(ValueError, match=r"params must hold the keys \['scale', 'bias'\]"):
        bn.apply({"bias": params["bias"]}, state, x, training=True)
    with pytest.raises(ValueError, match="params may only hold the keys"):
        jaxbn.BatchNorm(3, use_scale=False).apply(params, state, x, training=True)
    with pytest.raises(ValueError, match=r'state\["var"\] must have shape \(3,\)'):
        bn.apply(params, {"mean": state["mean"], "var": jnp.ones(1)}, x, training=True)
    with pytest.raises(ValueError, match=r"state must hold the keys.*count"):
        jaxbn.BatchNorm(3, momentum=None).apply(params, state, x, training=True)
    with pytest.raises(ValueError, match="mask is only used in training"):
        bn.apply(params, state, x, training=False, mask=jnp.ones(4, bool))
    rn = jaxbn.BatchNorm(3, renorm=True)
    p2, s2 = rn.init()
    with pytest.raises(ValueError, match="rmax >= 1 and dmax >= 0"):
        rn.apply(p2, s2, x, training=True, renorm_clipping=(0.5, -1.0))
    with pytest.raises(ValueError, match=r"momentum \(PyTorch's\) must be in \[0, 1\]"):
        jaxbn.BatchNorm.like_torch(3, momentum=1.5)
    # numpy scalars are fine where Python numbers are.
    jaxbn.BatchNorm(3, momentum=np.float32(0.9), virtual_batch_size=np.int64(2))


def test_bwd_refuses_residuals_of_another_axis():
    _, res = jaxbn.batch_norm_fwd(jnp.ones((4, 3, 5)), None, None, axis=1)
    cts = (jnp.ones((4, 3, 5)), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="differs from the forward's feature axes"):
        jaxbn.batch_norm_bwd(res, cts, axis=-1)


def test_eps_is_checked_against_the_compute_dtype():
    """float64 input computes in float64: an eps normal there is accepted."""
    with jax.enable_x64(True):
        x64 = jnp.ones((4, 3), jnp.float64)
        assert traced(jaxbn.batch_norm, x64, None, None, eps=1e-300)[0].shape == (4, 3)
    with pytest.raises(ValueError, match="eps must be a normal number"):
        traced(jaxbn.batch_norm, x.astype(jnp.bfloat16), None, None, eps=1e-40)
    with pytest.raises(ValueError, match="eps must be a normal number"):
        traced(
            lambda x: jaxbn.BatchNorm(3, eps=1e-40).apply(
                *jaxbn.BatchNorm(3).init(), x, training=True
            ),
            x,
        )


def test_traced_mask_keeping_one_value_is_not_checked():
    """The count of a traced mask is unknown while tracing: no error (nor NaN)."""
    one = np.array([True, False, False, False])
    y = jax.jit(lambda x, m: jaxbn.batch_norm(x, None, None, mask=m))(
        x + jnp.arange(4.0)[:, None], one
    )
    assert np.isfinite(np.asarray(y[0])).all()


def test_layer_refuses_masked_batch_of_one_like_a_batch_of_one():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        bn.apply(params, state, x, training=True, mask=np.array([False, True, False, False]))


def test_layer_init_and_state_errors():
    bn = jaxbn.BatchNorm(3, momentum=None)
    with pytest.raises(TypeError, match=r"dtype must be floating.*int32"):
        bn.init(dtype=jnp.int32)
    params, state = bn.init()
    bad = {**state, "count": jnp.zeros(3, jnp.int32)}
    with pytest.raises(ValueError, match=r'state\["count"\] must be an integer scalar.*\(3,\)'):
        traced(lambda x: bn.apply(params, bad, x, training=True), x)
    bad = {**state, "count": jnp.zeros((), jnp.float32)}
    with pytest.raises(ValueError, match=r'state\["count"\] must be an integer scalar'):
        traced(lambda x: bn.apply(params, bad, x, training=True), x)
    rn = jaxbn.BatchNorm(3, renorm=True)
    p2, s2 = rn.init()
    for clip, error, match in [
        ((jnp.array([2.0, 3.0]), 1.0), ValueError, "two scalars"),
        (("3", 1.0), TypeError, "two real numbers"),
        ((jnp.float32(float("nan")), 1.0), ValueError, "rmax >= 1"),
        ((2.0, jnp.array(-1.0)), ValueError, "dmax >= 0"),
    ]:
        with pytest.raises(error, match=match):
            traced(lambda x, clip=clip: rn.apply(p2, s2, x, training=True, renorm_clipping=clip), x)


# The public backward checks what it is given against the residuals.


def fwd_res(shape=(4, 8, 3), axis=-1):
    return jaxbn.batch_norm_fwd(
        jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) % 7,
        jnp.ones(shape[axis]),
        jnp.zeros(shape[axis]),
        axis=axis,
    )[1]


@pytest.mark.parametrize(
    ("cts", "kwargs", "error", "match"),
    [
        (
            ((4, 8, 3), (3,), (8, 3)),
            {},
            ValueError,
            r"dvar must have the feature shape.*\(3,\), got \(8, 3\)",
        ),
        (
            ((4, 8, 3), (1, 3), (3,)),
            {},
            ValueError,
            r"dmean must have the feature shape.*got \(1, 3\)",
        ),
        (((8, 3), (3,), (3,)), {}, ValueError, r"dy must have x's shape \(4, 8, 3\), got \(8, 3\)"),
        (
            ((4, 8, 3), (3,), (3,)),
            {"axis": 1},
            ValueError,
            r"axis=1 differs from the forward's feature axes \(2,\)",
        ),
        (((4, 8, 3), (3,), (3,)), {"axis_name": "i"}, ValueError, r"axis_name='i' differs"),
    ],
    ids=["dvar", "dmean", "dy", "axis", "axis_name"],
)
def test_bwd_checks_each_cotangent_and_the_forward_axes(cts, kwargs, error, match):
    res = fwd_res()
    arrays = tuple(jnp.ones(s) for s in cts)
    with pytest.raises(error, match=match):
        traced(lambda r, c: jaxbn.batch_norm_bwd(r, c, **kwargs), res, arrays)


def test_bwd_checks_types_and_accepts_the_forward_axis():
    res = fwd_res((4, 3, 5), axis=1)
    cts = (jnp.ones((4, 3, 5)), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(TypeError, match="res must be the BatchNormResiduals"):
        jaxbn.batch_norm_bwd(tuple(jax.tree.leaves(res)), cts)
    with pytest.raises(TypeError, match=r"cotangents must be a triple.*length 2"):
        jaxbn.batch_norm_bwd(res, cts[:2])
    with pytest.raises(TypeError, match="dmean must have a floating"):
        jaxbn.batch_norm_bwd(res, (cts[0], jnp.zeros(3, jnp.int32), cts[2]))
    for axis in (None, 1, -2, (1,)):
        assert jaxbn.batch_norm_bwd(res, cts, axis=axis)[0].shape == (4, 3, 5)


@pytest.mark.parametrize(
    "make",
    [
        lambda: jaxbn.MLP((4, 8, 2), axis_name=["data"]),
        lambda: jaxbn.CNN(1, (4,), 2, axis_name=["data"]),
    ],
    ids=["MLP", "CNN"],
)
def test_model_configs_refuse_unhashable_fields(make):
    with pytest.raises(TypeError, match=r"\.axis_name must be hashable \(a tuple, not a list"):
        make()


def test_a_tuple_of_features_is_read_in_the_order_of_the_sorted_axes():
    x4 = jnp.ones((4, 3, 5, 6))
    bn = jaxbn.BatchNorm((3, 6), axis=(3, 1))  # sizes of axes 1 and 3
    params, state = bn.init()
    assert bn.apply(params, state, x4, training=True)[0].shape == x4.shape
    wrong = jaxbn.BatchNorm((6, 3), axis=(3, 1))  # sizes in the order of `axis`
    params, state = wrong.init()
    with pytest.raises(ValueError, match=r"the sizes of axes \(1, 3\), in that order"):
        traced(lambda p, s, x: wrong.apply(p, s, x, training=True), params, state, x4)

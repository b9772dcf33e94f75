"""Batch norm fused with its activation: against the reference, finite differences, numpy.

The oracle is ``f(reference.batch_norm(x, |scale| + eps, bias))`` with ``f`` from
``jax.nn``, differentiated by JAX; the op keeps only ``z`` and recovers the rest.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.ad_checkpoint import print_saved_residuals
from jax.test_util import check_grads

import jaxbn
from jaxbn import act, reference
from jaxbn.data import load_digits
from jaxbn.train import evaluate, init_train_state, make_train_loop
from tests._op_cases import (
    CASES,
    assert_trees_close,
    bernoulli,
    case_id,
    feature_shape,
    jit_vjp_of,
    make_inputs,
    normal,
    numpy_batch_norm,
)

EPS = 1e-5
SLOPE = 0.1  # a slope far from 1, so a wrong branch shows
ACTS = ["leaky_relu", "elu", "identity"]
NUMPY_ACT = {
    "leaky_relu": lambda y: np.where(y >= 0, y, SLOPE * y),
    "elu": lambda y: np.where(y > 0, y, np.expm1(np.minimum(y, 0))),
    "identity": lambda y: y,
}
JAX_ACT = {
    "leaky_relu": lambda y: jax.nn.leaky_relu(y, SLOPE),
    "elu": jax.nn.elu,
    "identity": lambda y: y,
}


def fused(activation, axis, **kw):
    def f(x, scale, bias):
        return jaxbn.batch_norm_act(
            x, scale, bias, activation=activation, negative_slope=SLOPE, axis=axis, **kw
        )

    return f


def oracle(activation, axis, **kw):
    """The composition the op must equal, written with jax.nn and the reference."""

    def f(x, scale, bias):
        s = None if scale is None else jnp.abs(scale) + EPS
        y, mean, var = reference.batch_norm(x, s, bias, axis=axis, **kw)
        return JAX_ACT[activation](y), mean, var

    return f


def close(a, b, dtype=jnp.float32):
    """The shared tolerances, wider for what is recovered from z (1.5x, 10x in float64)."""
    assert_trees_close(a, b, dtype, factor=10.0 if dtype == jnp.float64 else 1.5)


# Every case with leaky ReLU; ELU on NCHW, the identity on a tuple axis.
OP_CASES = [("leaky_relu", *c) for c in CASES] + [("elu", *CASES[3]), ("identity", *CASES[4])]
OP_IDS = [f"{a}-{case_id(s, ax)}" for a, s, ax in OP_CASES]


@pytest.mark.parametrize(("activation", "shape", "axis"), OP_CASES, ids=OP_IDS)
def test_values_and_vjp_match_numpy_and_reference(activation, shape, axis):
    x, scale, bias, cts = make_inputs(shape, axis, seed=1)
    (z, mean, var), grads = jit_vjp_of(fused(activation, axis), x, scale, bias, cts)
    close(grads, jit_vjp_of(oracle(activation, axis), x, scale, bias, cts)[1])
    # Values against numpy in float64, from the definition.
    s = np.abs(np.asarray(scale, np.float64)) + EPS
    y, mu, sig2 = numpy_batch_norm(x, s, bias, axis, eps=EPS)
    np.testing.assert_allclose(z, NUMPY_ACT[activation](y), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, sig2, rtol=1e-5, atol=1e-5)
    assert z.dtype == x.dtype and mean.shape == var.shape == feature_shape(shape, axis)


@pytest.mark.parametrize("affine", ["scale", "bias", "none"])
def test_vjp_without_scale_or_bias(affine):
    shape, axis = (9, 4), -1
    x, scale, bias, cts = make_inputs(shape, axis, seed=2)
    scale = scale if affine == "scale" else None
    bias = bias if affine == "bias" else None
    got = jit_vjp_of(fused("leaky_relu", axis), x, scale, bias, cts)
    want = jit_vjp_of(oracle("leaky_relu", axis), x, scale, bias, cts)
    close(got, want)
    _, (_, dscale, dbias) = got
    assert (dscale is None) == (scale is None) and (dbias is None) == (bias is None)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_cotangent_on_each_output_alone(activation):
    x, scale, bias, cts = make_inputs((12, 4), -1, seed=3)

    @functools.partial(jax.jit, static_argnums=0)
    def each_alone(fn, x, scale, bias, cts):
        _, pull = jax.vjp(fn, x, scale, bias)
        one_hot = [
            [c if i == k else jnp.zeros_like(c) for i, c in enumerate(cts)] for k in range(3)
        ]
        return [pull(tuple(c)) for c in one_hot]

    got = each_alone(fused(activation, -1), x, scale, bias, cts)
    close(got, each_alone(oracle(activation, -1), x, scale, bias, cts))
    for g in got:
        assert float(jnp.abs(g[0]).max()) > 1e-3  # not trivially zero


FD_CASES = [
    ("leaky_relu", *CASES[0]),
    ("leaky_relu", *CASES[4]),
    ("elu", *CASES[3]),
    ("identity", *CASES[5]),
]


@pytest.mark.parametrize(
    ("activation", "shape", "axis"),
    FD_CASES,
    ids=[f"{a}-{case_id(s, ax)}" for a, s, ax in FD_CASES],
)
def test_grads_float64_finite_differences(activation, shape, axis):
    with jax.enable_x64(True):
        x, scale, bias, _ = make_inputs(shape, axis, dtype=jnp.float64, seed=4)
        check_grads(
            jax.jit(fused(activation, axis)),
            (x, scale, bias),
            order=2,
            modes=["rev"],
            atol=1e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("activation", ACTS)
def test_float64_gradients_and_hessian_vector_product_match_reference(activation):
    shape, axis = (6, 3, 4), 1
    with jax.enable_x64(True):
        x, scale, bias, cts = make_inputs(shape, axis, dtype=jnp.float64, seed=5)
        close(
            jit_vjp_of(fused(activation, axis), x, scale, bias, cts),
            jit_vjp_of(oracle(activation, axis), x, scale, bias, cts),
            jnp.float64,
        )

        def hvp(fn):
            def loss(x, s, b):
                z, m, v = fn(x, s, b)
                return jnp.sum(z * cts[0]) ** 2 + jnp.sum(m * cts[1]) + jnp.sum(v * cts[2])

            g = jax.grad(loss, argnums=(0, 1, 2))
            return jax.grad(lambda x, s, b: jnp.vdot(g(x, s, b)[0], cts[0]), argnums=(0, 1, 2))

        got = jax.jit(hvp(fused(activation, axis)))(x, scale, bias)
        want = jax.jit(hvp(oracle(activation, axis)))(x, scale, bias)
        close(got, want, jnp.float64)


def test_public_halves_equal_the_registered_vjp():
    shape, axis = (4, 3, 5, 6), 1
    x, scale, bias, cts = make_inputs(shape, axis, seed=6)
    kw = {"activation": "elu", "axis": axis}
    outs, res = jaxbn.batch_norm_act_fwd(x, scale, bias, **kw)
    grads = jaxbn.batch_norm_act_bwd(res, cts, **kw)
    close((outs, grads), jit_vjp_of(fused("elu", axis), x, scale, bias, cts))
    # Without the keywords the residuals' own (the forward's) are used.
    close(jaxbn.batch_norm_act_bwd(res, cts), grads)
    with pytest.raises(ValueError, match="axis=-1 differs from the forward's feature axes"):
        jaxbn.batch_norm_act_bwd(res, cts, activation="elu", axis=-1)


@pytest.mark.parametrize(
    ("kwargs", "cts", "error", "match"),
    [
        ({"activation": "identity"}, None, ValueError, "activation='identity' differs"),
        ({"negative_slope": 0.5}, None, ValueError, "negative_slope=0.5 differs"),
        ({"axis_name": "batch"}, None, ValueError, "axis_name='batch' differs"),
        ({}, "dz", ValueError, r"dz must have z's shape \(8, 3\)"),
        ({}, "dmean", ValueError, r"dmean must have the feature shape \(axes \(1,\)\)"),
        ({}, "dvar-int", TypeError, "dvar must have a floating-point dtype"),
        ({}, "pair", TypeError, "cotangents must be a triple"),
    ],
    ids=["activation", "slope", "axis_name", "dz", "dmean", "dvar", "pair"],
)
def test_bwd_refuses_what_differs_from_the_forward(kwargs, cts, error, match):
    x = normal(3, (8, 3))
    _, res = jaxbn.batch_norm_act_fwd(x, jnp.ones(3), jnp.zeros(3), negative_slope=0.1)
    good = (x, jnp.zeros(3), jnp.zeros(3))
    bad = {
        None: good,
        "dz": (x[:4], good[1], good[2]),
        "dmean": (x, jnp.zeros((3, 1)), good[2]),
        "dvar-int": (x, good[1], jnp.zeros(3, jnp.int32)),
        "pair": good[:2],
    }[cts]
    with pytest.raises(error, match=match):
        jaxbn.batch_norm_act_bwd(res, bad, **kwargs)


def test_mask_varying_along_features_matches_the_reference():
    """Per-feature counts: values and every gradient against autodiff of the reference."""
    x = 3.0 * normal(4, (6, 3)) + 1.0
    mask = bernoulli(5, 0.7, (6, 3))
    mask[:2] = True
    scale, bias = np.array([0.5, -2.0, 1.5], np.float32), np.array([0.1, 0.0, -0.3], np.float32)
    cts = tuple(normal(6 + i, s) for i, s in enumerate([(6, 3), (3,), (3,)]))

    def fused(x, s, b):
        return jaxbn.batch_norm_act(x, s, b, activation="elu", mask=mask)

    def oracle(x, s, b):
        y, mean, var = jaxbn.reference.batch_norm(x, jnp.abs(s) + 1e-5, b, mask=mask)
        return jax.nn.elu(y), mean, var

    got = jit_vjp_of(fused, x, scale, bias, cts)
    want = jit_vjp_of(oracle, x, scale, bias, cts)
    assert got[1][0].shape == x.shape
    close(got, want)
    # ... and finite differences in float64, to second order.
    with jax.enable_x64(True):
        args = tuple(jnp.asarray(a, jnp.float64) for a in (x, scale, bias))
        check_grads(jax.jit(fused), args, order=2, modes=["rev"])


def test_residuals_hold_z_and_feature_vectors_only(capsys):
    x, scale, bias, _ = make_inputs((32, 8), -1)
    (z, _, _), res = jaxbn.batch_norm_act_fwd(x, scale, bias)
    assert res.z is z
    big = [leaf for leaf in jax.tree.leaves(res) if leaf.size >= x.size]
    assert len(big) == 1 and big[0] is z
    for name in ("inv_std", "scale", "gamma", "bias"):
        assert getattr(res, name).shape == (8,)
    # What jax.vjp keeps: the only x-sized residual is the output z; the unfused
    # composition keeps x as well.
    print_saved_residuals(lambda x, s, b: jaxbn.batch_norm_act(x, s, b), x, scale, bias)
    saved = capsys.readouterr().out.splitlines()
    x_sized = [r for r in saved if r.startswith("f32[32,8]")]
    assert len(x_sized) == 1 and "argument" not in x_sized[0], saved
    print_saved_residuals(
        lambda x, s, b: jax.nn.leaky_relu(jaxbn.batch_norm(x, s, b)[0]), x, scale, bias
    )
    unfused = capsys.readouterr().out.splitlines()
    assert any(r.startswith("f32[32,8] from the argument x") for r in unfused), unfused


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_backward_keeps_nothing_derived_from_z_alive():
    """Compiled memory of a stack of fused layers: only each layer's z is kept.

    Four dense + batch-norm + leaky ReLU layers, [256, 512] activations (512 KiB):
    the unfused stack keeps each layer's batch-norm input; the fused one keeps z
    only, and nothing that XLA could derive from z before the backward reaches
    the layer (the bound fails if y, f'(y) or x_hat is computed after the forward).
    """
    n, c = 256, 512
    x = normal(7, (n, c))
    kernels = [normal(8 + i, (c, c)) / np.sqrt(c) for i in range(4)]
    labels = normal(12, (n, c))

    def loss(op):
        def f(kernels, scale, bias):
            h = x
            for w in kernels:
                h = op(h @ w, scale, bias)
            return jnp.sum((h - labels) ** 2)

        return jax.grad(f, argnums=(0, 1, 2))

    def unfused(u, s, b):
        return jax.nn.leaky_relu(jaxbn.batch_norm(u, s, b)[0])

    args = (kernels, jnp.ones(c), jnp.zeros(c))
    got = _temp_bytes(loss(lambda u, s, b: jaxbn.batch_norm_act(u, s, b)[0]), *args)
    base = _temp_bytes(loss(unfused), *args)
    block = n * c * 4
    assert got <= 3 * block + (1 << 16), (got / block, base / block)
    assert got < base


def test_scale_at_and_near_zero():
    """|gamma| + eps keeps the division finite; the gradient of |.| at 0 is +1."""
    shape, axis = (16, 4), -1
    with jax.enable_x64(True):
        x, _, bias, cts = make_inputs(shape, axis, dtype=jnp.float64, seed=8)
        scale = jnp.array([0.0, -0.0, 1e-9, -1e-9])
        got = jit_vjp_of(fused("leaky_relu", axis), x, scale, bias, cts)
        # The oracle differentiated with respect to the effective scale itself.
        s_eff = jnp.abs(scale) + EPS
        oracle_eff = functools.partial(_oracle_eff, axis=axis)
        (z, mean, var), (dx, ds_eff, dbias) = jit_vjp_of(oracle_eff, x, s_eff, bias, cts)
        close(got[0], (z, mean, var), jnp.float64)
        np.testing.assert_allclose(got[1][0], dx, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got[1][2], dbias, rtol=1e-9, atol=1e-9)
        sign = np.array([1.0, 1.0, 1.0, -1.0])  # +1 at 0 and -0.0: a zero gamma trains
        np.testing.assert_allclose(got[1][1], sign * ds_eff, rtol=1e-6, atol=1e-6)
        assert np.all(np.abs(got[1][1]) > 1e-3)
    # float32: x_hat = (y - bias) / 1e-5 from z in float32 is coarse, but finite.
    x32, b32 = x.astype(jnp.float32), bias.astype(jnp.float32)
    c32 = tuple(c.astype(jnp.float32) for c in cts)
    g32 = jit_vjp_of(fused("leaky_relu", axis), x32, scale.astype(jnp.float32), b32, c32)
    for leaf in jax.tree.leaves(g32):
        assert np.isfinite(np.asarray(leaf)).all()


def _oracle_eff(x, s_eff, b, axis):
    y, mean, var = reference.batch_norm(x, s_eff, b, axis=axis)
    return jax.nn.leaky_relu(y, SLOPE), mean, var


def test_elu_saturated_outputs_stay_finite():
    """An outlier far below the mean: ELU's z rounds to -1 and cannot be inverted.

    The recovered y is clamped; every gradient stays finite, the parameter
    gradients and every other element's dx match the reference (the outlier's
    f'(y) = exp(y) makes its share of every sum negligible).
    """
    shape, axis = (64, 2), -1
    x, _, _, cts = make_inputs(shape, axis, seed=9)
    x = x.at[0, 0].set(-60.0)  # about -7.9 std: y = 3 * x_hat is below -20
    scale, bias = jnp.array([3.0, 1.0]), jnp.array([0.0, 0.5])
    (z, _, _), (dx, ds, db) = jit_vjp_of(fused("elu", axis), x, scale, bias, cts)
    assert float(z[0, 0]) == -1.0
    (_, (dx_r, ds_r, db_r)) = jit_vjp_of(oracle("elu", axis), x, scale, bias, cts)
    assert np.isfinite(np.asarray(dx)).all()
    np.testing.assert_allclose(ds, ds_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db, db_r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx[1:], dx_r[1:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx[0, 1], dx_r[0, 1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_bfloat16_output_in_input_dtype_statistics_in_float32(activation):
    shape, axis = (64, 3, 3, 8), -1
    x32, scale, bias, cts = make_inputs(shape, axis, seed=10)
    x, dz = x32.astype(jnp.bfloat16), cts[0].astype(jnp.bfloat16)
    (z, mean, var), (dx, dscale, dbias) = jit_vjp_of(
        fused(activation, axis), x, scale, bias, (dz, cts[1], cts[2])
    )
    assert z.dtype == dx.dtype == jnp.bfloat16
    assert mean.dtype == var.dtype == jnp.float32
    assert dscale.dtype == dbias.dtype == jnp.float32
    # Against the float32 oracle on the same rounded input and cotangent.
    (z32, m32, v32), (dx32, ds32, db32) = jit_vjp_of(
        oracle(activation, axis),
        x.astype(jnp.float32),
        scale,
        bias,
        (dz.astype(jnp.float32), cts[1], cts[2]),
    )
    np.testing.assert_allclose(mean, m32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, v32, rtol=1e-5, atol=1e-5)
    ulp = float(jnp.finfo(jnp.bfloat16).eps)
    np.testing.assert_allclose(z.astype(jnp.float32), z32, atol=2 * ulp * float(jnp.abs(z32).max()))
    # x_hat is recovered from z in bfloat16: a few units of bfloat16 rounding.
    np.testing.assert_allclose(
        dx.astype(jnp.float32), dx32, atol=8 * ulp * float(jnp.abs(dx32).max())
    )
    np.testing.assert_allclose(dscale, ds32, atol=8 * ulp * float(jnp.abs(ds32).max()))
    np.testing.assert_allclose(dbias, db32, atol=8 * ulp * float(jnp.abs(db32).max()))


@pytest.mark.parametrize(
    ("shape", "axis", "mask"),
    [
        ((10, 3), -1, np.arange(10) < 7),
        ((4, 3, 2, 5), 1, (np.arange(4) != 1).reshape(4, 1, 1, 1)),
        ((6, 4, 3), -1, np.arange(24).reshape(6, 4) % 5 != 0),
    ],
    ids=["N", "NCHW-N111", "NL"],
)
def test_masks_match_reference(shape, axis, mask):
    x, scale, bias, cts = make_inputs(shape, axis, seed=11)
    mask = jnp.asarray(mask)
    activation = "elu" if mask.ndim == 2 else "leaky_relu"  # ELU on one case
    got = jit_vjp_of(fused(activation, axis, mask=mask), x, scale, bias, cts)
    want = jit_vjp_of(oracle(activation, axis, mask=mask), x, scale, bias, cts)
    close(got, want)


def test_all_masked_batch_gives_finite_gradients():
    x, scale, bias, cts = make_inputs((6, 3), -1, seed=12)
    mask = jnp.zeros(6, bool)
    got = jit_vjp_of(fused("leaky_relu", -1, mask=mask), x, scale, bias, cts)
    want = jit_vjp_of(oracle("leaky_relu", -1, mask=mask), x, scale, bias, cts)
    close(got, want)


def test_composes_with_jit_vmap_scan_checkpoint_eval_shape():
    shape, axis = (6, 5, 4), -1
    x, scale, bias, cts = make_inputs(shape, axis, seed=13)

    def loss(fn):
        def f(x, s, b):
            z, m, v = fn(x, s, b)
            return jnp.sum(z * cts[0]) + jnp.sum(m * cts[1]) + jnp.sum(v * cts[2])

        return f

    # Each transformation is also jitted (one compile each, not op-by-op dispatch).
    want = jax.jit(jax.grad(loss(oracle("elu", axis)), argnums=(0, 1, 2)))(x, scale, bias)
    grad = jax.grad(loss(fused("elu", axis)), argnums=(0, 1, 2))
    close(jax.jit(grad)(x, scale, bias), want)
    ckpt = jax.grad(jax.checkpoint(loss(fused("elu", axis))), argnums=(0, 1, 2))
    close(jax.jit(ckpt)(x, scale, bias), want)

    # vmap over the leading axis: each slice is its own batch of shape (5, 4).
    def slice_grad(fn):
        return jax.jit(
            jax.vmap(
                jax.grad(lambda x, s, b, c: jnp.sum(fn(x, s, b)[0] * c), argnums=(0, 1, 2)),
                (0, None, None, 0),
            )
        )

    got_v = slice_grad(fused("leaky_relu", axis))(x, scale, bias, cts[0])
    want_v = slice_grad(oracle("leaky_relu", axis))(x, scale, bias, cts[0])
    close(got_v, want_v)

    # scan over the slices, accumulating the gradient of scale.
    def body(carry, xs):
        xi, ci = xs
        g = jax.grad(lambda s: jnp.sum(fused("leaky_relu", axis)(xi, s, bias)[0] * ci))(scale)
        return carry + g, g

    total, gs = jax.lax.scan(body, jnp.zeros_like(scale), (x, cts[0]))
    close(gs, want_v[1])
    close(total, want_v[1].sum(0))

    out = jax.eval_shape(
        functools.partial(jaxbn.batch_norm_act, axis=1), jnp.zeros((8, 3, 4, 4)), None, None
    )
    assert [o.shape for o in out] == [(8, 3, 4, 4), (3,), (3,)]


def test_invert_activation_round_trips():
    y = jnp.linspace(-6.0, 6.0, 101)
    for name in act.INVERTIBLE_ACTIVATIONS:
        z = act.activate(y, name, negative_slope=SLOPE)
        y_back, fprime = act.invert_activation(z, name, SLOPE)
        np.testing.assert_allclose(y_back, y, rtol=1e-5, atol=1e-5)
        want = jax.vmap(jax.grad(lambda v, n=name: act.activate(v, n, negative_slope=SLOPE)))(y)
        np.testing.assert_allclose(jnp.broadcast_to(fprime, y.shape), want, rtol=1e-5)


# --------------------------------------------------------------------------- bad input


def traced(fn, *args, **kwargs):
    return jax.eval_shape(functools.partial(fn, **kwargs), *args)


x0, v0 = jnp.ones((4, 3)), jnp.ones(3)


@pytest.mark.parametrize("op", [jaxbn.batch_norm_act, jaxbn.batch_norm_act_fwd], ids=["op", "fwd"])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"activation": "relu"},
            ValueError,
            r"activation must be one of .*'relu' is not invertible",
        ),
        ({"activation": "gelu"}, ValueError, r"got 'gelu' \('gelu' is not invertible"),
        ({"activation": "swish"}, ValueError, r"activation must be one of .*got 'swish'"),
        ({"negative_slope": 0.0}, ValueError, r"negative_slope must be a finite number > 0.*0\.0"),
        ({"negative_slope": -0.1}, ValueError, r"negative_slope must be .*-0\.1"),
        ({"negative_slope": float("inf")}, ValueError, r"negative_slope must be .*inf"),
        ({"negative_slope": float("nan")}, ValueError, r"negative_slope must be .*nan"),
        ({"negative_slope": True}, TypeError, "negative_slope must be a Python float, got bool"),
        ({"negative_slope": jnp.float32(0.1)}, TypeError, "negative_slope must be a Python float"),
        ({"negative_slope": 1e-39}, ValueError, r"negative_slope=1e-39 is too small .*float32"),
        ({"negative_slope": 5e-324}, ValueError, r"negative_slope=5e-324 is too small"),
        ({"eps": 0.0}, ValueError, "eps must be > 0"),
        ({"axis": 2}, ValueError, "axis 2 is out of range"),
    ],
)
def test_op_errors_while_tracing(op, kwargs, error, match):
    with pytest.raises(error, match=match):
        traced(op, x0, v0, v0, **kwargs)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: jaxbn.BatchNorm(3, activation="swish"), ValueError, "activation must be None or"),
        (
            lambda: jaxbn.BatchNorm(3, activation="leaky_relu", negative_slope=0.0),
            ValueError,
            "negative_slope must be a finite number > 0",
        ),
        (
            lambda: jaxbn.BatchNorm(3, activation="elu", renorm=True),
            ValueError,
            "cannot be combined with renorm",
        ),
        (
            lambda: jaxbn.MLP((4, 8, 2), activation="relu", fuse_activation=True),
            ValueError,
            r"activation \(with fuse_activation=True\) must be one of .*'relu' is not invertible",
        ),
        (
            lambda: jaxbn.MLP((4, 8, 2), activation="tanh", fuse_activation=True),
            ValueError,
            "'tanh' is not invertible",
        ),
        (
            lambda: jaxbn.MLP(
                (4, 8, 2), activation="leaky_relu", fuse_activation=True, use_batch_norm=False
            ),
            ValueError,
            "fuse_activation=True needs use_batch_norm=True",
        ),
    ],
    ids=["bn-name", "bn-slope", "bn-renorm", "mlp-relu", "mlp-tanh", "mlp-no-bn"],
)
def test_config_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --------------------------------------------------------------------------- layers


def test_layer_with_invertible_activation_runs_the_fused_op():
    bn = jaxbn.BatchNorm(4, activation="leaky_relu", negative_slope=SLOPE, momentum=0.9)
    assert bn.fused
    params, state = bn.init()
    params = {"scale": jnp.array([1.0, -2.0, 0.5, 0.25]), "bias": jnp.arange(4.0) - 1.5}
    x, _, _, cts = make_inputs((16, 4), -1, seed=14)
    (z, new_state), pull = jax.vjp(lambda p: bn.apply(p, state, x, training=True), params)
    (want_z, mean, _), pull_ref = jax.vjp(
        lambda p: oracle("leaky_relu", -1)(x, p["scale"], p["bias"]), params
    )
    close(z, want_z)
    np.testing.assert_allclose(new_state["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
    zero_state = jax.tree.map(jnp.zeros_like, new_state)
    close(
        pull((cts[0], zero_state)),
        pull_ref((cts[0], jnp.zeros(4), jnp.zeros(4))),
        jnp.float32,
    )
    # Evaluation: the same effective scale, with the running statistics.
    y_eval, _ = bn.apply(params, new_state, x, training=False)
    s_eff = jnp.abs(params["scale"]) + bn.eps
    want = jaxbn.batch_norm_inference(x, s_eff, params["bias"], new_state["mean"], new_state["var"])
    close(y_eval, jax.nn.leaky_relu(want, SLOPE))


def test_layer_with_other_activation_applies_it_after_batch_norm():
    bn = jaxbn.BatchNorm(4, activation="relu")
    assert not bn.fused
    params, state = bn.init()
    params = {"scale": jnp.array([1.0, -2.0, 0.5, 1.5]), "bias": jnp.arange(4.0) - 1}
    x = make_inputs((16, 4), -1, seed=15)[0]
    y, new_state = bn.apply(params, state, x, training=True)
    plain, plain_state = jaxbn.BatchNorm(4).apply(params, state, x, training=True)
    close((y, new_state), (jax.nn.relu(plain), plain_state))
    y_eval, _ = bn.apply(params, new_state, x, training=False)
    plain_eval, _ = jaxbn.BatchNorm(4).apply(params, new_state, x, training=False)
    close(y_eval, jax.nn.relu(plain_eval))


def test_ghost_batch_norm_with_fused_activation():
    bn = jaxbn.BatchNorm(3, activation="elu", virtual_batch_size=4)
    params, state = bn.init()
    x = make_inputs((12, 3), -1, seed=16)[0]
    z, _ = bn.apply(params, state, x, training=True)
    groups = [
        oracle("elu", -1)(x[i : i + 4], params["scale"], params["bias"])[0] for i in (0, 4, 8)
    ]
    close(z, jnp.concatenate(groups))


def _effective(params, eps=EPS):
    """MLP params with every batch-norm scale replaced by |scale| + eps."""
    out = jax.tree.map(lambda a: a, params)
    for layer in out["layers"]:
        if "batch_norm" in layer:
            layer["batch_norm"]["scale"] = jnp.abs(layer["batch_norm"]["scale"]) + eps
    return out


@pytest.mark.parametrize("activation", ["leaky_relu", "elu"])
def test_fused_mlp_equals_unfused_mlp_with_effective_scale(activation):
    unfused = jaxbn.MLP((6, 8, 8, 3), activation=activation)
    model = dataclasses.replace(unfused, fuse_activation=True)
    params, state = model.init(jax.random.key(1))
    x = make_inputs((10, 6), -1, seed=17)[0]
    ct = normal(2, (10, 3))

    def run(m, p):
        (logits, new_state), pull = jax.vjp(lambda p: m.apply(p, state, x, training=True), p)
        return logits, new_state, pull((ct, jax.tree.map(jnp.zeros_like, new_state)))[0]

    logits, new_state, grads = run(model, params)
    # Gradients with respect to the effective scale equal the raw ones (scale > 0).
    want_logits, want_state, want_grads = run(unfused, _effective(params))
    close((logits, new_state, grads), (want_logits, want_state, want_grads), jnp.float32)
    close(
        model.pre_activations(params, state, x, training=True),
        unfused.pre_activations(_effective(params), state, x, training=True),
        jnp.float32,
    )
    evals = model.apply(params, new_state, x, training=False)[0]
    close(evals, unfused.apply(_effective(params), new_state, x, training=False)[0], jnp.float32)
    folded, fparams, fstate = model.fold(params, new_state)
    assert not folded.fuse_activation and not folded.use_batch_norm
    close(folded.apply(fparams, fstate, x, training=False)[0], evals)


def test_fused_mlp_trains_to_the_unfused_accuracy():
    data = load_digits()
    accuracy = {}
    for fuse in (False, True):
        model = jaxbn.MLP((64, 64, 64, 10), activation="leaky_relu", fuse_activation=fuse)
        opt = optax.sgd(0.05, momentum=0.9)
        run = make_train_loop(model, opt, batch_size=60)
        ts = init_train_state(model, opt, jax.random.key(0))
        ts, _ = run(ts, data.x_train, data.y_train, 300)
        metrics = evaluate(model, ts.params, ts.state, data.x_test, data.y_test)
        accuracy[fuse] = float(metrics["accuracy"])
    assert accuracy[False] >= 0.93, accuracy
    assert accuracy[True] >= accuracy[False] - 0.015, accuracy


def test_numpy_scalar_slope_is_a_number():
    got = jaxbn.batch_norm_act(
        x0 * jnp.arange(4.0)[:, None], None, None, negative_slope=np.float32(0.5)
    )
    want = jaxbn.batch_norm_act(x0 * jnp.arange(4.0)[:, None], None, None, negative_slope=0.5)
    np.testing.assert_array_equal(got[0], want[0])


def test_slope_that_underflows_in_float16_is_refused():
    x = jnp.ones((4, 3), jnp.float16)
    with pytest.raises(ValueError, match=r"negative_slope=1e-08 is too small .*float16"):
        traced(jaxbn.batch_norm_act, x, v0, v0, negative_slope=1e-8)
    traced(jaxbn.batch_norm_act, x, v0, v0, negative_slope=0.01)  # the default is fine


PRECISION_CASES = [(1.0, 0.0), (1.0, 3.0), (0.1, 1.0), (0.01, 1.0), (0.0, 0.0), (1e-3, 0.0)]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize(("gamma", "beta"), PRECISION_CASES, ids=str)
def test_recovery_within_the_documented_bound(dtype, gamma, beta):
    """Every gradient within 4 eps (|beta| + 3 s) / s of the exact one (module docstring)."""
    x = (2.0 * normal(21, (512, 4)) + 1.0).astype(dtype)
    cts = (normal(22, (512, 4)).astype(dtype), *normal(23, (2, 4)))
    scale, bias = np.full(4, gamma, np.float32), np.full(4, beta, np.float32)
    got = jit_vjp_of(fused("leaky_relu", -1), x, scale, bias, cts)[1]
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(v, np.float32), jnp.float64) for v in (x, scale, bias)]
        c64 = tuple(jnp.asarray(np.asarray(c, np.float32), jnp.float64) for c in cts)
        want = jax.tree.map(np.asarray, jit_vjp_of(oracle("leaky_relu", -1), *args, c64)[1])
    s = abs(gamma) + EPS
    bound = 4 * float(jnp.finfo(dtype).eps) * (abs(beta) + 3 * s) / s
    for g, w in zip(got, want, strict=True):
        err = np.abs(np.asarray(g, np.float64) - w).max() / np.abs(w).max()
        assert err <= bound, (err, bound)


def test_recovery_is_lost_where_the_bound_says_so():
    """bfloat16, gamma = 0, beta = 0.5: y rounds to beta and dgamma is lost (documented)."""
    x = normal(22, (64, 4)).astype(jnp.bfloat16)
    dz = normal(23, (64, 4)).astype(jnp.bfloat16)
    _, pull = jax.vjp(lambda s: jaxbn.batch_norm_act(x, s, jnp.full(4, 0.5))[0], jnp.zeros(4))
    _, pull_f32 = jax.vjp(
        lambda s: jaxbn.batch_norm_act(x.astype(jnp.float32), s, jnp.full(4, 0.5))[0], jnp.zeros(4)
    )
    (dgamma,), (dgamma_f32,) = pull(dz), pull_f32(dz.astype(jnp.float32))
    assert np.abs(np.asarray(dgamma_f32)).min() > 0.1
    assert (
        np.abs(np.asarray(dgamma) - np.asarray(dgamma_f32)).max() > 0.5 * np.abs(dgamma_f32).max()
    )


def test_grad_of_grad_with_a_feature_that_keeps_nothing():
    """A feature whose mask keeps nothing: finite second derivatives (max(count, 1))."""
    x, scale, bias, cts = make_inputs((8, 3), -1, seed=24)
    mask = jnp.ones((8, 3), bool).at[:, 1].set(False)

    def loss(x, scale, bias):
        z, mean, var = jaxbn.batch_norm_act(x, scale, bias, mask=mask)
        return jnp.sum(z * cts[0]) + jnp.sum(mean * cts[1]) + jnp.sum(var * cts[2])

    hessian_diag = jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(loss)(x, scale, bias) ** 2)))(x)
    assert np.isfinite(np.asarray(hessian_diag)).all()
    assert np.abs(np.asarray(hessian_diag)[:, 0]).max() > 0  # not trivially zero


@pytest.mark.parametrize("mode", ["eval", "frozen"])
def test_effective_scale_gradient_at_signed_zero_is_plus_one(mode):
    """In evaluation and frozen mode too, d|gamma|/dgamma = +1 at +0 and -0."""
    bn = jaxbn.BatchNorm(2, activation="leaky_relu", frozen=mode == "frozen")
    params, state = bn.init()
    params = {**params, "scale": jnp.array([0.0, -0.0])}
    x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])

    def out(scale):
        y, _ = bn.apply({**params, "scale": scale}, state, x, training=mode == "frozen")
        return jnp.sum(y)

    # y = (|gamma| + eps) * x_hat + beta with running mean 0, var 1: dy/dgamma = +x_hat.
    x_hat = np.asarray(x) / np.sqrt(1.0 + bn.eps)
    want = np.where(x_hat * 1e-5 >= 0, 1.0, 0.01) * x_hat
    np.testing.assert_allclose(jax.grad(out)(params["scale"]), want.sum(0), rtol=1e-5)

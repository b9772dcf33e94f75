"""The custom-VJP op against the autodiff reference, finite differences and numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference
from tests._op_cases import (
    CASES,
    IDS,
    TOL,
    assert_trees_close,
    feature_shape,
    jit_vjp_of,
    make_inputs,
    numpy_batch_norm,
    traced,
)


def op(fn, axis=-1, **kw):
    """``fn`` (the op or the reference) as a function of ``(x, scale, bias)``."""
    return functools.partial(fn, axis=axis, **kw)


@pytest.mark.parametrize(("shape", "axis"), CASES, ids=IDS)
def test_values_and_vjp_match_numpy_and_reference(shape, axis):
    x, scale, bias, cts = make_inputs(shape, axis, seed=1)
    got = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    assert_trees_close(
        got, jit_vjp_of(op(reference.batch_norm, axis), x, scale, bias, cts), jnp.float32
    )
    # And the values against numpy in float64, computed from the definition.
    for g, w in zip(got[0], numpy_batch_norm(x, scale, bias, axis), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    assert got[0][1].shape == got[0][2].shape == feature_shape(shape, axis)
    assert got[1][0].shape == x.shape


@pytest.mark.parametrize("affine", ["scale", "bias", "none"])
def test_vjp_without_scale_or_bias(affine):
    shape, axis = (4, 3, 5, 6), 1
    x, scale, bias, cts = make_inputs(shape, axis, seed=1)
    scale = scale if affine == "scale" else None
    bias = bias if affine == "bias" else None
    got = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    want = jit_vjp_of(op(reference.batch_norm, axis), x, scale, bias, cts)
    assert_trees_close(got, want, jnp.float32)
    _, (_, dscale, dbias) = got
    assert (dscale is None) == (scale is None) and (dbias is None) == (bias is None)


def test_cotangent_on_each_output_alone():
    """Each output's cotangent alone (others zero) gives the reference's gradient."""
    x, scale, bias, cts = make_inputs((9, 4), -1, seed=2)

    @functools.partial(jax.jit, static_argnums=0)
    def each_alone(fn, x, scale, bias, cts):
        _, pull = jax.vjp(fn, x, scale, bias)
        return [
            pull(tuple(c if i == k else jnp.zeros_like(c) for i, c in enumerate(cts)))
            for k in range(3)
        ]

    got = each_alone(jaxbn.batch_norm, x, scale, bias, cts)
    want = each_alone(reference.batch_norm, x, scale, bias, cts)
    assert_trees_close(got, want, jnp.float32)
    for g in got:  # not trivially zero (a test that cannot fail proves nothing)
        assert float(jnp.abs(g[0]).max()) > 1e-3


@pytest.mark.parametrize(
    ("shape", "axis", "affine"),
    [
        (*CASES[0], True),
        (*CASES[3], True),
        (*CASES[4], True),
        (*CASES[5], True),
        ((8, 3), -1, False),
    ],
    ids=[*(IDS[i] for i in (0, 3, 4, 5)), "8x3-no-affine"],
)
def test_grads_float64_finite_differences(shape, axis, affine):
    with jax.enable_x64(True):
        x, scale, bias, _ = make_inputs(shape, axis, dtype=jnp.float64, seed=3)
        args = (x, scale, bias) if affine else (x, None, None)
        check_grads(
            jax.jit(op(jaxbn.batch_norm, axis)), args, order=2, modes=["rev"], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize(("shape", "axis"), [((6, 3), -1), ((3, 2, 4, 2), 1)])
def test_float64_gradients_and_second_derivatives_match_reference(shape, axis):
    """The VJP and, reverse over reverse, a Hessian-vector product of a scalar loss."""
    with jax.enable_x64(True):
        x, scale, bias, cts = make_inputs(shape, axis, dtype=jnp.float64, seed=5)
        assert_trees_close(
            jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts),
            jit_vjp_of(op(reference.batch_norm, axis), x, scale, bias, cts),
            jnp.float64,
        )

        def hvp(fn):
            def loss(x, s, b):
                y, m, v = fn(x, s, b, axis=axis)
                return jnp.sum(y * cts[0]) ** 2 + jnp.sum(m * cts[1]) + jnp.sum(v * cts[2])

            g = jax.grad(loss, argnums=(0, 1, 2))
            return jax.grad(lambda x, s, b: jnp.vdot(g(x, s, b)[0], cts[0]), argnums=(0, 1, 2))

        got = jax.jit(hvp(jaxbn.batch_norm))(x, scale, bias)
        want = jax.jit(hvp(reference.batch_norm))(x, scale, bias)
        assert_trees_close(got, want, jnp.float64)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    data=st.data(),
    ndim=st.integers(1, 4),
    with_scale=st.booleans(),
    with_bias=st.booleans(),
)
def test_property_random_shapes_and_axes(data, ndim, with_scale, with_bias):
    shape = tuple(data.draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    nfeat = data.draw(st.integers(1, ndim))
    axes = tuple(data.draw(st.permutations(range(ndim)))[:nfeat])
    if ndim == nfeat or np.prod([shape[a] for a in range(ndim) if a not in axes]) < 2:
        shape = (*shape[:-1], shape[-1] + 2) if ndim - 1 not in axes else shape
        red = [a for a in range(ndim) if a not in axes]
        if not red or np.prod([shape[a] for a in red]) < 2:
            return  # nothing to reduce over: covered by the error test below
    axis = axes[0] if len(axes) == 1 and data.draw(st.booleans()) else axes
    x, scale, bias, cts = make_inputs(shape, axis, seed=len(shape))
    scale = scale if with_scale else None
    bias = bias if with_bias else None
    got = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    want = jit_vjp_of(op(reference.batch_norm, axis), x, scale, bias, cts)
    # Tiny batches amplify rounding (1 / std of two values): looser atol here.
    rtol, _ = TOL[jnp.float32]
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, v, rtol=10 * rtol, atol=1e-4), got, want
    )


def test_public_halves_equal_the_registered_vjp():
    shape, axis = (4, 3, 5, 6), 1
    x, scale, bias, cts = make_inputs(shape, axis, seed=6)
    outs, res = jaxbn.batch_norm_fwd(x, scale, bias, axis=axis)
    grads = jaxbn.batch_norm_bwd(res, cts, axis=axis)
    want_outs, want_grads = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    assert_trees_close(outs, want_outs, jnp.float32)
    assert_trees_close(grads, want_grads, jnp.float32)


def test_residuals_hold_x_and_feature_vectors_only():
    x, scale, bias, _ = make_inputs((32, 8), -1)
    _, res = jaxbn.batch_norm_fwd(x, scale, bias)
    assert res.x is x
    for name in ("mean", "mean_residue", "inv_std", "scale"):
        assert getattr(res, name).shape == (8,)
    assert (res.axes, res.axis_name) == ((1,), ())  # static: the forward's axes, no names
    assert res.bias.size == 0 and res.mask is None and res.count.shape == ()
    # Nothing of x's size but x itself.
    big = [leaf for leaf in jax.tree.leaves(res) if leaf.size >= x.size]
    assert len(big) == 1


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_large_offset_statistics_and_gradients(offset):
    """float32 at |mean| >> std: statistics and gradients stay close to float64."""
    shape, axis = (512, 6), -1
    x, scale, bias, cts = make_inputs(shape, axis, seed=7, offset=offset)
    (y, mean, var), grads = jit_vjp_of(jaxbn.batch_norm, x, scale, bias, cts)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x), jnp.float64)
        c64 = tuple(jnp.asarray(np.asarray(c), jnp.float64) for c in cts)
        s64, b64 = (jnp.asarray(np.asarray(v), jnp.float64) for v in (scale, bias))
        (y_t, mean_t, var_t), grads_t = jit_vjp_of(reference.batch_norm, x64, s64, b64, c64)
        y_t, mean_t, var_t, grads_t = jax.tree.map(np.asarray, (y_t, mean_t, var_t, grads_t))
    for leaf in jax.tree.leaves((y, mean, var, grads)):
        assert np.isfinite(np.asarray(leaf)).all()
    # x is exact in float32 (it was rounded before the float64 copy), so the truth is exact.
    tol = 0.01 if offset == 1e4 else 0.05
    np.testing.assert_allclose(var, var_t, rtol=tol)
    np.testing.assert_allclose(y, y_t, atol=tol * 4)
    for g, g_t in zip(grads, grads_t, strict=True):
        np.testing.assert_allclose(g, g_t, atol=tol * np.abs(g_t).max())


def outlier_and_offset_batches():
    """n = 1e5 samples of N(0, 1) per feature: one outlier (at the start, the middle
    or the end: wherever a shift might be taken), or all offset by 1e4 or 1e6."""
    z = np.asarray(jax.random.normal(jax.random.key(12), (100_000, 4)), np.float64)
    cases = {"offset-1e4": z + 1e4, "offset-1e6": z + 1e6}
    for name, i in (("outlier-first", 0), ("outlier-middle", 50_000), ("outlier-last", -1)):
        cases[name] = z.copy()
        cases[name][i] = 1e4
    return cases


@pytest.mark.parametrize(
    "case", ["outlier-first", "outlier-middle", "outlier-last", "offset-1e4", "offset-1e6"]
)
def test_variance_is_robust_to_any_sample_and_to_large_offsets(case):
    """float32 statistics close to the float64 truth (variance within 1e-5):
    a sample far out, or every sample far from zero."""
    x = outlier_and_offset_batches()[case].astype(np.float32)
    x64 = x.astype(np.float64)
    truth = np.var(x64, axis=0)
    _, mean, var = jaxbn.batch_norm(jnp.asarray(x), None, None)
    np.testing.assert_allclose(np.asarray(var, np.float64), truth, rtol=1e-5)
    # The mean to within float32's spacing at its magnitude (a unit spread).
    spacing = np.spacing(np.abs(x64.mean(0)).astype(np.float32)).astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=0, atol=np.max(spacing) + 1e-5)
    _, _, var_s = jaxbn.batch_stats(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(var_s, np.float64), truth, rtol=1e-5)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_backward_with_cotangents_on_mean_and_var_alone_at_large_offset(offset):
    """dy = 0: dx = g_mean / n + 2 g_var (x - mu) / n needs sum(x - mu) = 0, which
    x - (rounded mean) breaks; dx stays within 2x the reference's error."""
    shape = (4096, 8)
    ks = jax.random.split(jax.random.key(13), 4)
    x = (jax.random.normal(ks[0], shape) + offset).astype(jnp.float32)
    scale = 1.0 + 0.5 * jax.random.normal(ks[1], (8,))
    bias = jnp.zeros(8)
    cts = (jnp.zeros(shape), jax.random.normal(ks[2], (8,)), jax.random.normal(ks[3], (8,)))

    def dx_of(fn, x, scale, bias, cts):
        return np.asarray(jit_vjp_of(fn, x, scale, bias, cts)[1][0], np.float64)

    got = dx_of(jaxbn.batch_norm, x, scale, bias, cts)
    ref = dx_of(reference.batch_norm, x, scale, bias, cts)
    with jax.enable_x64(True):
        f64 = [jnp.asarray(np.asarray(v), jnp.float64) for v in (x, scale, bias, *cts)]
        truth = dx_of(reference.batch_norm, *f64[:3], tuple(f64[3:]))
    big = np.abs(truth).max()
    err, ref_err = np.abs(got - truth).max() / big, np.abs(ref - truth).max() / big
    assert err <= 2 * ref_err + 1e-7, (err, ref_err)


def test_naive_one_pass_variance_would_fail_at_large_offset():
    """Shows what the robustness test guards against: E[x^2] - E[x]^2 in float32."""
    x = make_inputs((512, 6), -1, seed=7, offset=1e4)[0]
    naive = jnp.mean(x * x, axis=0) - jnp.mean(x, axis=0) ** 2
    truth = np.var(np.asarray(x, np.float64), axis=0)
    assert np.abs(np.asarray(naive) / truth - 1).max() > 0.01
    np.testing.assert_allclose(jaxbn.batch_norm(x, None, None)[2], truth, rtol=0.01)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
def test_low_precision_reduced_in_float32(dtype):
    shape, axis = (64, 3, 3, 8), -1
    x32, scale, bias, cts = make_inputs(shape, axis, seed=8, offset=3.0)
    x = x32.astype(dtype)
    (y, mean, var), (dx, dscale, dbias) = jit_vjp_of(
        jaxbn.batch_norm, x, scale, bias, (cts[0].astype(dtype), cts[1], cts[2])
    )
    assert y.dtype == dtype and dx.dtype == dtype
    assert mean.dtype == var.dtype == jnp.float32
    assert dscale.dtype == scale.dtype and dbias.dtype == bias.dtype
    # Against a float32 computation on the same (rounded) input, rounded to dtype.
    xr = x.astype(jnp.float32)
    ct32 = (cts[0].astype(dtype).astype(jnp.float32), *cts[1:])
    (y32, m32, v32), (dx32, ds32, db32) = jit_vjp_of(reference.batch_norm, xr, scale, bias, ct32)
    np.testing.assert_allclose(mean, m32, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(var, v32, rtol=1e-5, atol=1e-5)
    eps_out = float(jnp.finfo(dtype).eps)
    ymax = float(jnp.abs(y32).max())
    np.testing.assert_allclose(
        y.astype(jnp.float32), y32.astype(dtype).astype(jnp.float32), atol=2 * eps_out * ymax
    )
    dxmax = float(jnp.abs(dx32).max())
    np.testing.assert_allclose(dx.astype(jnp.float32), dx32, atol=2 * eps_out * dxmax)
    np.testing.assert_allclose(dscale, ds32, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dbias, db32, rtol=1e-4, atol=1e-3)


def test_parameter_gradients_keep_parameter_dtype():
    x, scale, bias, cts = make_inputs((8, 4), -1, seed=9)
    with jax.enable_x64(True):
        _, (dx, dscale, dbias) = jit_vjp_of(
            jaxbn.batch_norm, x, scale.astype(jnp.float64), bias.astype(jnp.float16), cts
        )
        assert (dx.dtype, dscale.dtype, dbias.dtype) == (jnp.float32, jnp.float64, jnp.float16)


def loss_fn(fn, cts, axis):
    def f(x, scale, bias):
        y, mean, var = fn(x, scale, bias, axis=axis)
        return jnp.sum(y * cts[0]) + jnp.sum(mean * cts[1]) + jnp.sum(var * cts[2])

    return f


def test_composes_with_jit_vmap_checkpoint_scan_eval_shape():
    shape, axis = (6, 5, 4), -1
    x, scale, bias, cts = make_inputs(shape, axis, seed=10)
    grad = jax.grad(loss_fn(jaxbn.batch_norm, cts, axis), argnums=(0, 1, 2))
    # Each transformation is also jitted (one compile each, not op-by-op dispatch).
    want = jax.jit(jax.grad(loss_fn(reference.batch_norm, cts, axis), argnums=(0, 1, 2)))(
        x, scale, bias
    )

    assert_trees_close(jax.jit(grad)(x, scale, bias), want, jnp.float32)
    ckpt = jax.grad(jax.checkpoint(loss_fn(jaxbn.batch_norm, cts, axis)), argnums=(0, 1, 2))
    assert_trees_close(jax.jit(ckpt)(x, scale, bias), want, jnp.float32)

    # vmap over a leading axis: each slice is its own batch of shape (5, 4).
    bgrad = jax.jit(
        jax.vmap(
            jax.grad(lambda x, s, b, c: jnp.sum(jaxbn.batch_norm(x, s, b)[0] * c)),
            (0, None, None, 0),
        )
    )
    rgrad = jax.jit(
        jax.vmap(
            jax.grad(lambda x, s, b, c: jnp.sum(reference.batch_norm(x, s, b)[0] * c)),
            (0, None, None, 0),
        )
    )
    assert_trees_close(bgrad(x, scale, bias, cts[0]), rgrad(x, scale, bias, cts[0]), jnp.float32)
    stats = jax.vmap(lambda x: jaxbn.batch_norm(x, None, None)[1])(x)
    assert stats.shape == (6, 4)

    # scan: normalize each slice and accumulate the gradients.
    def body(carry, xs):
        xi, ci = xs
        g = jax.grad(lambda x: jnp.sum(jaxbn.batch_norm(x, scale, bias)[0] * ci))(xi)
        return carry + g.sum(), g

    total, gs = jax.lax.scan(body, 0.0, (x, cts[0]))
    want_gs = rgrad(x, scale, bias, cts[0])
    assert_trees_close(gs, want_gs, jnp.float32)
    np.testing.assert_allclose(total, want_gs.sum(), rtol=1e-4, atol=1e-4)

    out = jax.eval_shape(
        functools.partial(jaxbn.batch_norm, axis=1), jnp.zeros((8, 3, 4, 4)), None, None
    )
    assert [o.shape for o in out] == [(8, 3, 4, 4), (3,), (3,)]


def test_forward_mode_is_refused_and_reference_supports_it():
    x, scale, bias, cts = make_inputs((8, 3), -1)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: jaxbn.batch_norm(x, scale, bias)[0], (x,), (cts[0][:8, :3],))
    _, t = jax.jvp(lambda x: reference.batch_norm(x, scale, bias)[0], (x,), (cts[0],))
    assert t.shape == x.shape


# The seed notebook's two mistakes, written as a custom VJP: the same gradient check
# that the op passes must catch each of them.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def seed_like_batch_norm(x, scale, bias, scalar_variance=False, use_output_as_dy=False):
    return _seed_fwd(x, scale, bias, scalar_variance, use_output_as_dy)[0]


def _seed_fwd(x, scale, bias, scalar_variance, use_output_as_dy):
    mean = x.mean(0)
    var = ((x - mean) ** 2).mean() if scalar_variance else ((x - mean) ** 2).mean(0)
    x_hat = (x - mean) / jnp.sqrt(var + 1e-5)
    y = x_hat * scale + bias
    return y, (x, x_hat, y, var, scale)


def _seed_bwd(scalar_variance, use_output_as_dy, res, dy):
    x, x_hat, y, var, scale = res
    g = y if use_output_as_dy else dy  # the seed multiplies Z_out here
    n = x.shape[0]
    inv_std = 1 / jnp.sqrt(var + 1e-5)
    dx_hat = g * scale
    dx = inv_std / n * (n * dx_hat - dx_hat.sum(0) - x_hat * (dx_hat * x_hat).sum(0))
    return dx, (g * x_hat).sum(0), g.sum(0)


seed_like_batch_norm.defvjp(_seed_fwd, _seed_bwd)


@pytest.mark.parametrize(
    "mistake",
    [{}, {"scalar_variance": True}, {"use_output_as_dy": True}],
    ids=["fixed", "scalar-var", "z-out"],
)
def test_seed_notebook_mistakes_fail_the_gradient_check(mistake):
    x, scale, bias, cts = make_inputs((16, 4), -1, seed=11)
    x = x * jnp.array([1.0, 3.0, 0.5, 2.0])  # features with different spreads
    _, pull = jax.vjp(lambda x, s, b: seed_like_batch_norm(x, s, b, **mistake), x, scale, bias)
    got = pull(cts[0])
    _, pull_ref = jax.vjp(lambda x, s, b: reference.batch_norm(x, s, b)[0], x, scale, bias)
    want = pull_ref(cts[0])
    close = all(np.allclose(g, w, rtol=1e-4, atol=1e-4) for g, w in zip(got, want, strict=True))
    assert close == (not mistake)


# XLA:CPU's fusion workaround (_core.handles) applies only where the op is lowered for
# the CPU; the other branch (GPU, TPU) is tested here on the CPU for its numbers.


def _lowered_text(platform):
    x = jnp.ones((64, 8))

    def step(x, dy):
        y, pull = jax.vjp(lambda x: jaxbn.batch_norm(x, None, None)[0], x)
        return y, pull(dy)

    return jax.jit(step).trace(x, x).lower(lowering_platforms=(platform,)).as_text()


def test_cpu_fusion_workaround_only_where_lowered_for_the_cpu():
    cpu, cuda = _lowered_text("cpu"), _lowered_text("cuda")
    assert "optimization_barrier" in cpu
    assert "optimization_barrier" not in cuda
    # _computed_once: one extra reduction per direction, on the CPU only.
    assert cpu.count("stablehlo.reduce") == cuda.count("stablehlo.reduce") + 2


@pytest.mark.parametrize(("shape", "axis"), CASES[2:4], ids=IDS[2:4])
def test_accelerator_branch_gives_the_same_numbers_on_the_cpu(shape, axis, monkeypatch):
    from jaxbn import _core

    x, scale, bias, cts = make_inputs(shape, axis, seed=14, offset=100.0)
    want = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    monkeypatch.setattr(_core, "handles", lambda v, n: (v,) * n)
    monkeypatch.setattr(_core, "computed_once", lambda vectors: vectors)
    got = jit_vjp_of(op(jaxbn.batch_norm, axis), x, scale, bias, cts)
    assert_trees_close(got, want, jnp.float32)
    # And both right: against the reference in float64 (in float32 it loses a few
    # units of rounding at this offset itself).
    with jax.enable_x64(True):
        wide = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), (x, scale, bias, cts))
        ref = jit_vjp_of(op(reference.batch_norm, axis), *wide)
    assert_trees_close(got, ref, jnp.float32)


def _cpu_step(dtype, shape=(256, 64)):
    """The compiled CPU training step (forward and backward with dy given)."""
    x = jnp.ones(shape, dtype)
    scale, bias = jnp.ones(shape[-1]), jnp.zeros(shape[-1])

    def step(x, scale, bias, dy):
        y, pull = jax.vjp(lambda x, s, b: jaxbn.batch_norm(x, s, b)[0], x, scale, bias)
        return y, pull(dy)

    return jax.jit(step).lower(x, scale, bias, x).compile()


def _fused_computation(text, fusion):
    """The body of the computation called by the entry's instruction ``fusion``."""
    entry = text.split("ENTRY", 1)[1]
    called = entry.split(f"{fusion} = ", 1)[1].split("calls=", 1)[1].split(",", 1)[0].strip()
    return text.split(f"\n{called} ", 1)[1].split("\n}", 1)[0]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's fusion rule")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_cpu_step_passes_over_x(dtype):
    # Each pass converts x and dy to float32 inside its own fusion: the compiled
    # step writes y and dx and nothing else of x's size (a float32 copy of a
    # low-precision x, shared by several passes, would be written out and read
    # back: 17 x-sizes of traffic instead of 10).
    shape = (256, 64)
    compiled = _cpu_step(dtype, shape)
    text = compiled.as_text()
    entry = text.split("ENTRY", 1)[1].split("\n}", 1)[0]
    x_sized = [
        line.split("=", 1)[0].strip()
        for line in entry.splitlines()[1:]
        if f"[{shape[0]},{shape[1]}]" in line.split("=", 1)[-1].split("(", 1)[0]
        and " parameter(" not in line
    ]
    assert len(x_sized) == 2, x_sized  # y and dx
    itemsize = jnp.dtype(dtype).itemsize
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < shape[0] * shape[1] * itemsize, temp
    # The y and dx loops read their per-feature vectors (computed once); XLA:CPU
    # would otherwise fuse the vectors' arithmetic (the residue's two-sum, the
    # backward's coefficients) into the loops and redo it for every element.
    loops = [
        line.split("=", 1)[0].strip()
        for line in entry.splitlines()
        if " fusion(" in line and f"[{shape[0]},{shape[1]}]" in line.split("fusion(", 1)[0]
    ]
    assert len(loops) == 2, loops  # y and dx
    arith = ("add(", "subtract(", "multiply(", "divide(", "negate(", "rsqrt(")
    for loop in loops:
        per_feature = [
            line.strip()
            for line in _fused_computation(text, loop).splitlines()
            if f"[{shape[1]}]" in line.split("=", 1)[-1].split(" ", 2)[1]
            or f"[1,{shape[1]}]" in line.split("=", 1)[-1].split(" ", 2)[1]
            if any(name in line for name in arith)
        ]
        assert not per_feature, (loop, per_feature)


# Bad input: a clear error naming the argument, raised while tracing.

OPS = [jaxbn.batch_norm, reference.batch_norm, jaxbn.batch_norm_fwd]
OP_IDS = ["op", "reference", "fwd"]
x43 = jnp.ones((4, 3))
v3 = jnp.ones(3)


@pytest.mark.parametrize("op", OPS, ids=OP_IDS)
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((jnp.float32(1.0), None, None), {}, ValueError, "x must have rank >= 1"),
        ((jnp.ones((4, 3), jnp.int32), None, None), {}, TypeError, "x must have a floating"),
        ((x43, None, None), {"axis": 2}, ValueError, "axis 2 is out of range"),
        ((x43, None, None), {"axis": -3}, ValueError, "axis -3 is out of range"),
        ((x43, None, None), {"axis": (1, -1)}, ValueError, "axis has repeated"),
        ((x43, None, None), {"axis": 1.0}, TypeError, "axis must be an int"),
        ((x43, jnp.ones(4), None), {}, ValueError, r"scale must have shape \(3,\)"),
        ((x43, None, jnp.ones((1, 3))), {}, ValueError, r"bias must have shape \(3,\)"),
        ((x43, v3, v3), {"eps": 0.0}, ValueError, "eps must be > 0"),
        ((x43, v3, v3), {"eps": -1e-5}, ValueError, "eps must be > 0"),
        ((jnp.ones((1, 3)), v3, v3), {}, ValueError, r"more than 1 value.*\(1, 3\)"),
        ((jnp.ones((5, 1, 1, 3)), None, None), {"axis": (0, 3)}, ValueError, "more than 1"),
        ((x43, None, None), {"mask": jnp.ones(4)}, TypeError, "mask must be a boolean"),
        ((x43, None, None), {"mask": jnp.ones(5, bool)}, ValueError, r"got \(5,\) for x"),
        ((x43, None, None), {"mask": jnp.ones((4, 2), bool)}, ValueError, "mask must broadcast"),
        (
            (jnp.ones((4, 3, 4, 4)), None, None),
            {"axis": 1, "mask": jnp.ones(4, bool)},  # [N] on NCHW: ambiguous, refused
            ValueError,
            r"one axis per reduction axis.*got \(4,\)",
        ),
        ((x43, v3, v3), {"eps": 1e-45}, ValueError, "eps must be a normal number.*float32"),
        ((x43, v3, v3), {"eps": 1e-39}, ValueError, "eps must be a normal number"),
        ((x43, v3, v3), {"eps": float("inf")}, ValueError, "eps must be finite"),
        ((x43, v3, v3), {"eps": float("nan")}, ValueError, "eps must be > 0"),
        ((x43, None, None), {"axis_name": 5}, TypeError, "axis_name must be None, a str"),
        ((x43, None, None), {"axis_name": ("i", 5)}, TypeError, "axis_name must be None, a str"),
        # A concrete mask keeping one value (of every feature, or of one feature).
        (
            (x43, None, None),
            {"mask": np.array([True, False, False, False])},
            ValueError,
            r"more than 1 value per feature.*mask keeping 1",
        ),
        (
            (x43, None, None),
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
        ((x43, v3, v3, jnp.zeros(2), v3), ValueError, r"mean must have shape \(3,\)"),
        ((x43, v3, v3, v3, jnp.ones((3, 1))), ValueError, r"var must have shape \(3,\)"),
        ((x43, v3, v3, v3, jnp.ones(3, jnp.int32)), TypeError, "var must have a floating"),
        ((x43.astype(jnp.int8), v3, v3, v3, v3), TypeError, "x must have a floating"),
        ((x43, v3, v3, None, v3), TypeError, r"mean must be a \[3\] array of statistics, got None"),
        ((x43, v3, v3, v3, None), TypeError, r"var must be a \[3\] array of statistics, got None"),
    ],
)
def test_inference_errors(args, error, match):
    with pytest.raises(error, match=match):
        traced(jaxbn.batch_norm_inference, *args)


def test_inference_accepts_a_single_example():
    """Evaluation normalizes with given statistics: one example is fine."""
    y = jaxbn.batch_norm_inference(jnp.ones((1, 3)), v3, v3, v3, v3)
    assert y.shape == (1, 3)


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
        traced(jaxbn.batch_norm, x43.astype(jnp.bfloat16), None, None, eps=1e-40)
    with pytest.raises(ValueError, match="eps must be a normal number"):
        traced(
            lambda x: jaxbn.BatchNorm(3, eps=1e-40).apply(
                *jaxbn.BatchNorm(3).init(), x, training=True
            ),
            x43,
        )


def test_traced_mask_keeping_one_value_is_not_checked():
    """The count of a traced mask is unknown while tracing: no error (nor NaN)."""
    one = np.array([True, False, False, False])
    y = jax.jit(lambda x, m: jaxbn.batch_norm(x, None, None, mask=m))(
        x43 + jnp.arange(4.0)[:, None], one
    )
    assert np.isfinite(np.asarray(y[0])).all()


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

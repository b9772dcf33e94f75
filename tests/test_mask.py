"""Masks: statistics and gradients ignore masked-out entries of a padded batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference
from tests._op_cases import bernoulli, normal

RTOL, ATOL = 2e-5, 2e-5


def padded(n_keep=11, n=16, c=4, seed=0):
    """NumPy inputs of a padded batch, drawn with the seeds ``10 * seed`` to ``10 * seed + 4``."""
    s = 10 * seed
    x = 2.0 * normal(s, (n, c)) + 1.0
    # Padding holds garbage: it must not leak into anything.
    x[n_keep:] = 1e6
    keep = np.arange(n) < n_keep
    scale = 1.0 + 0.5 * normal(s + 1, (c,))
    bias = normal(s + 2, (c,))
    dy = np.where(keep[:, None], normal(s + 3, (n, c)), 0.0)
    g_stats = normal(s + 4, (2, c))
    return x, keep, scale, bias, (dy, g_stats[0], g_stats[1])


def vjp(fn, x, scale, bias, cts, **kw):
    """Values and VJP of ``fn(x, scale, bias, **kw)``, compiled as one program."""

    def run(x, scale, bias, cts):
        out, pull = jax.vjp(functools.partial(fn, **kw), x, scale, bias)
        return out, pull(cts)

    return jax.jit(run)(x, scale, bias, cts)


def close(a, b):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=RTOL, atol=ATOL), a, b)


@pytest.mark.parametrize("fn", [jaxbn.batch_norm, reference.batch_norm], ids=["op", "ref"])
@pytest.mark.parametrize("mask_rank", [1, 2], ids=["mask[N]", "mask[N,1]"])
def test_masked_batch_equals_the_kept_rows(fn, mask_rank):
    x, keep, scale, bias, cts = padded()
    mask = keep if mask_rank == 1 else keep[:, None]
    (y, mean, var), (dx, dscale, dbias) = vjp(fn, x, scale, bias, cts, mask=mask)
    k = int(keep.sum())
    kept_cts = (cts[0][:k], cts[1], cts[2])
    (y_k, mean_k, var_k), (dx_k, ds_k, db_k) = vjp(fn, x[:k], scale, bias, kept_cts)
    close((y[:k], mean, var, dx[:k], dscale, dbias), (y_k, mean_k, var_k, dx_k, ds_k, db_k))
    assert np.isfinite(np.asarray(y)).all()


def test_masked_vjp_matches_reference_with_cotangents_on_padding():
    """Cotangents on padded positions too: the op still equals autodiff of the reference."""
    x, keep, scale, bias, cts = padded(seed=1)
    x[11:] = 3.0
    cts = (normal(5, x.shape), cts[1], cts[2])
    close(
        vjp(jaxbn.batch_norm, x, scale, bias, cts, mask=keep),
        vjp(reference.batch_norm, x, scale, bias, cts, mask=keep),
    )


def test_masked_nhwc():
    x = normal(2, (4, 3, 3, 2))
    mask = np.array([True, True, False, True])[:, None, None]
    cts = (normal(3, x.shape), np.ones(2, np.float32), np.ones(2, np.float32))
    close(
        vjp(jaxbn.batch_norm, x, None, None, cts, mask=mask),
        vjp(reference.batch_norm, x, None, None, cts, mask=mask),
    )


def test_masked_float64_finite_differences():
    x, keep, scale, bias, _ = padded(seed=3)
    with jax.enable_x64(True):
        x = x.astype(np.float64)
        x[11:] = 0.5
        s, b = (v.astype(np.float64) for v in (scale, bias))
        f = functools.partial(jaxbn.batch_norm, mask=keep)
        check_grads(jax.jit(f), (x, s, b), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_mask_keeping_nothing_gives_no_nan_and_keeps_running_stats():
    x, _, scale, bias, cts = padded()
    none = np.zeros(16, bool)
    out, grads = vjp(jaxbn.batch_norm, x * 0 + 2.0, scale, bias, cts, mask=none)
    for leaf in jax.tree.leaves((out, grads)):
        assert np.isfinite(np.asarray(leaf)).all()
    bn = jaxbn.BatchNorm(4, momentum=0.5)
    params, state = bn.init()
    state = {"mean": np.full(4, 3.0, np.float32), "var": np.full(4, 2.0, np.float32)}
    _, new_state = bn.apply(params, state, x, training=True, mask=none)
    close(new_state, state)


def test_layer_running_stats_use_kept_rows_only():
    x, keep, _, _, _ = padded()
    bn = jaxbn.BatchNorm(4, momentum=0.5)
    params, state = bn.init()
    _, s_mask = bn.apply(params, state, x, training=True, mask=keep)
    _, s_kept = bn.apply(params, state, x[:11], training=True)
    close(s_mask, s_kept)


# Masks in Flax's convention: any boolean mask broadcastable to x, x's full shape
# included; where it varies along the feature axes, each feature has its own count.


def feature_mask(shape, seed=0, p=0.6):
    keep = bernoulli(seed, p, shape)
    # At least 2 kept values per feature, along the first axis longer than 2.
    keep[(slice(None),) * next(a for a, d in enumerate(shape) if d > 2) + (slice(2),)] = True
    return keep


def numpy_stats(x, keep, red):
    """Per-feature mean, variance and count of the kept values, in float64."""
    x = np.asarray(x, np.float64)
    w = np.broadcast_to(np.asarray(keep), x.shape).astype(np.float64)
    n = w.sum(axis=red)
    mean = (w * x).sum(axis=red) / n
    var = (w * (x - np.expand_dims(mean, red)) ** 2).sum(axis=red) / n
    return mean, var, n


@pytest.mark.parametrize(
    ("shape", "axis", "mask_shape"),
    [
        ((16, 4), -1, (16, 4)),
        ((6, 3, 3, 4), -1, (6, 3, 3, 4)),
        ((6, 4, 3, 3), 1, (6, 4, 1, 1)),
        ((6, 3, 3, 4), -1, (1, 3, 3, 4)),
    ],
    ids=["NC-full", "NHWC-full", "NCHW-per-example-channel", "NHWC-per-position-channel"],
)
def test_mask_varying_along_features_gives_per_feature_counts(shape, axis, mask_shape):
    x = 2.0 * normal(11, shape) + 1.0
    keep = feature_mask(mask_shape)
    fshape = (shape[axis],)
    scale, bias = 1.0 + 0.3 * normal(12, fshape), normal(13, fshape)
    cts = (normal(14, shape), *normal(15, (2, *fshape)))
    got = vjp(jaxbn.batch_norm, x, scale, bias, cts, axis=axis, mask=keep)
    want = vjp(reference.batch_norm, x, scale, bias, cts, axis=axis, mask=keep)
    close(got, want)
    red = tuple(a for a in range(len(shape)) if a != axis % len(shape))
    mean, var, n = numpy_stats(x, keep, red)
    assert len(set(n.tolist())) > 1  # the features really have different counts
    close(got[0][1:], (mean, var))
    count, m2, v2 = jaxbn.batch_stats(x, axis=axis, mask=keep)
    close((count, m2, v2), (n, mean, var))


def test_mask_varying_along_features_float64_finite_differences():
    with jax.enable_x64(True):
        x = normal(2, (8, 3), np.float64)
        keep = feature_mask((8, 3), seed=3)
        s, b = np.full(3, 1.5), np.full(3, 0.2)
        f = functools.partial(jaxbn.batch_norm, mask=keep)
        check_grads(jax.jit(f), (x, s, b), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_layer_running_stats_and_unbiased_correction_use_per_feature_counts():
    x = normal(4, (10, 3)) * 2.0 + 1.0
    keep = feature_mask((10, 3), seed=5, p=0.5)
    bn = jaxbn.BatchNorm(3, momentum=0.5, unbiased_running_var=True)
    params, state = bn.init()
    _, new = bn.apply(params, state, x, training=True, mask=keep)
    mean, var, n = numpy_stats(x, keep, (0,))
    close(new, {"mean": 0.5 * mean, "var": 0.5 + 0.5 * var * n / (n - 1)})


def test_feature_with_nothing_kept_keeps_its_running_stats():
    x = normal(6, (8, 3))
    keep = np.ones((8, 3), bool)
    keep[:, 1] = False
    bn = jaxbn.BatchNorm(3, momentum=0.5)
    params, _ = bn.init()
    state = {"mean": np.full(3, 3.0, np.float32), "var": np.full(3, 2.0, np.float32)}
    y, new = bn.apply(params, state, x, training=True, mask=keep)
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_allclose(new["mean"][1], 3.0)
    np.testing.assert_allclose(new["var"][1], 2.0)
    mean, var, _ = numpy_stats(x[:, ::2], keep[:, ::2], (0,))
    close((new["mean"][::2], new["var"][::2]), (1.5 + 0.5 * mean, 1.0 + 0.5 * var))


@pytest.mark.parametrize(
    ("shape", "mask_shape"),
    [
        ((12, 4), (12, 4)),
        ((12, 4), (12, 1)),
        ((6, 2, 2, 3), (6, 2, 2, 3)),
        ((6, 2, 2, 3), (6, 1, 1, 1)),
    ],
    ids=["NC-full", "NC-per-example", "NHWC-full", "NHWC-per-example"],
)
def test_masks_match_flax_batch_norm(shape, mask_shape):
    nn = pytest.importorskip("flax.linen")
    x = normal(7, shape) * 1.5 + 0.5
    keep = jnp.asarray(feature_mask(mask_shape, seed=8))
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    variables = flax_bn.init(jax.random.key(0), x)
    y_f, up_f = flax_bn.apply(variables, x, mask=keep, mutable=["batch_stats"])
    bn = jaxbn.BatchNorm(shape[-1], momentum=0.9)
    params, state = bn.init()
    y, new = bn.apply(params, state, x, training=True, mask=keep)
    close(y, y_f)
    close(new, dict(up_f["batch_stats"]))
    # The op and the reference give the same statistics as Flax.
    for fn in (jaxbn.batch_norm, reference.batch_norm):
        y_op, mean, var = fn(x, None, None, mask=keep)
        close(y_op, y_f)
        close((0.9 * state["mean"] + 0.1 * mean, 0.9 + 0.1 * var), (new["mean"], new["var"]))


def test_lower_rank_masks_follow_the_documented_rule():
    """x's rank: NumPy broadcasting; reduction rank: one axis per reduction axis."""
    x = normal(9, (4, 4))
    per_example = np.array([True, True, False, True])
    y1 = jaxbn.batch_norm(x, None, None, mask=per_example)  # [N]: over the examples
    y2 = jaxbn.batch_norm(x, None, None, mask=per_example[:, None])
    close(y1, y2)
    with pytest.raises(ValueError, match="mask must broadcast to x's shape"):
        jax.eval_shape(
            functools.partial(jaxbn.batch_norm, axis=1, mask=np.ones(4, bool)),
            np.ones((4, 3, 4, 4), np.float32),
            None,
            None,
        )


def test_ghost_batch_norm_with_a_mask_varying_along_features():
    """Each group normalized with its own per-feature counts; the running statistics
    average the groups' with per-feature weights (the kept counts)."""
    x = normal(10, (8, 3)) * 2.0 + 1.0
    keep = np.ones((8, 3), bool)
    keep[[1, 2], 0] = False  # feature 0 keeps 2 values of group 0 and 4 of group 1
    keep[[6, 7], 2] = False  # feature 2 keeps 4 values of group 0 and 2 of group 1
    bn = jaxbn.BatchNorm(3, momentum=0.0, virtual_batch_size=4)
    params, state = bn.init()
    y, new = bn.apply(params, state, x, training=True, mask=keep)
    xs, ks = np.asarray(x, np.float64).reshape(2, 4, 3), keep.reshape(2, 4, 3)
    means, vars_, counts = zip(*(numpy_stats(xs[g], ks[g], (0,)) for g in range(2)), strict=True)
    want_y = [
        jaxbn.batch_norm(x[4 * g : 4 * g + 4], None, None, mask=keep[4 * g : 4 * g + 4])[0]
        for g in range(2)
    ]
    close(y, jnp.concatenate(want_y))
    w = np.array(counts) / np.sum(counts, axis=0)
    close(new, {"mean": (w * np.array(means)).sum(0), "var": (w * np.array(vars_)).sum(0)})


def test_second_derivatives_stay_finite_with_a_feature_that_keeps_nothing():
    # Feature 1 keeps nothing: its statistics are 0 and its correction is masked out;
    # the backward must not divide by its zero count (grad of grad would be NaN).
    x = normal(0, (4, 2))
    mask = np.array([[True, False]] * 4)
    scale, bias = np.array([1.5, 0.5], np.float32), np.array([0.1, -0.2], np.float32)

    def make_loss(op):
        def loss(x):
            y, mean, var = op(x, scale, bias, mask=mask)
            return jnp.sum(jnp.where(mask, y, 0.0) ** 3) + jnp.sum(mean * var)

        return loss

    def outer(op):
        return jax.jit(jax.grad(lambda x: jnp.sum(jax.grad(make_loss(op))(x) ** 2)))(x)

    got, want = outer(jaxbn.batch_norm), outer(jaxbn.reference.batch_norm)
    assert bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

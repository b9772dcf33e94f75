"""Masks: statistics and gradients ignore masked-out entries of a padded batch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference

RTOL, ATOL = 2e-5, 2e-5


def padded(n_keep=11, n=16, c=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = 2.0 * jax.random.normal(ks[0], (n, c)) + 1.0
    # Padding holds garbage: it must not leak into anything.
    x = x.at[n_keep:].set(1e6)
    keep = jnp.arange(n) < n_keep
    scale = 1.0 + 0.5 * jax.random.normal(ks[1], (c,))
    bias = jax.random.normal(ks[2], (c,))
    dy = jnp.where(keep[:, None], jax.random.normal(ks[3], (n, c)), 0.0)
    g_stats = jax.random.normal(ks[4], (2, c))
    return x, keep, scale, bias, (dy, g_stats[0], g_stats[1])


def vjp(fn, x, scale, bias, cts, **kw):
    out, pull = jax.vjp(functools.partial(fn, **kw), x, scale, bias)
    return out, pull(cts)


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
    x = x.at[11:].set(3.0)
    cts = (jax.random.normal(jax.random.key(5), x.shape), cts[1], cts[2])
    close(
        vjp(jaxbn.batch_norm, x, scale, bias, cts, mask=keep),
        vjp(reference.batch_norm, x, scale, bias, cts, mask=keep),
    )


def test_masked_nhwc():
    x = jax.random.normal(jax.random.key(2), (4, 3, 3, 2))
    mask = jnp.array([True, True, False, True])[:, None, None]
    cts = (jax.random.normal(jax.random.key(3), x.shape), jnp.ones(2), jnp.ones(2))
    close(
        vjp(jaxbn.batch_norm, x, None, None, cts, mask=mask),
        vjp(reference.batch_norm, x, None, None, cts, mask=mask),
    )


def test_masked_float64_finite_differences():
    x, keep, scale, bias, _ = padded(seed=3)
    with jax.enable_x64(True):
        x = jnp.asarray(np.asarray(x), jnp.float64).at[11:].set(0.5)
        s, b = (jnp.asarray(np.asarray(v), jnp.float64) for v in (scale, bias))
        f = functools.partial(jaxbn.batch_norm, mask=keep)
        check_grads(f, (x, s, b), order=2, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_mask_keeping_nothing_gives_no_nan_and_keeps_running_stats():
    x, _, scale, bias, cts = padded()
    none = jnp.zeros(16, bool)
    out, grads = vjp(jaxbn.batch_norm, x * 0 + 2.0, scale, bias, cts, mask=none)
    for leaf in jax.tree.leaves((out, grads)):
        assert np.isfinite(np.asarray(leaf)).all()
    bn = jaxbn.BatchNorm(4, momentum=0.5)
    params, state = bn.init()
    state = {"mean": jnp.full(4, 3.0), "var": jnp.full(4, 2.0)}
    _, new_state = bn.apply(params, state, x, training=True, mask=none)
    close(new_state, state)


def test_layer_running_stats_use_kept_rows_only():
    x, keep, _, _, _ = padded()
    bn = jaxbn.BatchNorm(4, momentum=0.5)
    params, state = bn.init()
    _, s_mask = bn.apply(params, state, x, training=True, mask=keep)
    _, s_kept = bn.apply(params, state, x[:11], training=True)
    close(s_mask, s_kept)

"""The counts behind the layer's running variance, against NumPy: ghost groups, masks.

The unbiased running variance multiplies the batch variance by ``n / (n - 1)``; ``n``
is the number of values each statistic averages: per feature where the mask varies
along the features (over only some of several feature axes too), the average group's
with ghost batch norm.
"""

import jax
import numpy as np
import pytest

import jaxbn

RNG = np.random.default_rng(0)


def _running_var(bn, x, mask=None):
    """The running variance after one step from zero with momentum 0: the batch's own."""
    params, state = bn.init()
    _, new_state = bn.apply(params, state, x, training=True, mask=mask)
    return np.asarray(new_state["var"], np.float64)


@pytest.mark.parametrize("groups", [2, 4])
def test_ghost_unbiased_variance_is_the_mean_of_each_groups_unbiased_variance(groups):
    x = RNG.normal(2.0, 3.0, (16, 5)).astype(np.float32)
    bn = jaxbn.BatchNorm(
        5, momentum=0.0, virtual_batch_size=16 // groups, unbiased_running_var=True
    )
    want = np.mean([g.var(0, ddof=1) for g in np.split(x.astype(np.float64), groups)], 0)
    np.testing.assert_allclose(_running_var(bn, x), want, rtol=1e-5)
    # The biased one, as a control that the correction is the group's n / (n - 1).
    biased = jaxbn.BatchNorm(5, momentum=0.0, virtual_batch_size=16 // groups)
    k = 16 // groups
    np.testing.assert_allclose(_running_var(biased, x) * k / (k - 1), want, rtol=1e-5)


def test_a_mask_over_some_of_the_feature_axes_gives_each_feature_its_own_count():
    # x [N, C, W] with features (C, W); the mask varies along C only: [N, C, 1].
    x = RNG.normal(1.0, 2.0, (10, 3, 4)).astype(np.float32)
    mask = RNG.random((10, 3, 1)) > 0.3
    assert len({int(n) for n in mask.sum(0).ravel()}) > 1  # the counts differ per C
    bn = jaxbn.BatchNorm((3, 4), axis=(1, 2), momentum=0.0, unbiased_running_var=True)
    got = _running_var(bn, x, jax.numpy.asarray(mask))
    xd = x.astype(np.float64)
    want = np.stack([xd[mask[:, c, 0], c, :].var(0, ddof=1) for c in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # The layer's mean agrees with the op's statistics under the same mask.
    _, mean, _ = jaxbn.batch_norm(x, None, None, axis=(1, 2), mask=mask)
    params, state = bn.init()
    _, new_state = bn.apply(params, state, x, training=True, mask=mask)
    np.testing.assert_allclose(new_state["mean"], mean, rtol=1e-6, atol=1e-6)

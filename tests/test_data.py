"""Tests of jaxbn.data: the digits split, standardization, synthetic data, batches."""

import jax
import numpy as np
import pytest

from jaxbn.data import (
    _split_and_standardize,
    batch_indices,
    check_batch_size,
    load_digits,
    make_blobs,
)


def test_digits_shapes_and_labels():
    data = load_digits(test_fraction=0.25, seed=3)
    assert data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert data.x_test.shape == (449, 64)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int32
    assert set(np.unique(data.y_train)) == set(range(10)) == set(np.unique(data.y_test))
    assert data.num_classes == 10 and data.num_features == 64


def test_digits_split_is_seeded():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)


def test_digits_standardized_on_training_split():
    data = load_digits()
    std = data.x_train.std(axis=0)
    varying = std > 0
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std[varying], 1.0, rtol=1e-4)
    assert varying.sum() >= 60  # only a few always-blank pixels are constant


def test_standardization_uses_training_statistics_only():
    # One feature equal to 10 * label: each row's raw value is known from its
    # label, so the expected statistics follow from the training labels alone.
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    data = _split_and_standardize(10.0 * y[:, None], y, 5, 0.3, seed=4)
    raw_train = 10.0 * data.y_train
    mean, std = raw_train.mean(), raw_train.std()
    np.testing.assert_allclose(data.x_train[:, 0], (raw_train - mean) / std, rtol=1e-5)
    np.testing.assert_allclose(data.x_test[:, 0], (10.0 * data.y_test - mean) / std, rtol=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5], ids=str)
def test_bad_test_fraction(fraction):
    with pytest.raises(ValueError, match=rf"test_fraction must be in .*\(0, 1\), got {fraction}"):
        load_digits(test_fraction=fraction)


def test_test_fraction_leaving_an_empty_split():
    with pytest.raises(ValueError, match=r"test_fraction=0\.001 leaves 0 of 100"):
        make_blobs(num_examples=100, test_fraction=0.001)


def test_blobs_are_seeded_and_separable():
    a = make_blobs(num_examples=300, num_features=4, num_classes=3, seed=5)
    b = make_blobs(num_examples=300, num_features=4, num_classes=3, seed=5)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (240, 4) and a.num_classes == 3
    # Nearest class mean on the training split classifies most test points.
    means = np.stack([a.x_train[a.y_train == c].mean(axis=0) for c in range(3)])
    pred = np.argmin(((a.x_test[:, None] - means) ** 2).sum(-1), axis=1)
    assert (pred == a.y_test).mean() > 0.8


def test_bad_blob_size():
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        make_blobs(num_classes=0)


def test_batch_indices_cover_each_epoch_once():
    key = jax.random.key(0)
    n, bs = 23, 5  # 4 steps per epoch, 3 examples left out each epoch
    for epoch in range(2):
        idx = np.concatenate(
            [
                np.asarray(batch_indices(key, 4 * epoch + t, num_examples=n, batch_size=bs))
                for t in range(4)
            ]
        )
        assert len(set(idx.tolist())) == 20 and idx.min() >= 0 and idx.max() < n
    first = batch_indices(key, 0, num_examples=n, batch_size=bs)
    again = batch_indices(key, 0, num_examples=n, batch_size=bs)
    next_epoch = batch_indices(key, 4, num_examples=n, batch_size=bs)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, next_epoch)


def test_batch_size_larger_than_data():
    with pytest.raises(ValueError, match=r"batch_size must be between 1 .*\(10\), got 11"):
        check_batch_size(11, 10)
    with pytest.raises(ValueError, match="got 0"):
        batch_indices(jax.random.key(0), 0, num_examples=10, batch_size=0)

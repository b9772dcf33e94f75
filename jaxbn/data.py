"""Data for the examples and tests: the bundled digits, synthetic blobs, batches.

Nothing here downloads anything. :func:`load_digits` reads scikit-learn's bundled
copy of the UCI handwritten digits (1,797 images of 8x8 pixels, 10 classes);
scikit-learn is imported inside the function, so it is needed only by whoever
calls it. :func:`make_blobs` draws a synthetic classification problem from a
seed. :func:`batch_indices` picks the examples of a training step on the device,
from a key and the step number alone, so a training loop compiled with
``lax.scan`` never goes back to the host for data.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbn import _checks

__all__ = [
    "Dataset",
    "batch_indices",
    "check_batch_size",
    "epoch_order",
    "load_digits",
    "make_blobs",
]


class Dataset(NamedTuple):
    """A train/test split: float32 features ``[n, features]``, int32 labels ``[n]``.

    Attributes:
        x_train: training inputs.
        y_train: training labels in ``[0, num_classes)``.
        x_test: test inputs, standardized with the training statistics.
        y_test: test labels.
        num_classes: the number of classes.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def num_features(self) -> int:
        """The number of input features."""
        return int(self.x_train.shape[1])


def _test_size(test_fraction: float, n: int) -> int:
    """The number of the ``n`` examples that ``test_fraction`` holds out, checked."""
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise TypeError(f"test_fraction must be a float, got {type(test_fraction).__name__}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in the open interval (0, 1), got {test_fraction}")
    n_test = round(n * test_fraction)
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"test_fraction={test_fraction} leaves {n_test} of {n} examples for testing; "
            f"expected at least one example in each split"
        )
    return n_test


def _split_and_standardize(x, y, num_classes, test_fraction, seed) -> Dataset:
    """Seeded shuffle, split, then standardization with training statistics only."""
    n = x.shape[0]
    n_test = _test_size(test_fraction, n)
    order = np.random.default_rng(seed).permutation(n)
    test, train = order[:n_test], order[n_test:]
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    # Constant features (the digits' always-blank corner pixels) are only centred.
    std = np.where(std > 0, std, 1.0)

    def standardize(a):
        return ((a - mean) / std).astype(np.float32)

    return Dataset(
        x_train=standardize(x[train]),
        y_train=y[train].astype(np.int32),
        x_test=standardize(x[test]),
        y_test=y[test].astype(np.int32),
        num_classes=num_classes,
    )


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """The 8x8 handwritten digits bundled with scikit-learn, split and standardized.

    The examples are shuffled with ``seed``, the first ``test_fraction`` of them
    held out, and every pixel standardized with the mean and standard deviation
    of the training split (constant pixels are only centred).

    Args:
        test_fraction: share of the 1,797 examples held out, in ``(0, 1)``.
        seed: seed of the shuffle; the same seed gives the same split.

    Returns:
        A :class:`Dataset` with 64 features and 10 classes.

    Raises:
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.
        ImportError: if scikit-learn (the ``examples`` extra) is not installed.

    Examples:
        >>> from jaxbn.data import load_digits
        >>> data = load_digits()
        >>> data.x_train.shape, data.x_test.shape, data.num_classes
        ((1438, 64), (359, 64), 10)
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as err:
        raise ImportError(
            "jaxbn.data.load_digits reads the 8x8 digits bundled with scikit-learn, which is "
            'not installed: pip install "jaxbn[examples]" (or scikit-learn)'
        ) from err

    digits = _sk_load_digits()
    x = np.asarray(digits.data, np.float64)
    y = np.asarray(digits.target)
    return _split_and_standardize(x, y, 10, test_fraction, seed)


def make_blobs(
    *,
    num_examples: int = 1000,
    num_features: int = 16,
    num_classes: int = 4,
    separation: float = 3.0,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Gaussian blobs: a synthetic classification problem for tests and benchmarks.

    Each class has a centre drawn from ``N(0, separation^2 I)``; its examples are
    the centre plus ``N(0, I)`` noise, and labels are uniform over the classes.

    Args:
        num_examples: total number of examples (train and test).
        num_features: input dimension.
        num_classes: number of blobs (labels ``0 .. num_classes - 1``).
        separation: scale of the class centres relative to the unit noise; larger
            is easier.
        test_fraction: share of the examples held out, in ``(0, 1)``.
        seed: seed of everything (centres, samples, split).

    Returns:
        A :class:`Dataset`, standardized with the training statistics.

    Raises:
        ValueError: for a non-positive size or a ``test_fraction`` outside ``(0, 1)``.

    Examples:
        >>> from jaxbn.data import make_blobs
        >>> data = make_blobs(num_examples=100, num_features=3, num_classes=2)
        >>> data.x_train.shape, data.y_test.shape
        ((80, 3), (20,))
    """
    _checks.check_positive_int("num_examples", num_examples)
    _checks.check_positive_int("num_features", num_features)
    _checks.check_positive_int("num_classes", num_classes)
    rng = np.random.default_rng(seed)
    centres = separation * rng.standard_normal((num_classes, num_features))
    y = rng.integers(0, num_classes, num_examples)
    x = centres[y] + rng.standard_normal((num_examples, num_features))
    return _split_and_standardize(x, y, num_classes, test_fraction, seed)


def check_batch_size(batch_size: int, num_examples: int) -> None:
    """Raises ``ValueError`` unless ``1 <= batch_size <= num_examples``.

    Args:
        batch_size: the requested number of examples per step.
        num_examples: the number of examples available.
    """
    if not _checks.is_int(batch_size):
        raise TypeError(f"batch_size must be an int, got {type(batch_size).__name__}")
    if not 1 <= batch_size <= num_examples:
        raise ValueError(
            f"batch_size must be between 1 and the number of training examples "
            f"({num_examples}), got {batch_size}"
        )


def batch_indices(
    key: jax.Array, step: jax.Array | int, *, num_examples: int, batch_size: int
) -> jax.Array:
    """Indices of the examples of training step ``step``, shuffled once per epoch.

    An epoch is ``num_examples // batch_size`` steps; epoch ``e`` visits the
    examples in the order ``jax.random.permutation(fold_in(key, e), n)`` (the last
    ``num_examples % batch_size`` of that order are skipped). The result depends
    only on ``key`` and ``step``, so it runs on the device inside ``lax.scan`` and
    resuming from a step reproduces the batches exactly.

    Args:
        key: a ``jax.random.key``.
        step: the (0-based) step number, a Python int or an int32 scalar.
        num_examples: size of the training set (static).
        batch_size: examples per step (static), ``<= num_examples``.

    Returns:
        ``[batch_size]`` int32 indices, distinct within a step.

    Examples:
        >>> import jax
        >>> from jaxbn.data import batch_indices
        >>> key = jax.random.key(0)
        >>> a = batch_indices(key, 0, num_examples=10, batch_size=5)
        >>> b = batch_indices(key, 1, num_examples=10, batch_size=5)
        >>> sorted(a.tolist() + b.tolist())
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    """
    check_batch_size(batch_size, num_examples)
    steps_per_epoch = num_examples // batch_size
    step = jnp.asarray(step, jnp.int32)
    epoch, within = jnp.divmod(step, steps_per_epoch)
    order = epoch_order(key, epoch, num_examples=num_examples)
    return lax.dynamic_slice_in_dim(order, within * batch_size, batch_size)


def epoch_order(key: jax.Array, epoch: jax.Array | int, *, num_examples: int) -> jax.Array:
    """The order in which epoch ``epoch`` visits the examples (see :func:`batch_indices`).

    A loop over many steps can compute the orders of the epochs it spans once
    (``jax.vmap`` over ``epoch``) instead of one permutation per step.

    Args:
        key: a ``jax.random.key``.
        epoch: the (0-based) epoch number.
        num_examples: size of the training set (static).

    Returns:
        ``[num_examples]`` int32, a permutation of ``range(num_examples)``.
    """
    return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)

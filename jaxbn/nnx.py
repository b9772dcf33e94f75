"""``flax.nnx`` adapter: see :mod:`jaxbn.frameworks.nnx` (needs ``jaxbn[flax]``)."""

from jaxbn.frameworks.nnx import BatchNorm

__all__ = ["BatchNorm"]

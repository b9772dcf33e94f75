"""``flax.linen`` adapter: see :mod:`jaxbn.frameworks.linen` (needs ``jaxbn[flax]``)."""

from jaxbn.frameworks.linen import (
    BatchNorm,
    batch_norm_from_flax,
    from_flax,
    to_flax,
    to_flax_module,
)

__all__ = ["BatchNorm", "batch_norm_from_flax", "from_flax", "to_flax", "to_flax_module"]

"""Converters between jaxbn and ``flax.linen.BatchNorm``: variables and configs.

The converters live in :mod:`jaxbn.linen` beside the Linen module and are
re-exported here unchanged (no deprecation: both names stay). The drop-in Linen
module once here as ``FlaxBatchNorm`` is :class:`jaxbn.linen.BatchNorm`; it now
follows Flax's output dtype rule, so the old name was dropped rather than kept
with a changed behaviour. Needs flax (``pip install "jaxbn[flax]"``).
"""

from jaxbn.linen import batch_norm_from_flax, from_flax, to_flax, to_flax_module

__all__ = ["batch_norm_from_flax", "from_flax", "to_flax", "to_flax_module"]

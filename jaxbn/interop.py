"""Converters between jaxbn and ``flax.linen.BatchNorm``: variables and configs.

The converters live in :mod:`jaxbn.linen`, beside the Linen module, and are
importable from here as well (the same functions). Needs flax
(``pip install "jaxbn[flax]"``).
"""

from jaxbn.linen import batch_norm_from_flax, from_flax, to_flax, to_flax_module

__all__ = ["batch_norm_from_flax", "from_flax", "to_flax", "to_flax_module"]

"""jaxbn: batch normalization for JAX with a hand-derived backward pass.

Public names:

- :func:`batch_norm` (training mode, ``jax.custom_vjp``), with its two halves
  :func:`batch_norm_fwd` and :func:`batch_norm_bwd`;
- :func:`batch_norm_inference` (evaluation mode, given statistics);
- :mod:`jaxbn.reference`: the same op in plain ``jnp``, the autodiff oracle;
- :class:`BatchNorm`: the layer, a frozen config with explicit params and state.
"""

from jaxbn import reference
from jaxbn.layer import BatchNorm
from jaxbn.ops import (
    BatchNormResiduals,
    batch_norm,
    batch_norm_bwd,
    batch_norm_fwd,
    batch_norm_inference,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "BatchNormResiduals",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_inference",
    "reference",
]

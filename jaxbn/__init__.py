"""jaxbn: batch normalization for JAX with a hand-derived backward pass.

Public names:

- :func:`batch_norm` (training mode, ``jax.custom_vjp``), with its two halves
  :func:`batch_norm_fwd` and :func:`batch_norm_bwd`;
- :func:`batch_norm_inference` (evaluation mode, given statistics);
- :mod:`jaxbn.reference`: the same op in plain ``jnp``, the autodiff oracle;
- :func:`batch_stats`: the batch statistics the op normalizes with;
- :class:`BatchNorm`: the layer, a frozen config with explicit params and state
  (masks, precision policy, ghost batch norm, batch renormalization, PyTorch's
  running-statistics conventions);
- :class:`MLP`: the network (batch norm before each hidden nonlinearity), with
  :mod:`jaxbn.train` (train step, evaluate, the ``lax.scan`` loop, ``fit``),
  :mod:`jaxbn.data` (bundled digits, synthetic blobs) and
  :mod:`jaxbn.checkpoint`;
- :func:`batch_norm_act` (with :func:`batch_norm_act_fwd`, :func:`batch_norm_act_bwd`):
  batch norm fused with an invertible activation (In-Place ABN), keeping only its
  output for the backward; :mod:`jaxbn.act`;
- :func:`fold_into_dense`: fold an evaluation-mode batch norm into the preceding
  dense layer;
- :mod:`jaxbn.interop` (needs flax, not imported here): converters to and from
  ``flax.linen.BatchNorm`` and a drop-in flax module.
"""

from jaxbn import act, checkpoint, data, reference, train
from jaxbn.act import (
    BatchNormActResiduals,
    batch_norm_act,
    batch_norm_act_bwd,
    batch_norm_act_fwd,
)
from jaxbn.fold import fold_into_dense
from jaxbn.layer import BatchNorm
from jaxbn.mlp import MLP
from jaxbn.ops import (
    BatchNormResiduals,
    batch_norm,
    batch_norm_bwd,
    batch_norm_fwd,
    batch_norm_inference,
    batch_stats,
)

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "BatchNorm",
    "BatchNormActResiduals",
    "BatchNormResiduals",
    "act",
    "batch_norm",
    "batch_norm_act",
    "batch_norm_act_bwd",
    "batch_norm_act_fwd",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_inference",
    "batch_stats",
    "checkpoint",
    "data",
    "fold_into_dense",
    "reference",
    "train",
]

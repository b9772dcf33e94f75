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
- :class:`CNN`: a convolutional network (convolution, batch norm, activation per
  block; NHWC or NCHW), trained by the same :mod:`jaxbn.train`;
- :func:`fold_into_dense`, :func:`fold_into_conv`: fold an evaluation-mode batch
  norm into the preceding dense layer or convolution;
- :mod:`jaxbn.interop` (needs flax, not imported here): converters to and from
  ``flax.linen.BatchNorm`` and a drop-in flax module.
"""

from jaxbn import checkpoint, data, reference, train
from jaxbn.cnn import CNN
from jaxbn.fold import fold_into_conv, fold_into_dense
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
    "CNN",
    "MLP",
    "BatchNorm",
    "BatchNormResiduals",
    "batch_norm",
    "batch_norm_bwd",
    "batch_norm_fwd",
    "batch_norm_inference",
    "batch_stats",
    "checkpoint",
    "data",
    "fold_into_conv",
    "fold_into_dense",
    "reference",
    "train",
]

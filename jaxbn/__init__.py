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
- :class:`MLP`: the network (batch norm before each hidden nonlinearity);
- :mod:`jaxbn.train` (the model protocol ``Model``, train step, evaluate, the
  loop), :mod:`jaxbn.fit` (``fit``: chunks, checkpoints, resume, the divergence
  guard; also ``jaxbn.train.fit``), :mod:`jaxbn.parallel` (``data_mesh``),
  :mod:`jaxbn.checkpoint` and :mod:`jaxbn.data` (bundled digits, synthetic blobs);
- :func:`precise_stats`: population statistics recomputed after training
  (:mod:`jaxbn.stats`);
- :mod:`jaxbn.distributed`: several processes, one run (``jax.distributed``);
- :func:`fold_into_dense`: fold an evaluation-mode batch norm into the preceding
  dense layer;
- :mod:`jaxbn.interop` (needs flax, not imported here): converters to and from
  ``flax.linen.BatchNorm`` and a drop-in flax module.
"""

from importlib import metadata as _metadata

from jaxbn import checkpoint, data, distributed, fit, parallel, reference, train
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
from jaxbn.stats import precise_stats

try:
    __version__ = _metadata.version("jaxbn")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
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
    "distributed",
    "fit",
    "fold_into_dense",
    "parallel",
    "precise_stats",
    "reference",
    "train",
]

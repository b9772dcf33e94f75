"""jaxbn: batch normalization for JAX with a hand-derived backward pass.

Public names:

- :func:`batch_norm` (training mode, ``jax.custom_vjp``), with its two halves
  :func:`batch_norm_fwd` and :func:`batch_norm_bwd`;
- :func:`batch_norm_inference` (evaluation mode, given statistics);
- :mod:`jaxbn.reference`: the same op in plain ``jnp``, the autodiff oracle;
- :func:`batch_stats`: the batch statistics the op normalizes with;
- :func:`batch_norm_act` (with :func:`batch_norm_act_fwd`, :func:`batch_norm_act_bwd`):
  batch norm fused with an invertible activation (In-Place ABN), keeping only its
  output for the backward; :mod:`jaxbn.act`;
- :class:`BatchNorm`: the layer, a frozen config with explicit params and state
  (masks, precision policy, ghost batch norm, batch renormalization, PyTorch's
  running-statistics conventions, zero-debiased averages, frozen statistics, a fused
  activation);
- :class:`MLP`: the network (batch norm before each hidden nonlinearity);
- :mod:`jaxbn.train` (the model protocol ``Model``, train step, evaluate, the
  loop, and ``fit``: chunks, checkpoints, resume, the divergence guard),
  :mod:`jaxbn.parallel` (``data_mesh``),
  :mod:`jaxbn.checkpoint` and :mod:`jaxbn.data` (bundled digits, synthetic blobs);
- :class:`CNN`: a convolutional network (convolution, batch norm, activation per
  block; NHWC or NCHW), trained by the same :mod:`jaxbn.train`;
- :mod:`jaxbn.distributed`: several processes, one run (``jax.distributed``);
- :func:`precise_stats`: population statistics recomputed after training
  (:mod:`jaxbn.stats`);
- :func:`diagnose` (its result: :class:`Diagnosis`): why a batch-norm network
  evaluates worse than it trains, and the fix (:mod:`jaxbn.diagnosis`);
- :func:`fold_into_dense`, :func:`fold_into_conv`: fold an evaluation-mode batch
  norm into the preceding dense layer or convolution;
- :mod:`jaxbn.nnx`, :mod:`jaxbn.linen`, :mod:`jaxbn.equinox` (each needs its
  framework, and is not imported here): drop-in ``BatchNorm`` modules for Flax NNX,
  Flax Linen and Equinox that run jaxbn's op; :mod:`jaxbn.interop`: converters of
  variables and configurations to and from ``flax.linen.BatchNorm``.
"""

from importlib import metadata as _metadata

from jaxbn import act, checkpoint, data, distributed, parallel, reference, train
from jaxbn.act import (
    BatchNormActResiduals,
    batch_norm_act,
    batch_norm_act_bwd,
    batch_norm_act_fwd,
)
from jaxbn.cnn import CNN
from jaxbn.diagnosis import Diagnosis, diagnose
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
from jaxbn.stats import precise_stats

try:
    __version__ = _metadata.version("jaxbn")
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CNN",
    "MLP",
    "BatchNorm",
    "BatchNormActResiduals",
    "BatchNormResiduals",
    "Diagnosis",
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
    "diagnose",
    "distributed",
    "fold_into_conv",
    "fold_into_dense",
    "parallel",
    "precise_stats",
    "reference",
    "train",
]

"""Folding an evaluation-mode batch norm into the dense or convolution layer before it.

At inference batch norm is a fixed per-feature affine map, so a dense layer (or
a convolution) followed by batch norm is one such layer with a rescaled kernel
and a new bias. Folding removes the normalization from the deployed network
entirely. Dense and convolution kernels both keep their output features on the
last axis (``[in, out]``; ``[*spatial, in, out]``), so one formula serves both.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks, _core

__all__ = ["fold_into_conv", "fold_into_dense"]


def fold_into_dense(
    dense_params: Mapping[str, ArrayLike],
    bn_params: Mapping[str, ArrayLike],
    bn_state: Mapping[str, ArrayLike],
    *,
    eps: float,
) -> dict[str, jax.Array]:
    r"""Folds an evaluation-mode batch norm into the preceding dense layer.

    With the dense layer ``z = x W + b`` followed by
    :func:`jaxbn.batch_norm_inference` with ``scale`` ``gamma``, ``bias``
    ``beta`` and running statistics ``mu``, ``sigma^2``:

    .. math::

        a = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        W' = W \operatorname{diag}(a), \qquad
        b' = a \odot (b - \mu) + \beta

    so that ``x @ W' + b'`` equals the two layers in evaluation mode. A missing
    ``b``, ``gamma`` or ``beta`` counts as 0, 1 and 0. The fold is computed in
    float32 (or wider, if any input is wider) and cast back to the dense
    params' dtype, so a bfloat16 kernel is rounded once, at the end.

    Args:
        dense_params: ``{"kernel": [in, out], "bias": [out]}``; ``"bias"`` is
            optional (a dense layer followed by batch norm usually has none).
        bn_params: the batch norm's params, as from :meth:`jaxbn.BatchNorm.init`:
            ``{"scale": [out], "bias": [out]}``, either key optional.
        bn_state: the running statistics ``{"mean": [out], "var": [out]}``.
        eps: the batch norm's ``eps`` (``jaxbn.BatchNorm.eps``); required, since
            a mismatch would silently change every output.

    Returns:
        ``{"kernel": [in, out], "bias": [out]}``: the kernel in the input
        kernel's dtype, the bias in the input bias's dtype (the kernel's when
        the dense layer had no bias).

    Raises:
        TypeError, ValueError: on a missing or unexpected key, a wrong shape or
            a non-floating dtype (the message names the argument).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxbn.fold import fold_into_dense
        >>> dense = {"kernel": jnp.array([[1.0, 2.0], [3.0, 4.0]])}
        >>> bn_params = {"scale": jnp.array([2.0, 3.0]), "bias": jnp.array([0.0, 1.0])}
        >>> bn_state = {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([3.0, 0.0])}
        >>> folded = fold_into_dense(dense, bn_params, bn_state, eps=1.0)
        >>> folded["kernel"]
        Array([[ 1.,  6.], [ 3., 12.]], dtype=float32)
        >>> folded["bias"]
        Array([-1., 1.], dtype=float32)
    """
    return _fold(dense_params, bn_params, bn_state, eps=eps, name="dense_params", spatial=False)


def fold_into_conv(
    conv_params: Mapping[str, ArrayLike],
    bn_params: Mapping[str, ArrayLike],
    bn_state: Mapping[str, ArrayLike],
    *,
    eps: float,
) -> dict[str, jax.Array]:
    r"""Folds an evaluation-mode batch norm into the preceding convolution.

    A convolution is linear in its kernel and acts on each output channel
    through that channel's slice ``W[..., j]`` alone, so scaling the slice
    scales the channel. With ``z = conv(x, W) + b`` followed by
    :func:`jaxbn.batch_norm_inference` (``scale`` ``gamma``, ``bias``
    ``beta``, running statistics ``mu``, ``sigma^2``), per output channel ``j``:

    .. math::

        a_j = \frac{\gamma_j}{\sqrt{\sigma_j^2 + \epsilon}}, \qquad
        W'[\ldots, j] = a_j W[\ldots, j], \qquad
        b'_j = a_j (b_j - \mu_j) + \beta_j

    the formula of :func:`fold_into_dense`, with the output channel on the
    kernel's last axis (HWIO, as Flax's ``nn.Conv`` and :class:`jaxbn.CNN`).
    A PyTorch ``Conv2d`` weight is ``[out, in, kh, kw]``: transpose it with
    ``w.permute(2, 3, 1, 0)`` first. The fold is computed in float32 (or wider)
    and cast back to the kernel's dtype.

    Args:
        conv_params: ``{"kernel": [*spatial, in, out], "bias": [out]}``;
            ``"bias"`` is optional (a convolution followed by batch norm
            usually has none). Any number of spatial axes (1, 2, 3).
        bn_params: the batch norm's params ``{"scale": [out], "bias": [out]}``,
            either key optional.
        bn_state: the running statistics ``{"mean": [out], "var": [out]}``.
        eps: the batch norm's ``eps``; required, since a mismatch would
            silently change every output.

    Returns:
        ``{"kernel": [*spatial, in, out], "bias": [out]}``: the kernel in the
        input kernel's dtype, the bias in the input bias's dtype (the kernel's
        when the convolution had no bias).

    Raises:
        TypeError, ValueError: on a missing or unexpected key, a kernel of rank
            below 3, statistics whose length is not the kernel's last axis, or
            a non-floating dtype (the message names the argument).

    Examples:
        >>> import jax.numpy as jnp
        >>> from jaxbn.fold import fold_into_conv
        >>> conv = {"kernel": jnp.ones((3, 3, 1, 2))}
        >>> bn_params = {"scale": jnp.array([2.0, 3.0]), "bias": jnp.array([0.0, 1.0])}
        >>> bn_state = {"mean": jnp.array([1.0, 0.0]), "var": jnp.array([3.0, 0.0])}
        >>> folded = fold_into_conv(conv, bn_params, bn_state, eps=1.0)
        >>> folded["kernel"][0, 0]
        Array([[1., 3.]], dtype=float32)
        >>> folded["bias"]
        Array([-1., 1.], dtype=float32)
    """
    return _fold(conv_params, bn_params, bn_state, eps=eps, name="conv_params", spatial=True)


def _fold(layer_params, bn_params, bn_state, *, eps, name, spatial):
    """The one fold: ``W' = W * a``, ``b' = (b - mean) * a + beta``.

    ``a = scale / sqrt(var + eps)`` multiplies the kernel's last axis (the
    output features, for dense and convolution kernels alike).
    """
    kernel, vectors = _check_fold(layer_params, bn_params, bn_state, eps, name, spatial)
    dtypes = [kernel.dtype, *(jnp.result_type(v) for v in vectors)]
    cdt = _checks.compute_dtype(functools.reduce(np.promote_types, dtypes))

    def get(tree, key, default):
        return jnp.asarray(tree[key]).astype(cdt) if key in tree else default

    a = lax.rsqrt(get(bn_state, "var", None) + jnp.asarray(eps, cdt)) * get(bn_params, "scale", 1.0)
    bias = (get(layer_params, "bias", 0.0) - get(bn_state, "mean", None)) * a
    bias = bias + get(bn_params, "bias", 0.0)
    folded = kernel.astype(cdt) * _core.expand(a, kernel.ndim, (kernel.ndim - 1,))
    bias_dtype = jnp.result_type(layer_params.get("bias", kernel))
    return {"kernel": folded.astype(kernel.dtype), "bias": bias.astype(bias_dtype)}


def _check_fold(layer_params, bn_params, bn_state, eps, name, spatial):
    """Checks the fold's arguments; returns the kernel and the per-feature vectors."""
    _checks.check_eps(eps)
    _checks.check_keys(name, layer_params, ("kernel", "bias"), ("kernel",))
    _checks.check_keys("bn_params", bn_params, ("scale", "bias"), ())
    # Other entries of a BatchNorm state (a batch count, renorm statistics) play
    # no part in evaluation mode.
    state_keys = ("mean", "var", "count", "renorm_mean", "renorm_var")
    _checks.check_keys("bn_state", bn_state, state_keys, ("mean", "var"))
    kernel = jnp.asarray(layer_params["kernel"])
    layout, rank_ok = (
        ("[*spatial, in, out]", kernel.ndim >= 3) if spatial else ("[in, out]", kernel.ndim == 2)
    )
    if not rank_ok:
        raise ValueError(
            f'{name}["kernel"] must have shape {layout}, the output features last, got '
            f"{kernel.shape}"
        )
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f'{name}["kernel"] must have a floating-point dtype, got {kernel.dtype}')
    out = kernel.shape[-1]
    vectors = []
    for tree_name, tree, keys in (
        (name, layer_params, ("bias",)),
        ("bn_params", bn_params, ("scale", "bias")),
        ("bn_state", bn_state, ("mean", "var")),
    ):
        for key in (k for k in keys if k in tree):
            vectors.append(tree[key])
            if jnp.shape(tree[key]) != (out,):
                raise ValueError(
                    f'{tree_name}["{key}"] must have shape ({out},) (the kernel\'s output '
                    f"features, its last axis: {name}['kernel'] is {layout} = {kernel.shape}), "
                    f"got {jnp.shape(tree[key])}"
                )
            _checks.check_feature_vector(f'{tree_name}["{key}"]', tree[key], (out,))  # dtype
    return kernel, vectors

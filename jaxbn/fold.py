"""Folding an evaluation-mode batch norm into the dense layer before it.

At inference batch norm is a fixed per-feature affine map, so a dense layer
followed by batch norm is one dense layer with a rescaled kernel and a new bias.
Folding removes the normalization from the deployed network entirely.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jaxbn import _checks

__all__ = ["fold_into_dense"]


def _check_vector(name: str, v: ArrayLike, out_features: int) -> None:
    shape = jnp.shape(v)
    if shape != (out_features,):
        raise ValueError(
            f"{name} must have shape ({out_features},) (the kernel's output features), got {shape}"
        )
    if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
        raise TypeError(f"{name} must have a floating-point dtype, got {jnp.result_type(v)}")


def fold_into_dense(
    dense_params: Mapping[str, ArrayLike],
    bn_params: Mapping[str, ArrayLike],
    bn_state: Mapping[str, ArrayLike],
    *,
    eps: float,
) -> dict[str, jax.Array]:
    """Folds an evaluation-mode batch norm into the preceding dense layer.

    With the dense layer ``z = x W + b`` followed by
    :func:`jaxbn.batch_norm_inference` with ``scale`` ``gamma``, ``bias``
    ``beta`` and running statistics ``mu``, ``sigma^2``:

    .. math::

        a = \\frac{\\gamma}{\\sqrt{\\sigma^2 + \\epsilon}}, \\qquad
        W' = W \\operatorname{diag}(a), \\qquad
        b' = a \\odot (b - \\mu) + \\beta

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
    _checks.check_eps(eps)
    _checks.check_keys("dense_params", dense_params, ("kernel", "bias"), ("kernel",))
    _checks.check_keys("bn_params", bn_params, ("scale", "bias"), ())
    # Other entries of a BatchNorm state (a batch count, renorm statistics) play
    # no part in evaluation mode.
    state_keys = ("mean", "var", "count", "renorm_mean", "renorm_var")
    _checks.check_keys("bn_state", bn_state, state_keys, ("mean", "var"))
    kernel = jnp.asarray(dense_params["kernel"])
    if kernel.ndim != 2:
        raise ValueError(
            f'dense_params["kernel"] must have shape (in_features, out_features), '
            f"got {kernel.shape}"
        )
    if not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(
            f'dense_params["kernel"] must have a floating-point dtype, got {kernel.dtype}'
        )
    out = kernel.shape[1]
    vectors = {
        f'{name}["{key}"]': tree[key]
        for name, tree, keys in (
            ("dense_params", dense_params, ("bias",)),
            ("bn_params", bn_params, ("scale", "bias")),
            ("bn_state", bn_state, ("mean", "var")),
        )
        for key in keys
        if key in tree
    }
    for name, v in vectors.items():
        _check_vector(name, v, out)

    cdt = functools.reduce(
        jnp.promote_types,
        [jnp.float32, kernel.dtype, *(jnp.result_type(v) for v in vectors.values())],
    )

    def get(tree, key, default):
        return jnp.asarray(tree[key]).astype(cdt) if key in tree else default

    a = lax.rsqrt(get(bn_state, "var", None) + jnp.asarray(eps, cdt))
    a = a * get(bn_params, "scale", 1.0)
    dense_bias = get(dense_params, "bias", 0.0)
    bias = (dense_bias - get(bn_state, "mean", None)) * a + get(bn_params, "bias", 0.0)
    bias_dtype = jnp.result_type(dense_params["bias"]) if "bias" in dense_params else kernel.dtype
    return {
        "kernel": (kernel.astype(cdt) * a).astype(kernel.dtype),
        "bias": bias.astype(bias_dtype),
    }

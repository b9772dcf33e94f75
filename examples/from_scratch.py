"""Batch norm from scratch: the forward pass, the hand-derived backward, and a check.

A short walk through what ``jaxbn.batch_norm`` does on a small batch:

1. the forward pass computes per-feature statistics and normalizes;
2. the backward pass takes the upstream gradient ``dy`` (and the cotangents of the
   returned mean and variance) and returns ``dx, dscale, dbias`` by the formula
   derived in ``jaxbn/ops.py``;
3. the hand-written gradients are printed next to ``jax.grad`` of the plain
   reference implementation, with their largest difference.

Run: ``python examples/from_scratch.py [--batch 8] [--features 4] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from jaxbn import reference

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # the shared helpers beside this script
    sys.path.insert(0, _HERE)

import _figures  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Parses the command line."""
    p = _figures.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="examples in the batch (>= 2)")
    p.add_argument("--features", type=int, default=4, help="features per example")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    """Runs the walk-through; returns the largest gradient differences.

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
        ``{"float32": ..., "float64": ...}``: the largest difference between the
        hand-written gradients and ``jax.grad`` of the reference in each dtype, and
        ``"formula"``: between ``batch_norm_bwd`` (float32) and the collected
        formula evaluated in NumPy float64.
    """
    args = parse_args(argv)
    np.set_printoptions(precision=5, suppress=True)
    k = jax.random.split(jax.random.key(args.seed), 4)
    shape = (args.batch, args.features)
    # Features on very different scales and offsets: what batch norm is for.
    x = jax.random.normal(k[0], shape) * jnp.arange(1.0, args.features + 1) + 10.0
    scale = 1.0 + 0.1 * jax.random.normal(k[1], (args.features,))
    bias = 0.1 * jax.random.normal(k[2], (args.features,))
    # A random upstream gradient. (Never use sum(y) as a loss to test batch norm:
    # its gradient with respect to x is exactly zero and hides every bug.)
    dy = jax.random.normal(k[3], shape)

    print("1. Forward: per-feature statistics over the batch axis")
    (y, mean, var), res = jaxbn.batch_norm_fwd(x, scale, bias)
    print("   mean =", np.asarray(mean))
    print("   var  =", np.asarray(var), "(one variance per feature, not a scalar)")
    x_hat = (y - bias) / scale
    print("   x_hat = (x - mean) / sqrt(var + eps) has mean", np.asarray(x_hat.mean(0)))
    print("                                     and std ", np.asarray(x_hat.std(0)))
    print("   y = scale * x_hat + bias")
    print("   residuals kept: x and per-feature mean, inv_std, scale")

    print("\n2. Backward: the upstream gradient dy in, (dx, dscale, dbias) out")
    zeros = jnp.zeros_like(mean)
    dx, dscale, dbias = jaxbn.batch_norm_bwd(res, (dy, zeros, zeros))
    # The same three gradients from the collected formula of jaxbn/ops.py, written
    # out in NumPy float64 (no cotangent on mean and var here, so those terms are 0).
    x64, dy64, s64 = (np.asarray(v, np.float64) for v in (x, dy, scale))
    n = x64.shape[0]
    xc = x64 - x64.mean(0)
    inv_std = 1.0 / np.sqrt((xc**2).mean(0) + 1e-5)
    a = s64 * inv_std
    b = -(inv_std**3) * (s64 * dy64 * xc).sum(0) / n
    c = -inv_std * (s64 * dy64).sum(0) / n
    by_formula = {
        "dbias": dy64.sum(0),
        "dscale": (dy64 * xc * inv_std).sum(0),
        "dx": a * dy64 + b * xc + c,
    }
    print("   dbias  = sum(dy)         =", np.asarray(dbias))
    print("   dscale = sum(dy * x_hat) =", np.asarray(dscale))
    print("   dx = A * dy + B * (x - mean) + C, per feature, with")
    print("   A = scale * inv_std                             =", a)
    print("   B = -inv_std^3 * sum(scale * dy * (x - mean)) / n =", b)
    print("   C = -inv_std * sum(scale * dy) / n              =", c)
    print("   dx[0] =", np.asarray(dx)[0], "(the first example)")
    formula = max(
        float(np.abs(np.asarray(g, np.float64) - by_formula[name]).max())
        for name, g in (("dx", dx), ("dscale", dscale), ("dbias", dbias))
    )
    print(f"   largest |batch_norm_bwd - formula in float64|: {formula:.2e}")

    print("\n3. Compare with jax.grad of the plain reference implementation")
    results = {}
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            xd, sd, bd, dyd = (jnp.asarray(np.asarray(v), dtype) for v in (x, scale, bias, dy))

            def loss(fn, x, s, b, dyd=dyd):
                return jnp.sum(fn(x, s, b)[0] * dyd)

            want = jax.grad(loss, argnums=(1, 2, 3))(reference.batch_norm, xd, sd, bd)
            got = jax.grad(loss, argnums=(1, 2, 3))(jaxbn.batch_norm, xd, sd, bd)
            diff = max(float(jnp.abs(g - w).max()) for g, w in zip(got, want, strict=True))
            results[jnp.dtype(dtype).name] = diff
            if dtype == jnp.float32:
                got32 = got
                for name, h, a in zip(("dx", "dscale", "dbias"), got, want, strict=True):
                    print(f"   {name} (hand-written) =", np.asarray(h).ravel()[:6])
                    print(f"   {name} (jax.grad)     =", np.asarray(a).ravel()[:6])
    hand = max(float(jnp.abs(a - b).max()) for a, b in zip((dx, dscale, dbias), got32, strict=True))
    print(f"\n   batch_norm_bwd called by hand vs through jax.grad: {hand:.2e}")
    for name, diff in results.items():
        print(f"   largest |hand-written - jax.grad| in {name}: {diff:.2e}")
    results["formula"] = formula
    return results


if __name__ == "__main__":
    main()

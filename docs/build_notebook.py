# ruff: noqa: E501 (Markdown tables in the cells cannot be wrapped)
"""Writes ``docs/batch_norm_from_scratch.ipynb`` from the cells below, executes it, saves it.

The notebook is generated so that its source is reviewable as ordinary Python and
its saved outputs always come from one clean top-to-bottom run:

    python docs/build_notebook.py            # write, execute (under a minute), save with outputs
    python docs/build_notebook.py --no-run   # write the cells only, without outputs

The kernel imports the ``jaxbn`` of this checkout (its root is put first on the
kernel's ``PYTHONPATH``). ``tests/test_notebook.py`` executes the notebook again
and checks that the printed numbers match the saved ones.

Cells tagged ``loose-numbers`` print numbers that depend on a whole training run
(test accuracies); the test compares those with a wider tolerance.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import nbformat
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "batch_norm_from_scratch.ipynb"
LOOSE = "loose-numbers"

CELLS: list[tuple[str, str] | tuple[str, str, list[str]]] = [
    (
        "md",
        r"""# Batch normalization from scratch, in JAX

This notebook builds batch normalization (Ioffe & Szegedy, *Batch Normalization:
Accelerating Deep Network Training by Reducing Internal Covariate Shift*, ICML 2015)
from nothing but `jax.numpy`, the way the `jaxbn` library does it:

1. the **forward** pass on a small batch, step by step, and its computation graph;
2. the **backward** pass derived node by node, then collected into the one-line form
   that `jaxbn/ops.py` uses, including the terms for gradients arriving on the returned
   `mean` and `var`;
3. two classic **mistakes** (a single scalar variance instead of one per feature; the
   layer's output multiplied where the upstream gradient belongs), reproduced and
   caught by a gradient check;
4. the hand-written backward **registered with `jax.custom_vjp`** and checked against
   `jax.grad` of a plain implementation;
5. **Bessel's correction**: why training normalizes with the biased variance, and why
   PyTorch's running variance is the unbiased one;
6. a small **MLP trained with and without batch norm** on handwritten digits, with
   `jaxbn`;
7. **what the library adds** on top of the textbook formula.

It runs in about half a minute on two CPU cores (25 s of CPU time, most of it in
section 6).""",
    ),
    (
        "code",
        """import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

import jaxbn

np.set_printoptions(precision=4, suppress=True)""",
    ),
    (
        "md",
        r"""## 1. The forward pass, step by step

A batch of $n = 6$ examples with 3 features on very different scales and offsets (what
batch norm is for). Batch norm keeps the feature axis and reduces over the batch axis:
every feature gets its own mean and its own variance.""",
    ),
    (
        "code",
        """key_x, key_dy, key_dmean, key_dvar = jax.random.split(jax.random.key(0), 4)
n, features = 6, 3
x = jax.random.normal(key_x, (n, features)) * jnp.array([1.0, 5.0, 0.5]) + jnp.array(
    [0.0, 10.0, -3.0]
)
gamma = jnp.array([1.0, 0.5, 2.0])  # scale, one per feature
beta = jnp.array([0.0, 1.0, -1.0])  # bias (shift), one per feature
eps = 1e-5
print(x)""",
    ),
    (
        "md",
        r"""With $\mu$ and $\sigma^2$ the per-feature statistics over the batch:

$$
\mu = \frac{1}{n}\sum_i x_i, \qquad
\sigma^2 = \frac{1}{n}\sum_i (x_i - \mu)^2, \qquad
\hat x_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
y_i = \gamma \hat x_i + \beta .
$$

Written as six small steps, each one a node of the computation graph:""",
    ),
    (
        "code",
        """mean = x.mean(axis=0)  # (1) per-feature mean over the batch axis
xc = x - mean  # (2) centre
var = (xc**2).mean(axis=0)  # (3) per-feature variance (divides by n: biased)
inv_std = 1.0 / jnp.sqrt(var + eps)  # (4) one over the standard deviation
x_hat = xc * inv_std  # (5) normalize
y = gamma * x_hat + beta  # (6) scale and shift

print("mean    =", mean)
print("var     =", var, "(one variance per feature)")
print("inv_std =", inv_std)
print("x_hat: mean", x_hat.mean(axis=0), "variance", x_hat.var(axis=0))
print("y:     mean", y.mean(axis=0), "(= beta), std", y.std(axis=0), "(= |gamma|)")""",
    ),
    (
        "md",
        r"""### The computation graph

Each box is a node; arrows carry values forward. Three values are returned: `y`, and
the batch statistics `mean` and `var` (a layer uses them to update its running
averages, and a loss may use them too, so the backward must accept a gradient on each).

```text
                  x
          ┌───────┴────────┐
          ▼                │
    (1) mean ──────────────┼──────────────────────────────► mean  (output)
          │                ▼
          └──────────► (2) xc = x - mean
                           │
               ┌───────────┴───────────┐
               ▼                       │
    (3) var = mean(xc²) ───────────────┼───────────────────► var   (output)
               │                       │
               ▼                       │
    (4) inv_std = 1 / √(var + ε)       │
               │                       ▼
               └─────────────────► (5) x_hat = xc · inv_std
                                       │
                   gamma, beta ──► (6) y = gamma · x_hat + beta ──► y  (output)
```

`x` feeds two nodes (1 and 2), `mean` two (2 and the output), `xc` two (3 and 5),
`var` two (4 and the output). In the backward pass the gradients that reach a value
along each of its uses **add up**: this is where hand derivations usually go wrong.""",
    ),
    (
        "md",
        r"""## 2. The backward pass, node by node

The backward pass receives one upstream gradient (cotangent) per output: $dy$ (shaped
like $x$), $g_\mu$ and $g_{\sigma^2}$ (one per feature), and walks the graph in reverse.
Sums run over the batch, per feature.

| node | forward | backward (gradient sent to the inputs) |
|---|---|---|
| (6) | $y = \gamma \hat x + \beta$ | $d\beta = \sum_i dy_i$, $\; d\gamma = \sum_i dy_i \hat x_i$, $\; d\hat x = \gamma\, dy$ |
| (5) | $\hat x = x_c \cdot s$ | $dx_c \mathrel{+}= s\, d\hat x$, $\; ds = \sum_i d\hat x_i\, x_{c,i}$ |
| (4) | $s = (\sigma^2 + \epsilon)^{-1/2}$ | $d\sigma^2 = g_{\sigma^2} - \tfrac12 s^3\, ds$ |
| (3) | $\sigma^2 = \frac1n \sum_i x_{c,i}^2$ | $dx_c \mathrel{+}= \frac{2}{n} x_c\, d\sigma^2$ |
| (2) | $x_c = x - \mu$ | $dx \mathrel{+}= dx_c$, $\; d\mu = g_\mu - \sum_i dx_{c,i}$ |
| (1) | $\mu = \frac1n \sum_i x_i$ | $dx \mathrel{+}= \frac1n d\mu$ |

($s$ is `inv_std`, $x_c$ is `xc`.) In code, one line per entry of the table:""",
    ),
    (
        "code",
        """def backward_by_nodes(dy, g_mean, g_var, x, gamma):
    \"\"\"The backward pass, walking the graph from node (6) back to node (1).\"\"\"
    n = x.shape[0]
    mean = x.mean(axis=0)  # recompute what the forward computed
    xc = x - mean
    var = (xc**2).mean(axis=0)
    inv_std = 1.0 / jnp.sqrt(var + eps)
    x_hat = xc * inv_std
    # (6) y = gamma * x_hat + beta
    dbeta = dy.sum(axis=0)
    dgamma = (dy * x_hat).sum(axis=0)
    dx_hat = gamma * dy
    # (5) x_hat = xc * inv_std
    dxc = inv_std * dx_hat
    dinv_std = (dx_hat * xc).sum(axis=0)
    # (4) inv_std = (var + eps) ** -0.5, plus the gradient arriving on the output var
    dvar = g_var - 0.5 * inv_std**3 * dinv_std
    # (3) var = mean(xc ** 2)
    dxc = dxc + 2.0 / n * xc * dvar
    # (2) xc = x - mean, plus the gradient arriving on the output mean
    dx = dxc
    dmean = g_mean - dxc.sum(axis=0)
    # (1) mean = sum(x) / n
    dx = dx + dmean / n
    return dx, dgamma, dbeta""",
    ),
    (
        "md",
        r"""To check it we need an oracle: JAX's own autodiff of the plain forward pass
(`jax.vjp`), with **random** cotangents on all three outputs. (Never check batch norm
with the loss `sum(y)`: its gradient with respect to `x` is exactly zero, so any
backward that returns zeros for `dx` would pass.)

A small helper prints whether two results are exactly equal, equal to within
floating-point rounding, and their largest difference (a difference below $10^{-5}$,
float32 rounding, as "< 1e-05": its last digits vary from one CPU to another):""",
    ),
    (
        "code",
        """def compare(name, ours, autodiff, *, rtol=1e-5, atol=1e-5):
    \"\"\"Prints exact / close / max difference of two arrays; returns `close`.\"\"\"
    ours, autodiff = np.asarray(ours), np.asarray(autodiff)
    exact = bool(np.array_equal(ours, autodiff))
    close = bool(np.allclose(ours, autodiff, rtol=rtol, atol=atol))
    diff = float(np.max(np.abs(ours - autodiff)))
    # Below 1e-5 a difference is float32 rounding, whose last bits differ between
    # CPUs: only its bound is printed, so that the output is the same everywhere.
    shown = "< 1e-05" if diff < 1e-5 else f"{diff:.1e}"
    print(f"{name:<24} exact: {exact!s:<5}  close: {close!s:<5}  max difference: {shown}")
    return close


def forward(x, gamma, beta):
    \"\"\"The plain forward pass of section 1, returning the three outputs.\"\"\"
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    return gamma * (x - mean) / jnp.sqrt(var + eps) + beta, mean, var


dy = jax.random.normal(key_dy, x.shape)
g_mean = jax.random.normal(key_dmean, (features,))
g_var = jax.random.normal(key_dvar, (features,))

_, forward_vjp = jax.vjp(forward, x, gamma, beta)
dx_auto, dgamma_auto, dbeta_auto = forward_vjp((dy, g_mean, g_var))
dx, dgamma, dbeta = backward_by_nodes(dy, g_mean, g_var, x, gamma)
assert compare("dx (node by node)", dx, dx_auto)
assert compare("dgamma (node by node)", dgamma, dgamma_auto)
assert compare("dbeta (node by node)", dbeta, dbeta_auto)
print()
with jax.enable_x64(True):  # float64, so that rounding does not hide the zero
    x64 = jnp.asarray(np.asarray(x), jnp.float64)
    grad_of_sum = jax.grad(lambda x: forward(x, gamma, beta)[0].sum())(x64)
zero = bool(np.abs(grad_of_sum).max() < 1e-12)  # float64 rounding: about 1e-15
print("gradient of sum(y) with respect to x is zero, to float64 rounding:", zero)""",
    ),
    (
        "md",
        r"""Close, not exact: the two compute the same mathematical quantity in a different order,
so they agree to float32 rounding (about $10^{-7}$ relative).

### Collecting the terms into one line

Substitute the nodes into each other. From (2) and (1),
$dx = dx_c + \frac1n\big(g_\mu - \sum_i dx_{c,i}\big)$, and from (5) and (3)
$dx_c = \gamma s\, dy + \frac2n x_c\, d\sigma^2$. Summing the latter over the batch, the
second term drops out because $\sum_i x_{c,i} = 0$ (true in exact arithmetic: the
centred values sum to zero by construction). With $d\sigma^2 = g_{\sigma^2} - \tfrac12 s^3
\sum_i \gamma\, dy_i\, x_{c,i}$ everything collects into one line per feature:

$$
dx = A\, dy + B\,(x - \mu) + C, \qquad
\begin{aligned}
A &= \gamma s, \\
B &= \tfrac1n\Big(2 g_{\sigma^2} - s^3 \textstyle\sum_i \gamma\, dy_i (x_i - \mu)\Big)
   = \tfrac1n\big(2 g_{\sigma^2} - A\, s\, d\gamma\big), \\
C &= \tfrac1n\Big(g_\mu - s \textstyle\sum_i \gamma\, dy_i\Big)
   = \tfrac1n\big(g_\mu - A\, d\beta\big),
\end{aligned}
$$

with $d\beta = \sum_i dy_i$ and $d\gamma = s \sum_i dy_i (x_i - \mu)$. This is the form in
the comment beside `_bwd` in `jaxbn/ops.py`. It needs only two sums per feature
($\sum dy$ and $\sum dy\,(x-\mu)$), then one pass to write `dx`; and it needs only `x`
and the per-feature vectors `mean`, `inv_std` and `gamma` from the forward pass, no
normalized copy of `x`.""",
    ),
    (
        "code",
        """def backward_one_line(dy, g_mean, g_var, x, mean, inv_std, gamma):
    \"\"\"The collected form: dx = A * dy + B * (x - mean) + C.\"\"\"
    n = x.shape[0]
    xc = x - mean
    dbeta = dy.sum(axis=0)
    dgamma = inv_std * (dy * xc).sum(axis=0)
    a = gamma * inv_std
    b = (2.0 * g_var - a * inv_std * dgamma) / n
    c = (g_mean - a * dbeta) / n
    return a * dy + b * xc + c, dgamma, dbeta


dx1, dgamma1, dbeta1 = backward_one_line(dy, g_mean, g_var, x, mean, inv_std, gamma)
assert compare("dx (one line)", dx1, dx_auto)
assert compare("dgamma (one line)", dgamma1, dgamma_auto)
assert compare("dbeta (one line)", dbeta1, dbeta_auto)

# The library's two halves, called by hand: batch_norm_fwd returns the residuals.
(_, _, _), residuals = jaxbn.batch_norm_fwd(x, gamma, beta, eps=eps)
kept = [
    f.name
    for f in dataclasses.fields(residuals)
    if isinstance(getattr(residuals, f.name), jax.Array)
]
print("residuals kept by jaxbn:", kept)
dx_lib, dgamma_lib, dbeta_lib = jaxbn.batch_norm_bwd(residuals, (dy, g_mean, g_var))
assert compare("dx (jaxbn.batch_norm_bwd)", dx_lib, dx_auto)""",
    ),
    (
        "md",
        r"""## 3. Two mistakes that run without an error

A first implementation of batch norm, written in NumPy from the formulas, often looks
like the code below. Names that are never defined (`var`, `Z_mu`, `N`, `Zout`, or
`Cache` where `cache` was meant) are the easy mistakes: Python stops at them on the
first call. Two others run without any error:

* **a scalar variance**: `np.mean((Z - mean) ** 2)` averages over the batch *and* the
  features, so every feature is divided by one common standard deviation;
* **the output where the upstream gradient belongs**: the backward takes `Z_out`, the
  layer's own output, and uses it as $dy$ (`dZ_norm = Z_out * gamma`,
  `dgamma = sum(Z_out * Z_norm)`, `dbeta = sum(Z_out)`): it is then the gradient of
  $\tfrac12\sum y^2$, whatever the loss.

Here is such an implementation in `jax.numpy`, its names defined and both mistakes
kept:""",
    ),
    (
        "code",
        """def buggy_forward(Z, gamma, beta, epsilon=1e-8):
    mean = jnp.mean(Z, axis=0)
    variance = jnp.mean((Z - mean) ** 2)  # mistake 1: one scalar for all features
    Z_norm = (Z - mean) / jnp.sqrt(variance + epsilon)
    Z_out = gamma * Z_norm + beta
    return Z_out, (Z, Z_norm, Z_out, mean, variance, gamma, beta)


def buggy_backward(upstream, cache, epsilon=1e-8):
    \"\"\"The backward; mistake 2 is to call it with upstream=Z_out instead of dy.\"\"\"
    Z, Z_norm, _, mean, variance, gamma, _ = cache  # (Z_out and beta are not needed)
    N = Z.shape[0]
    Z_mean = Z - mean
    inverted_sd = 1.0 / jnp.sqrt(variance + epsilon)
    dZ_norm = upstream * gamma
    dvar = jnp.sum(dZ_norm * Z_mean, axis=0) * -0.5 * inverted_sd**3  # per feature
    dmean = jnp.sum(dZ_norm * -inverted_sd, axis=0) + dvar * jnp.mean(-2.0 * Z_mean, axis=0)
    dZ = dZ_norm * inverted_sd + dvar * 2 * Z_mean / N + dmean / N
    dgamma = jnp.sum(upstream * Z_norm, axis=0)
    dbeta = jnp.sum(upstream, axis=0)
    return dZ, dgamma, dbeta


def fixed_forward(Z, gamma, beta, epsilon=1e-8):
    \"\"\"The forward with mistake 1 corrected: one variance per feature.\"\"\"
    mean = jnp.mean(Z, axis=0)
    variance = jnp.mean((Z - mean) ** 2, axis=0)
    Z_norm = (Z - mean) / jnp.sqrt(variance + epsilon)
    Z_out = gamma * Z_norm + beta
    return Z_out, (Z, Z_norm, Z_out, mean, variance, gamma, beta)


Z_out, cache = buggy_forward(x, gamma, beta)
print("mistake 1 in the forward: std of Z_norm per feature =", cache[1].std(axis=0), "(not 1)")""",
    ),
    (
        "md",
        r"""The scalar variance already breaks the forward pass: the feature with the largest
spread dominates the common variance: it comes out with a standard deviation above 1,
the others below 1, instead of all three being normalized. Now each mistake alone against autodiff of the forward it belongs
to, with the same random $dy$ as before:""",
    ),
    (
        "code",
        """def autodiff_of(fwd):
    \"\"\"(dx, dgamma, dbeta) from jax.vjp of a forward's first output, for cotangent dy.\"\"\"
    _, vjp = jax.vjp(lambda *args: fwd(*args)[0], x, gamma, beta)
    return vjp(dy)


print("mistake 1 alone: scalar variance in the forward, the backward given dy")
ours = buggy_backward(dy, buggy_forward(x, gamma, beta)[1])
for name, a, b in zip(("dx", "dgamma", "dbeta"), ours, autodiff_of(buggy_forward), strict=True):
    compare(name, a, b)

print("\\nmistake 2 alone: per-feature variance, the backward given Z_out instead of dy")
Z_out, cache = fixed_forward(x, gamma, beta)
ours = buggy_backward(Z_out, cache)
for name, a, b in zip(("dx", "dgamma", "dbeta"), ours, autodiff_of(fixed_forward), strict=True):
    compare(name, a, b)

print("\\nboth corrected: per-feature variance, the backward given dy")
ours = buggy_backward(dy, cache)
for name, a, b in zip(("dx", "dgamma", "dbeta"), ours, autodiff_of(fixed_forward), strict=True):
    assert compare(name, a, b)""",
    ),
    (
        "md",
        r"""With the scalar variance, `dgamma` and `dbeta` are still right (they need only
`Z_norm`, however it was computed), but `dx` is wrong: the backward differentiates a
per-feature variance that the forward does not compute. With `Z_out` as the upstream
gradient nothing is right. Once both are corrected, this
backward (which is the node-by-node backward without the $g_\mu$, $g_{\sigma^2}$ terms)
agrees with autodiff.

`jax.test_util.check_grads` finds the same thing without an oracle: it compares the
backward against finite differences of the forward along random directions. It needs
float64 (finite differences in float32 are too noisy), so it runs inside
`jax.enable_x64(True)`. We register each backward with `jax.custom_vjp`, which is how
JAX lets us replace its autodiff rule with our own:""",
    ),
    (
        "code",
        """def with_backward(fwd, upstream_is_output):
    \"\"\"fwd's first output as a function whose VJP is buggy_backward.\"\"\"

    @jax.custom_vjp
    def f(Z, gamma, beta):
        return fwd(Z, gamma, beta)[0]

    def f_fwd(Z, gamma, beta):
        return fwd(Z, gamma, beta)  # (output, residuals)

    def f_bwd(cache, dy):
        Z_out = cache[2]
        return buggy_backward(Z_out if upstream_is_output else dy, cache)

    f.defvjp(f_fwd, f_bwd)
    return f


def gradient_check(name, f):
    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, gamma, beta)]
        try:
            check_grads(jax.jit(f), args, order=1, modes=["rev"])
        except AssertionError as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            print(f"{name:<34} check_grads FAILED: {lines[0]} ({lines[1]})")
            return False
        print(f"{name:<34} check_grads passed")
        return True


assert not gradient_check("mistake 1 (scalar variance)", with_backward(buggy_forward, False))
assert not gradient_check("mistake 2 (Z_out for dy)", with_backward(fixed_forward, True))
assert gradient_check("both corrected", with_backward(fixed_forward, False))""",
    ),
    (
        "md",
        r"""## 4. The hand-written backward as a `jax.custom_vjp`

Now the whole op, as `jaxbn.batch_norm` defines it: three outputs `(y, mean, var)`, the
forward keeping only `x` and per-feature vectors as residuals, the backward taking a
cotangent for each output and returning one per input. `jax.grad` then uses our
backward wherever the function appears, inside `jit`, `vmap` or `scan`.""",
    ),
    (
        "code",
        """@jax.custom_vjp
def batch_norm(x, gamma, beta):
    return batch_norm_fwd(x, gamma, beta)[0]


def batch_norm_fwd(x, gamma, beta):
    mean = x.mean(axis=0)
    var = ((x - mean) ** 2).mean(axis=0)
    inv_std = 1.0 / jnp.sqrt(var + eps)
    y = gamma * (x - mean) * inv_std + beta
    return (y, mean, var), (x, mean, inv_std, gamma)  # outputs, residuals


def batch_norm_bwd(residuals, cotangents):
    x, mean, inv_std, gamma = residuals
    dy, g_mean, g_var = cotangents
    return backward_one_line(dy, g_mean, g_var, x, mean, inv_std, gamma)  # (dx, dgamma, dbeta)


batch_norm.defvjp(batch_norm_fwd, batch_norm_bwd)

# A loss that uses all three outputs, with random weights: every cotangent is non-zero.
w_y, w_mean, w_var = dy, g_mean, g_var


def loss(f, x, gamma, beta):
    y, mean, var = f(x, gamma, beta)
    return jnp.sum(w_y * y) + jnp.sum(w_mean * mean) + jnp.sum(w_var * var)


ours = jax.jit(jax.grad(loss, argnums=(1, 2, 3)), static_argnums=0)(batch_norm, x, gamma, beta)
plain = jax.grad(loss, argnums=(1, 2, 3))(forward, x, gamma, beta)
library = jax.grad(loss, argnums=(1, 2, 3))(
    lambda *a: jaxbn.batch_norm(*a, eps=eps), x, gamma, beta
)
for name, a, b, c in zip(("dx", "dgamma", "dbeta"), ours, plain, library, strict=True):
    assert compare(f"{name} vs jax.grad", a, b)
    assert compare(f"{name} vs jaxbn", a, c)""",
    ),
    (
        "md",
        r"""And the finite-difference check in float64, to second order: `order=2` also
differentiates our backward itself (it is written in differentiable `jnp`, so `grad` of
`grad` works through a `custom_vjp`).""",
    ),
    (
        "code",
        """with jax.enable_x64(True):
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, gamma, beta)]
    # Jitted: the check evaluates each function and its derivatives many times.
    check_grads(jax.jit(batch_norm), args, order=2, modes=["rev"])
    check_grads(jax.jit(jaxbn.batch_norm), args, order=2, modes=["rev"])
print("check_grads, order 2, float64: passed for our batch_norm and for jaxbn.batch_norm")""",
    ),
    (
        "md",
        r"""## 5. Bessel's correction: biased in training, unbiased for the running average

In training, batch norm normalizes each batch with its **own** variance, computed with
$\frac1n$ (the biased estimator). The batch is not a sample standing for something
else here: it is exactly the set of values being normalized, and with $\frac1n$ the
normalized batch has variance exactly 1 (up to $\epsilon$). The backward of section 2
is the derivative of that formula.

At inference the layer normalizes with **running averages** of the batch statistics,
meant to estimate the statistics of the whole population. As an estimate of the
population variance, the $\frac1n$ batch variance is too small on average by the factor
$\frac{n-1}{n}$; multiplying by $\frac{n}{n-1}$ (Bessel's correction) removes the bias.
PyTorch does this for its running variance; Flax does not. For a batch of 60 the
difference is 1.7%; for a batch of 8 it is 14%.""",
    ),
    (
        "code",
        """# 20,000 batches of 8 values drawn from a population of variance 4.
batches = 2.0 * jax.random.normal(jax.random.key(1), (20_000, 8))
biased = float(batches.var(axis=1).mean())
unbiased = float(batches.var(axis=1, ddof=1).mean())
print(f"batch of 8, average biased variance:   {biased:.3f}  (expected 4 * 7/8 = 3.5)")
print(f"batch of 8, average unbiased variance: {unbiased:.3f}  (expected 4)")

# In jaxbn: the default running variance averages the biased batch variances (Flax's
# convention); unbiased_running_var=True (and BatchNorm.like_torch) applies n / (n - 1).
x8 = np.asarray(batches[:1].T)  # one batch: 8 examples of 1 feature
for unbiased_running_var in (False, True):
    bn = jaxbn.BatchNorm(1, momentum=0.0, unbiased_running_var=unbiased_running_var)
    params, state = bn.init()
    y8, state = bn.apply(params, state, x8, training=True)  # momentum 0: running = this batch
    print(
        f"unbiased_running_var={unbiased_running_var!s:<5}: "
        f"running var {float(state['var'][0]):.4f}, y8 variance {float(y8.var()):.4f}"
    )
print(f"np.var(ddof=0) = {np.var(x8):.4f}, np.var(ddof=1) = {np.var(x8, ddof=1):.4f}")""",
    ),
    (
        "md",
        r"""## 6. A small MLP, trained with and without batch norm

The paper's first experiment (its Figure 1): a network of 3 hidden layers of 100 sigmoid
units, batches of 60, plain SGD; once as is, once with batch norm before each sigmoid.
Here on the 8x8 handwritten digits bundled with scikit-learn (1,438 training and 359 test
images), with `jaxbn`:

* `jaxbn.data.load_digits()` splits and standardizes the digits;
* `jaxbn.MLP(layer_sizes, activation=..., use_batch_norm=...)` is the network, a frozen
  config with `init(key) -> (params, state)` and
  `apply(params, state, x, training=...) -> (logits, state)`;
* `jaxbn.train.fit` trains it in chunks compiled with `lax.scan` (batches drawn on the
  device from the key), calling back after each chunk, where we measure the test
  accuracy with `jaxbn.train.evaluate` (inference mode: running statistics).

Both networks start from the same seed and see the same batches.""",
    ),
    (
        "code",
        """import optax

from jaxbn.data import load_digits
from jaxbn.train import evaluate, fit

data = load_digits()


def train(use_batch_norm, steps=2500, every=100):
    model = jaxbn.MLP((64, 100, 100, 100, 10), activation="sigmoid", use_batch_norm=use_batch_norm)
    record = {"step": [], "accuracy": []}

    def on_chunk(train_state, chunk_metrics):
        metrics = evaluate(model, train_state.params, train_state.state, data.x_test, data.y_test)
        record["step"].append(int(train_state.step))
        record["accuracy"].append(float(metrics["accuracy"]))

    fit(
        model,
        optax.sgd(0.1),
        data.x_train,
        data.y_train,
        steps=steps,
        batch_size=60,
        key=jax.random.key(0),
        chunk_size=every,
        callback=on_chunk,
    )
    return record


runs = {"without batch norm": train(False), "with batch norm": train(True)}
print("step   test accuracy without / with batch norm")
for i, step in enumerate(runs["with batch norm"]["step"]):
    if step in (200, 500, 1000, 2500):
        without, with_ = (runs[k]["accuracy"][i] for k in runs)
        print(f"{step:>4}   {without:.3f} / {with_:.3f}")""",
        [LOOSE],
    ),
    (
        "code",
        """import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3.5))
for label, record in runs.items():
    ax.plot(record["step"], record["accuracy"], label=label)
ax.set_xlabel("training step")
ax.set_ylabel("test accuracy")
ax.set_ylim(0, 1)
ax.grid(alpha=0.3)
ax.legend()
ax.set_title("3x100 sigmoid MLP on the digits, batches of 60, SGD 0.1")
plt.show()""",
    ),
    (
        "md",
        r"""With batch norm the network is past 90% test accuracy after a couple of hundred steps;
without it, training is far slower to start and catches up only after thousands of
steps. `examples/paper_figure1.py` runs the full experiment (10,000 steps) and also
plots the paper's panels (b, c): the distribution of the input to one sigmoid drifting
during training without batch norm, and stable with it.

## 7. What the library adds

The textbook formula above is the core of `jaxbn.batch_norm`. The library adds what it
takes to use it for real; each point in a few lines.

**Numerics at large offsets.** The one-pass variance $E[x^2] - E[x]^2$ (used by some
libraries because it reads `x` once) cancels catastrophically in float32 when
$|\mu| \gg \sigma$. `jaxbn.batch_norm` shifts by one of the batch's own samples before
squaring, still in one fused pass (see `jaxbn.ops`).""",
    ),
    (
        "code",
        """far = 1e4 + jax.random.normal(jax.random.key(2), (512, 4))  # float32, mean 1e4, std 1
truth = np.asarray(far, np.float64).var(axis=0)
naive = (far**2).mean(axis=0) - far.mean(axis=0) ** 2
_, _, var_lib = jaxbn.batch_norm(far, None, None)
err_naive = float(np.max(np.abs(np.asarray(naive) - truth) / truth))
err_lib = float(np.max(np.abs(np.asarray(var_lib) - truth) / truth))
print("naive E[x^2] - E[x]^2 off by more than 10%:", err_naive > 0.1)
print("jaxbn.batch_norm within 1e-5 (relative):   ", err_lib < 1e-5)""",
    ),
    (
        "md",
        r"""**bfloat16.** Low-precision inputs are reduced in float32: the statistics come back in
float32, `y` in the input's dtype, and the gradients of `scale` and `bias` in theirs.
The layer adds a precision policy: `jaxbn.BatchNorm(features, dtype=jnp.bfloat16,
param_dtype=jnp.float32)`.""",
    ),
    (
        "code",
        """x16 = x.astype(jnp.bfloat16)
y16, mean16, var16 = jaxbn.batch_norm(x16, gamma, beta)
print("dtypes: x", x16.dtype, "| y", y16.dtype, "| mean", mean16.dtype, "| var", var16.dtype)
y_f32 = jaxbn.batch_norm(x16.astype(jnp.float32), gamma, beta)[0]  # same inputs, all float32
same = bool(jnp.array_equal(y16, y_f32.astype(jnp.bfloat16)))
print("y equals the float32 result rounded to bfloat16:", same)""",
    ),
    (
        "md",
        r"""**Masks.** Padded batches (sequences of different lengths, a last incomplete batch):
entries where `mask` is `False` are left out of the statistics, and of the gradients
when the loss ignores them too; `y` stays finite everywhere. The layer takes the same
`mask=` in `apply`, and leaves the running statistics alone when a mask keeps nothing.""",
    ),
    (
        "code",
        """padded = jnp.concatenate([x, jnp.full((2, features), 1e3)])  # 2 rows of padding
keep = jnp.arange(n + 2) < n
_, mean_m, var_m = jaxbn.batch_norm(padded, gamma, beta, mask=keep)
assert compare("masked mean vs unpadded", mean_m, mean)
assert compare("masked var vs unpadded", var_m, var)""",
    ),
    (
        "md",
        r"""**`axis_name`: statistics over several devices.** Inside `jax.shard_map` (or `pmap`,
or a `vmap` with a named axis, as below on one CPU), `axis_name` makes the statistics
those of the whole global batch, and the hand-written backward all-reduces its two sums
the same way. For data-parallel training, `jaxbn.train.fit(..., mesh=jaxbn.train.data_mesh(n))`
does all of it (see the README's section on synchronized batch norm).""",
    ),
    (
        "code",
        """shards = x.reshape(2, n // 2, features)  # the batch split in two "devices"
per_shard = jax.vmap(
    lambda s: jaxbn.batch_norm(s, gamma, beta, axis_name="batch"), axis_name="batch"
)
y_sh, mean_sh, var_sh = per_shard(shards)
assert compare("global mean on each shard", mean_sh[0], mean)
assert compare("y, reassembled", y_sh.reshape(n, features), jaxbn.batch_norm(x, gamma, beta)[0])""",
    ),
    (
        "md",
        r"""Also in the library: `jaxbn.BatchNorm` (the layer: running statistics, ghost batch
norm, batch renormalization, PyTorch's conventions), `jaxbn.fold_into_dense` (batch norm
folded into the preceding layer for inference), `jaxbn.reference.batch_norm` (the plain
implementation used as the autodiff oracle in the tests, and for `jax.jvp`, which a
`custom_vjp` does not support), and checkpointed, exactly resumable training in
`jaxbn.train.fit`. The API reference documents each of them.""",
    ),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs."""
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, source, *rest) in enumerate(CELLS):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"  # stable ids: a rebuild changes only what changed
        if rest:
            cell.metadata["tags"] = list(rest[0])
        nb.cells.append(cell)
    return nb


def execute(nb: nbformat.NotebookNode, *, timeout: int = 300) -> nbformat.NotebookNode:
    """Runs every cell in a fresh ``python3`` kernel started in ``docs/``.

    Args:
        nb: the notebook (changed in place: outputs filled in).
        timeout: seconds allowed per cell.

    Returns:
        ``nb``, executed.
    """
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_path) if p)
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
            record_timing=False,
        )
        client.execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
    nb.metadata.pop("widgets", None)
    return nb


def main(argv=None) -> None:
    """Writes the notebook (executed unless ``--no-run``).

    Args:
        argv: command-line arguments (``None``: ``sys.argv``).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-run", action="store_true", help="write the cells without outputs")
    p.add_argument("--out", default=str(NOTEBOOK), help="where to write the notebook")
    args = p.parse_args(argv)
    nb = build()
    if not args.no_run:
        start = time.perf_counter()
        execute(nb)
        print(f"executed in {time.perf_counter() - start:.1f} s")
    nbformat.validate(nb)
    nbformat.write(nb, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

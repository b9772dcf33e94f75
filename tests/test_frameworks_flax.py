"""jaxbn.nnx.BatchNorm and jaxbn.linen.BatchNorm against Flax's own BatchNorm.

Each case runs Flax's module and jaxbn's side by side on the same inputs for a few
training steps and then in evaluation, and compares the outputs, the gradients of
the input and of every parameter under a random cotangent on ``y`` (never
``sum(y)``: its gradient with respect to ``x`` is zero for batch norm), and the
updated running statistics.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
from jaxbn import linen as bn_linen  # noqa: E402
from jaxbn import nnx as bn_nnx  # noqa: E402

# Tolerances relative to each array's largest entry. float32: 32 units of rounding
# (the statistics and gradients sum over the batch; Flax's default fast variance
# E[x^2] - E[x]^2 loses a few more units at the offsets used here). bfloat16 inputs
# are exact in float32 and both libraries compute on them in float32, so outputs
# and statistics agree to float32 rounding, and dx (bfloat16) to its last place.
# With dtype=bfloat16 Flax computes in bfloat16: everything agrees to bfloat16.
F32_TOL = 32 * float(jnp.finfo(jnp.float32).eps)
BF16_TOL = 2 * float(jnp.finfo(jnp.bfloat16).eps)

# (shape, axis, mask shape): (N, C); NCHW with a per-position mask.
CASES = {
    "NC": ((16, 5), -1, (16, 1)),
    "NCHW": ((4, 3, 5, 6), 1, (4, 1, 5, 6)),
}


@dataclasses.dataclass(frozen=True)
class Precision:
    x_dtype: object
    dtype: object  # the module's output dtype argument

    def tol(self, what):
        """Tolerance for ``what``: "y", "dx", "dparams" or "stats"."""
        if self.dtype == jnp.bfloat16:
            # Flax computes in bfloat16 here (NNX even rounds x and the statistics to
            # it first); jaxbn computes in float32 and rounds once at the end. Parameter
            # gradients are sums over the batch, which Flax accumulates in bfloat16.
            return 4 * BF16_TOL if what == "dparams" else BF16_TOL
        if what == "dx" and self.x_dtype == jnp.bfloat16:
            return BF16_TOL
        return F32_TOL


PRECISIONS = {
    "f32": Precision(jnp.float32, None),
    "bf16_in": Precision(jnp.bfloat16, None),
    "bf16_out": Precision(jnp.float32, jnp.bfloat16),
}


def make_inputs(shape, axis, mask_shape, steps, precision, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3 * steps + 2)
    fshape = (shape[axis],)
    xs = [
        (2.0 * jax.random.normal(keys[i], shape) + 0.5 + 0.3 * i).astype(precision.x_dtype)
        for i in range(steps)
    ]
    cts = [jax.random.normal(keys[steps + i], shape) for i in range(steps)]
    masks = [jax.random.bernoulli(keys[2 * steps + i], 0.7, mask_shape) for i in range(steps)]
    params = {
        "scale": 1.0 + 0.5 * jax.random.normal(keys[-2], fshape),
        "bias": jax.random.normal(keys[-1], fshape),
    }
    return xs, cts, masks, params


# --- one step of each framework as a pure function ------------------------------


class LinenDriver:
    """Runs a Linen module functionally: ``(y, grads, new_stats)`` for one call."""

    name = "linen"

    def __init__(self, cls, axis, num_features, precision, momentum, **kwargs):
        self.module = cls(axis=axis, momentum=momentum, dtype=precision.dtype, **kwargs)
        self.fshape = (num_features,)

    def init(self, x, params):
        variables = self.module.init(jax.random.key(0), x, use_running_average=True)
        return {"params": params, "batch_stats": dict(variables["batch_stats"])}

    def step(self, variables, x, ct, mask, training):
        def loss(params, x):
            y, updates = self.module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                use_running_average=not training,
                mask=mask,
                mutable=["batch_stats"],
            )
            return jnp.sum(y.astype(jnp.float32) * ct), (y, updates["batch_stats"])

        grads, (y, stats) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        return y, {"x": grads[1], **grads[0]}, {"params": variables["params"], "batch_stats": stats}

    @staticmethod
    def stats(variables):
        return dict(variables["batch_stats"])


class NNXDriver:
    """Runs an NNX module with ``nnx.grad``; the module's statistics update in place."""

    name = "nnx"

    def __init__(self, cls, axis, num_features, precision, momentum, **kwargs):
        self.make = lambda: cls(
            num_features, axis=axis, momentum=momentum, dtype=precision.dtype,
            rngs=nnx.Rngs(0), **kwargs,
        )  # fmt: skip

    def init(self, x, params):
        model = self.make()
        model.scale[...] = params["scale"]
        model.bias[...] = params["bias"]
        return model

    def step(self, model, x, ct, mask, training):
        def loss(model, x):
            y = model(x, use_running_average=not training, mask=mask)
            return jnp.sum(y.astype(jnp.float32) * ct), y

        grads, y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        g = {"x": grads[1], "scale": grads[0]["scale"][...], "bias": grads[0]["bias"][...]}
        return y, g, model

    @staticmethod
    def stats(model):
        return {"mean": model.mean[...], "var": model.var[...]}


FRAMEWORKS = {
    "nnx": (NNXDriver, nnx.BatchNorm, bn_nnx.BatchNorm),
    "linen": (LinenDriver, nn.BatchNorm, bn_linen.BatchNorm),
}


def run_side_by_side(framework, case, precision, *, use_mask, steps=3, momentum=0.8):
    """Trains Flax's module and jaxbn's on the same batches, then evaluates both.

    Returns the list of ``(what, jaxbn's, Flax's)`` results to compare, and the
    final running statistics of both.
    """
    driver_cls, flax_cls, jaxbn_cls = FRAMEWORKS[framework]
    shape, axis, mask_shape = CASES[case]
    xs, cts, masks, params = make_inputs(shape, axis, mask_shape, steps + 1, precision)
    ours = driver_cls(jaxbn_cls, axis, shape[axis], precision, momentum)
    theirs = driver_cls(flax_cls, axis, shape[axis], precision, momentum)
    v_ours, v_theirs = ours.init(xs[0], params), theirs.init(xs[0], params)
    pairs = []
    for i in range(steps + 1):
        training = i < steps
        mask = masks[i] if use_mask else None
        y_o, g_o, v_ours = ours.step(v_ours, xs[i], cts[i], mask, training)
        y_t, g_t, v_theirs = theirs.step(v_theirs, xs[i], cts[i], mask, training)
        mode = "train" if training else "eval"
        assert y_o.dtype == y_t.dtype, (mode, y_o.dtype, y_t.dtype)
        assert g_o["x"].dtype == g_t["x"].dtype == xs[i].dtype
        pairs.append((f"{mode}{i} y", "y", y_o, y_t))
        pairs.append((f"{mode}{i} dx", "dx", g_o["x"], g_t["x"]))
        dparams = {k: g_o[k] for k in ("scale", "bias")}
        pairs.append((f"{mode}{i} dparams", "dparams", dparams, {k: g_t[k] for k in dparams}))
        pairs.append((f"{mode}{i} stats", "stats", ours.stats(v_ours), theirs.stats(v_theirs)))
    return pairs, ours.stats(v_ours), theirs.stats(v_theirs)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("precision", list(PRECISIONS), ids=list(PRECISIONS))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_equals_flax(framework, case, precision, use_mask, assert_trees_close):
    """Outputs, gradients of x and of every parameter, running statistics: train, eval."""
    prec = PRECISIONS[precision]
    pairs, stats_ours, stats_theirs = run_side_by_side(framework, case, prec, use_mask=use_mask)
    for label, what, got, want in pairs:
        assert_trees_close(got, want, tol=prec.tol(what), err_msg=label)
    # The statistics moved away from their initial (0, 1), and the parameter
    # gradients are not trivially zero: the comparisons above can fail.
    assert float(np.max(np.abs(stats_theirs["mean"]))) > 0.2
    for label, what, _, want in pairs:
        if what == "dparams":
            assert float(np.max(np.abs(want["scale"]))) > 1e-2, label

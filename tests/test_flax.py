"""The Flax modules: jaxbn.nnx.BatchNorm and jaxbn.linen.BatchNorm against Flax's own
BatchNorm, and jaxbn.linen's converters of variables and configs (also jaxbn.interop).

Each case runs Flax's module and jaxbn's side by side on the same inputs for a few
training steps and then in evaluation, and compares the outputs, the gradients of
the input and of every parameter under a random cotangent on ``y`` (never
``sum(y)``: its gradient with respect to ``x`` is zero for batch norm), and the
updated running statistics.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from tests._op_cases import bernoulli, normal

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")
from jaxbn import interop  # noqa: E402
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
    """NumPy inputs, drawn with the seeds ``seed`` to ``seed + 3 * steps + 1``."""
    fshape = (shape[axis],)
    xs = [
        (2.0 * normal(seed + i, shape) + 0.5 + 0.3 * i).astype(precision.x_dtype)
        for i in range(steps)
    ]
    cts = [normal(seed + steps + i, shape) for i in range(steps)]
    masks = [bernoulli(seed + 2 * steps + i, 0.7, mask_shape) for i in range(steps)]
    params = {
        "scale": 1.0 + 0.5 * normal(seed + 3 * steps, fshape),
        "bias": normal(seed + 3 * steps + 1, fshape),
    }
    return xs, cts, masks, params


# --- one step of each framework as a pure function ------------------------------


class LinenDriver:
    """Runs a Linen module functionally: ``(y, grads, new_stats)`` for one call."""

    name = "linen"

    def __init__(self, cls, axis, num_features, precision, momentum, **kwargs):
        self.module = cls(axis=axis, momentum=momentum, dtype=precision.dtype, **kwargs)
        self.step = jax.jit(self._step, static_argnums=4)

    def init(self, x, params):
        variables = self.module.init(jax.random.key(0), x, use_running_average=True)
        return {"params": params, "batch_stats": dict(variables["batch_stats"])}

    def _step(self, variables, x, ct, mask, training):
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
        # JAX arrays: the variables' values are replaced, not updated with an eager .at.
        model.scale[...] = jnp.asarray(params["scale"])
        model.bias[...] = jnp.asarray(params["bias"])
        return model

    def step(self, model, x, ct, mask, training):
        return self._step(model, x, ct, mask, training)

    @staticmethod
    @nnx.jit(static_argnums=4)
    def _step(model, x, ct, mask, training):
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


def run_side_by_side(framework, case, precision, *, use_mask, steps=3, momentum=0.8, **options):
    """Trains Flax's module and jaxbn's on the same batches, then evaluates both.

    ``options`` are more arguments of both modules (an ``axis`` there replaces
    the case's, which must be the same axis). Returns the list of ``(what,
    jaxbn's, Flax's)`` results to compare, and the final running statistics of
    both.
    """
    driver_cls, flax_cls, jaxbn_cls = FRAMEWORKS[framework]
    shape, axis, mask_shape = CASES[case]
    xs, cts, masks, params = make_inputs(shape, axis, mask_shape, steps + 1, precision)
    args = (options.pop("axis", axis), shape[axis], precision, momentum)
    ours = driver_cls(jaxbn_cls, *args, **options)
    theirs = driver_cls(flax_cls, *args, **options)
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
    pairs, _, stats_theirs = run_side_by_side(framework, case, prec, use_mask=use_mask)
    for label, what, got, want in pairs:
        assert_trees_close(got, want, tol=prec.tol(what), err_msg=label)
    # The statistics moved away from their initial (0, 1), and the parameter
    # gradients are not trivially zero: the comparisons above can fail.
    assert float(np.max(np.abs(stats_theirs["mean"]))) > 0.2
    for label, what, _, want in pairs:
        if what == "dparams":
            assert float(np.max(np.abs(want["scale"]))) > 1e-2, label


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_numpy_scalars_are_numbers(framework, assert_trees_close):
    """NumPy reals work where Python numbers do (and give the same results)."""
    case, prec = "NCHW", PRECISIONS["f32"]
    numpy = dict(momentum=np.float32(0.75), epsilon=np.float64(1e-3), axis=np.int64(1))
    python = dict(momentum=0.75, epsilon=1e-3, axis=1)
    pairs_np, _, _ = run_side_by_side(framework, case, prec, use_mask=True, **numpy)
    pairs_py, _, _ = run_side_by_side(framework, case, prec, use_mask=True, **python)
    for (label, what, ours, theirs), (_, _, want, _) in zip(pairs_np, pairs_py, strict=True):
        assert_trees_close(ours, want, tol=0.0, err_msg=label)
        assert_trees_close(ours, theirs, tol=prec.tol(what), err_msg=label)  # and Flax's


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(bn_nnx.BatchNorm, nnx.BatchNorm), (bn_linen.BatchNorm, nn.BatchNorm)],
    ids=["nnx", "linen"],
)
def test_is_a_flax_batch_norm(ours, theirs):
    """Code that selects batch norms by type (to freeze them, say) finds jaxbn's."""
    assert issubclass(ours, theirs)
    if ours is bn_linen.BatchNorm:
        assert isinstance(ours(True), theirs)  # Flax's positional attribute
        assert [f.name for f in dataclasses.fields(ours)] == [
            f.name for f in dataclasses.fields(theirs)
        ]
        return
    model = NNXMLP(ours, rngs=nnx.Rngs(0))
    found = [path for path, m in nnx.iter_graph(model) if isinstance(m, theirs)]
    assert found == [("bn",)]


# --- the op underneath ----------------------------------------------------------


def _linen_train_fn(cls, x):
    module = cls(use_running_average=False)
    variables = module.init(jax.random.key(0), x)

    def f(params, x):
        y, _ = module.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return y

    return lambda x: f(variables["params"], x)


def _nnx_train_fn(cls, x):
    graphdef, state = nnx.split(cls(x.shape[-1], rngs=nnx.Rngs(0)))

    return lambda x: nnx_call(graphdef)(state, x)


def nnx_call(graphdef, **kwargs):
    """``(state, x, mask=None) -> y`` of a merged NNX module, for tracing.

    An nnx variable can be mutated only in the trace that made it: the module is
    merged from the state's plain arrays, so its variables are made in this trace.
    """

    def call(state, x, mask=None):
        return nnx.merge(graphdef, nnx.as_pure(state))(x, mask=mask, **kwargs)

    return call


@pytest.mark.parametrize(
    ("make", "ours", "theirs"),
    [
        (_linen_train_fn, bn_linen.BatchNorm, nn.BatchNorm),
        (_nnx_train_fn, bn_nnx.BatchNorm, nnx.BatchNorm),
    ],
    ids=["linen", "nnx"],
)
def test_training_runs_the_custom_vjp_op(make, ours, theirs):
    """The traced training step holds jaxbn's custom_vjp: gradients take its backward."""
    x = np.ones((4, 3), np.float32) * np.arange(4.0, dtype=np.float32)[:, None]
    assert "custom_vjp_call" in str(jax.make_jaxpr(make(ours, x))(x))
    # The negative control: Flax's module is differentiated by autodiff.
    assert "custom_vjp_call" not in str(jax.make_jaxpr(make(theirs, x))(x))


# --- dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16, jnp.float32], ids=str)
@pytest.mark.parametrize("x_dtype", [jnp.bfloat16, jnp.float32], ids=["x_bf16", "x_f32"])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16], ids=["p_f32", "p_bf16"])
def test_output_and_variable_dtypes_follow_flax(x_dtype, dtype, param_dtype, affine):
    x = (np.arange(12.0, dtype=np.float32).reshape(4, 3) % 5).astype(x_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, use_scale=affine, use_bias=affine)
    for training in (True, False):
        ours = bn_linen.BatchNorm(**kw).init_with_output(
            jax.random.key(0), x, use_running_average=not training
        )
        theirs = nn.BatchNorm(**kw).init_with_output(
            jax.random.key(0), x, use_running_average=not training
        )
        assert jax.tree.map(lambda a: a.dtype, ours) == jax.tree.map(lambda a: a.dtype, theirs)
        m_ours, m_theirs = (c(3, **kw, rngs=nnx.Rngs(0)) for c in (bn_nnx.BatchNorm, nnx.BatchNorm))
        y_ours = m_ours(x, use_running_average=not training)
        y_theirs = m_theirs(x, use_running_average=not training)
        assert y_ours.dtype == y_theirs.dtype, (training, y_ours.dtype, y_theirs.dtype)
        dtypes = lambda m: jax.tree.map(lambda a: a.dtype, nnx.state(m))  # noqa: E731
        assert dtypes(m_ours) == dtypes(m_theirs)
    # Flax's promotion, spelled out for the case the issue names.
    if x_dtype == jnp.bfloat16 and dtype is None and param_dtype == jnp.float32 and affine:
        assert y_ours.dtype == jnp.float32


# --- where jaxbn deliberately differs: the variance at large offsets ------------


@pytest.mark.parametrize("framework", ["nnx", "linen"])
def test_variance_at_large_offset_is_accurate_where_flax_default_is_not(framework):
    """Offset 1e4, std 1, float32: Flax's default E[x^2] - E[x]^2 loses the variance."""
    x = 1e4 + normal(0, (256, 4))
    truth = np.var(np.asarray(x, np.float64), axis=0)
    mom = 0.0  # the running variance is then the batch variance

    def batch_var(cls, **kw):
        if framework == "linen":
            m = cls(use_running_average=False, momentum=mom, **kw)
            v = m.init(jax.random.key(0), x)
            _, up = m.apply(v, x, mutable=["batch_stats"])
            return np.asarray(up["batch_stats"]["var"], np.float64)
        m = cls(4, momentum=mom, rngs=nnx.Rngs(0), **kw)
        m(x)
        return np.asarray(m.var[...], np.float64)

    ours_cls, theirs_cls = (
        (bn_linen.BatchNorm, nn.BatchNorm)
        if framework == "linen"
        else (bn_nnx.BatchNorm, nnx.BatchNorm)
    )
    err = lambda v: float(np.max(np.abs(v - truth) / truth))  # noqa: E731
    assert err(batch_var(ours_cls)) < 1e-4
    assert err(batch_var(theirs_cls)) > 1e-2  # the default fast variance
    assert err(batch_var(theirs_cls, use_fast_variance=False)) < 1e-4
    # use_fast_variance is accepted by jaxbn's module and changes nothing.
    np.testing.assert_array_equal(
        batch_var(ours_cls, use_fast_variance=True), batch_var(ours_cls, use_fast_variance=False)
    )


# --- masks -------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["f32", "bf16_in"])
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_full_shape_mask_equals_flax(framework, precision, assert_trees_close, monkeypatch):
    """A mask varying along the features: each feature has its own count, as in Flax."""
    prec = PRECISIONS[precision]
    # (N, C) with a full (N, C) mask, NCHW with a (N, C, 1, W) mask.
    for case, full in (("NC", (16, 5)), ("NCHW", (4, 3, 1, 6))):
        shape, axis, _ = CASES[case]
        monkeypatch.setitem(CASES, case, (shape, axis, full))
        pairs, _, _ = run_side_by_side(framework, case, prec, use_mask=True)
        for label, what, got, want in pairs:
            assert_trees_close(got, want, tol=prec.tol(what), err_msg=f"{case} {label}")


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_masks_are_checked_as_the_op_does(framework):
    x = np.ones((8, 3), np.float32) * np.arange(8.0, dtype=np.float32)[:, None]
    if framework == "linen":
        m = bn_linen.BatchNorm(use_running_average=False)
        v = m.init(jax.random.key(0), x)
        call = lambda x, mask: m.apply(v, x, mask=mask, mutable=["batch_stats"])  # noqa: E731
    else:
        graphdef, state = nnx.split(bn_nnx.BatchNorm(3, rngs=nnx.Rngs(0)))
        call = functools.partial(nnx_call(graphdef), state)
    for bad, err, match in [
        (np.ones((8, 1), np.int32), TypeError, "mask must be a boolean array, got int32"),
        (np.ones((8, 1), np.float32), TypeError, "mask must be a boolean array, got float32"),
        (np.ones((7, 1), bool), ValueError, r"mask must broadcast to x's shape \(8, 3\)"),
        (np.ones((2, 8, 1), bool), ValueError, r"got shape \(2, 8, 1\)"),
    ]:
        with pytest.raises(err, match=match):
            jax.eval_shape(call, x, bad)  # raised while tracing


def test_mask_is_ignored_in_evaluation_as_in_flax():
    x = normal(0, (8, 3)) + 2.0
    mask = (np.arange(8) < 5)[:, None]
    for ours, theirs in (
        (bn_nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))),
    ):
        ours(x)
        theirs(x)
        ours.eval()
        theirs.eval()
        np.testing.assert_allclose(ours(x, mask=mask), theirs(x, mask=mask), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(ours(x, mask=mask), ours(x))
    lin = bn_linen.BatchNorm(use_running_average=True)
    v = lin.init(jax.random.key(0), x)
    np.testing.assert_array_equal(lin.apply(v, x, mask=mask), lin.apply(v, x))


def test_all_masked_batch_keeps_the_running_statistics():
    """A deliberate difference: Flax writes NaN into its statistics here."""
    x = normal(0, (8, 3)) + 2.0
    none = np.zeros((8, 1), bool)
    ours, theirs = bn_nnx.BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    ours(x)
    before = nnx.clone(nnx.state(ours, nnx.BatchStat))
    y = ours(x, mask=none)
    assert np.all(np.isfinite(y))
    assert_eq = np.testing.assert_array_equal
    assert_eq(ours.mean[...], before["mean"][...])
    assert_eq(ours.var[...], before["var"][...])
    theirs(x, mask=none)
    assert np.all(np.isnan(theirs.mean[...]))


# --- NNX: the framework's API works unchanged ------------------------------------------


class NNXMLP(nnx.Module):
    def __init__(self, norm, *, rngs):
        self.dense1 = nnx.Linear(10, 16, use_bias=False, rngs=rngs)
        self.bn = norm(16, momentum=0.9, rngs=rngs)
        self.dense2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.dense2(nnx.relu(self.bn(self.dense1(x))))


def test_nnx_swap_in_a_model_with_optimizer_jit_train_eval(assert_trees_close):
    """The same model with either BatchNorm: same init, losses, parameters, statistics."""
    import optax

    x = normal(0, (32, 10)) * 1.5 + 0.5
    labels = np.random.default_rng(1).integers(0, 3, 32, dtype=np.int32)
    models = [NNXMLP(norm, rngs=nnx.Rngs(2)) for norm in (bn_nnx.BatchNorm, nnx.BatchNorm)]
    # Identical initialization, down to the layers after the batch norm (same key use).
    assert_trees_close(nnx.state(models[0]), nnx.state(models[1]), tol=0.0)
    assert sorted(nnx.state(models[0], nnx.BatchStat)) == ["bn"]
    assert sorted(nnx.state(models[0], nnx.BatchStat)["bn"]) == ["mean", "var"]
    opts = [nnx.Optimizer(m, optax.sgd(0.1), wrt=nnx.Param) for m in models]

    @nnx.jit
    def train_step(model, optimizer, x):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss, grads

    for i in range(3):
        for m in models:
            m.train()
        pairs = zip(models, opts, strict=True)
        (l0, g0), (l1, g1) = (train_step(m, o, x + 0.3 * i) for m, o in pairs)
        np.testing.assert_allclose(l0, l1, rtol=F32_TOL)
        assert_trees_close(g0, g1, tol=F32_TOL)
    assert_trees_close(nnx.state(models[0]), nnx.state(models[1]), tol=F32_TOL)
    for m in models:
        m.eval()
    assert_trees_close(models[0](x), models[1](x), tol=F32_TOL)
    # nnx.view and split/merge, as with Flax's module.
    view = nnx.view(models[0], use_running_average=False)
    assert view.bn.use_running_average is False and models[0].bn.use_running_average is True
    graphdef, state = nnx.split(models[0])
    assert_trees_close(nnx.merge(graphdef, state)(x), models[1](x), tol=F32_TOL)


def test_nnx_use_running_average_precedence_and_missing():
    x = np.ones((4, 2), np.float32) * np.arange(4.0, dtype=np.float32)[:, None]
    m = bn_nnx.BatchNorm(2, use_running_average=True, rngs=nnx.Rngs(0))
    m(x, use_running_average=False)  # the call argument wins, as in Flax
    assert float(m.mean[0]) > 0
    m2 = bn_nnx.BatchNorm(2, use_running_average=None, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no use_running_average was given"):
        m2(x)


def test_nnx_jaxbn_options_equal_the_layer(assert_trees_close):
    """jaxbn's extra options through NNX: extra batch statistics, the layer's numbers."""
    x = normal(0, (8, 3)) * 2.0 + 1.0
    for options in (
        dict(momentum=None, unbiased_running_var=True),
        dict(renorm=True, renorm_clipping=(2.0, 1.0)),
        dict(virtual_batch_size=4),
    ):
        m = bn_nnx.BatchNorm(3, rngs=nnx.Rngs(0), **options)
        layer = jaxbn.BatchNorm(3, **options)
        params, state = layer.init()
        for i in range(2):
            y = m(x + i)
            y_ref, state = layer.apply(params, state, x + i, training=True)
            assert_trees_close(y, y_ref, tol=F32_TOL, err_msg=str(options))
        stats = {k: v[...] for k, v in nnx.state(m, nnx.BatchStat).items()}
        assert_trees_close(stats, state, tol=F32_TOL, err_msg=str(options))


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(axis_index_groups=[[0, 1]]), ValueError, r"axis_index_groups.*got \[\[0, 1\]\]"),
        (dict(promote_dtype="float32"), TypeError, "promote_dtype must be callable"),
        (dict(epsilon=0.0), ValueError, "eps must be > 0, got 0.0"),
        (dict(epsilon=True), TypeError, "eps must be a Python float, got bool"),
        (dict(momentum=1.5), ValueError, r"momentum must be in \[0, 1\], got 1.5"),
        (dict(momentum=True), ValueError, r"momentum must be in \[0, 1\], got True"),
        (dict(dtype=jnp.int32), TypeError, "dtype must be floating or None"),
        (dict(param_dtype=jnp.int32), TypeError, "param_dtype must be floating"),
        (dict(virtual_batch_size=1), ValueError, "virtual_batch_size must be an int >= 2"),
    ],
    ids=[
        "axis_index_groups",
        "promote_dtype",
        "eps",
        "eps_bool",
        "momentum",
        "momentum_bool",
        "dtype",
        "param_dtype",
        "vbs",
    ],
)
def test_nnx_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        bn_nnx.BatchNorm(4, rngs=nnx.Rngs(0), **kwargs)


def test_nnx_bad_input_raises_while_tracing():
    graphdef, state = nnx.split(bn_nnx.BatchNorm(4, rngs=nnx.Rngs(0)))
    call = functools.partial(nnx_call(graphdef), state)
    with pytest.raises(ValueError, match=r"x has \(5,\) features.*num_features=4"):
        jax.eval_shape(call, np.ones((8, 5), np.float32))
    with pytest.raises(TypeError, match="x must have a floating-point dtype, got int32"):
        jax.eval_shape(call, np.ones((8, 4), np.int32))
    with pytest.raises(ValueError, match="expected more than 1 value per feature"):
        jax.eval_shape(call, np.ones((1, 4), np.float32))
    graphdef, state = nnx.split(bn_nnx.BatchNorm(4, axis=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="axis 2 is out of range for x of rank 2"):
        jax.eval_shape(functools.partial(nnx_call(graphdef), state), np.ones((8, 4), np.float32))


# Custom promote_dtype functions, with Flax's signature ``(args, *, dtype) -> args``.
PROMOTIONS = {
    "identity": lambda args, **kwargs: args,  # Flax's own tests pass it, to compute as Linen
    "float16": lambda args, **kwargs: tuple(
        None if a is None else jnp.asarray(a, jnp.float16) for a in args
    ),
}


@pytest.mark.parametrize("promotion", list(PROMOTIONS))
def test_nnx_custom_promote_dtype_is_applied_as_flax(promotion, assert_trees_close):
    """A custom promote_dtype sees x and the variables; the statistics update as Flax's."""
    # float16: Flax normalizes and differentiates in float16, jaxbn in float32.
    tol = 4 * float(jnp.finfo(jnp.float16).eps) if promotion == "float16" else F32_TOL
    # identity: float16 params with float32 x, as in Flax's test; float16: all cast.
    param_dtype = jnp.float16 if promotion == "identity" else jnp.float32
    x = 2.0 * normal(0, (16, 5)) + 0.5
    ct = normal(1, (16, 5))

    def loss(model, x):
        y = model(x, use_running_average=False)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    results = []
    for cls in (bn_nnx.BatchNorm, nnx.BatchNorm):
        model = cls(
            5,
            momentum=0.8,
            param_dtype=param_dtype,
            promote_dtype=PROMOTIONS[promotion],
            rngs=nnx.Rngs(0),
        )
        model.scale[...] = jnp.asarray((1.0 + 0.5 * normal(2, (5,))).astype(param_dtype))
        (_, dx), y = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
        y_eval = model(x + 1.0, use_running_average=True)
        results.append((y, dx, model.mean[...], model.var[...], y_eval))
    ours, theirs = results
    assert [v.dtype for v in ours] == [v.dtype for v in theirs]
    assert_trees_close(ours, theirs, tol=tol)
    assert float(jnp.max(jnp.abs(theirs[2]))) > 0.05  # the statistics moved


# --- Linen: the module in a model, init, axis_name ----------------------------------


class LinenMLP(nn.Module):
    """Dense -> batch norm -> relu -> Dense, with the batch norm class as a field."""

    norm: type

    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(16, use_bias=False)(x)
        x = self.norm(use_running_average=not train, momentum=0.9, name="bn")(x)
        return nn.Dense(3)(nn.relu(x))


def test_linen_swap_in_a_model_keeps_loss_and_gradients(assert_trees_close):
    x = normal(0, (32, 10)) * 1.5 + 0.5
    labels = np.random.default_rng(1).integers(0, 3, 32, dtype=np.int32)
    models = (LinenMLP(nn.BatchNorm), LinenMLP(bn_linen.BatchNorm))
    pair = [m.init(jax.random.key(2), x, train=False) for m in models]
    assert_trees_close(pair[1], pair[0], tol=0.0)

    def loss_fn(params, model, batch_stats, x):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
        return loss, updates["batch_stats"]

    @jax.jit
    def step(pair, x):
        out = []
        for model, v in zip(models, pair, strict=True):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                v["params"], model, v["batch_stats"], x
            )
            new_params = jax.tree.map(lambda p, g: p - 0.1 * g, v["params"], grads)
            out.append((loss, grads, {"params": new_params, "batch_stats": stats}))
        return out

    for i in range(3):
        (loss_f, grads_f, new_f), (loss_w, grads_w, new_w) = step(pair, x + 0.3 * i)
        np.testing.assert_allclose(loss_w, loss_f, rtol=F32_TOL)
        assert_trees_close(grads_w, grads_f, tol=F32_TOL)
        assert float(np.max(np.abs(grads_f["bn"]["scale"]))) > 1e-3
        pair = [new_f, new_w]
    assert_trees_close(pair[1], pair[0], tol=F32_TOL)
    logits = [m.apply(v, x, train=False) for m, v in zip(models, pair, strict=True)]
    assert_trees_close(logits[1], logits[0], tol=F32_TOL)


def test_linen_init_on_a_single_example_as_flax(assert_trees_close):
    """A common Flax idiom: initialize in training mode on one dummy example."""
    x = np.arange(3.0, dtype=np.float32)[None, :]
    y_f, v_f = nn.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    y_w, v_w = bn_linen.BatchNorm(use_running_average=False).init_with_output(jax.random.key(0), x)
    assert_trees_close(v_w, v_f, tol=0.0)
    assert_trees_close(y_w, y_f, tol=F32_TOL)
    np.testing.assert_array_equal(y_w, jnp.zeros((1, 3)))  # (x - mean) = 0, bias = 0
    # ... with a mask too (Flax gives the same zeros).
    module = bn_linen.BatchNorm(use_running_average=False)
    y_m, _ = module.init_with_output(jax.random.key(0), x, mask=np.ones((1, 1), bool))
    np.testing.assert_array_equal(y_m, jnp.zeros((1, 3)))


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_axis_name_matches_flax_under_vmap(framework, assert_trees_close):
    """Statistics averaged over a named (vmapped) axis, as over devices."""
    xs = 2.0 * normal(7, (4, 8, 3)) + 1.0  # 4 "devices" x 8
    ct = normal(8, xs.shape)
    _, flax_cls, ours_cls = FRAMEWORKS[framework]

    def run(cls):
        if framework == "linen":
            module = cls(use_running_average=False, axis_name="d", momentum=0.5)
            variables = module.init(jax.random.key(0), xs[0])

            def f(x, ct):
                def loss(x):
                    y, up = module.apply(variables, x, mutable=["batch_stats"])
                    return jnp.sum(y * ct), (y, up["batch_stats"])

                return jax.grad(loss, has_aux=True)(x)

            return jax.jit(jax.vmap(f, axis_name="d"))(xs, ct)  # compiled: one program
        graphdef, state = nnx.split(cls(3, axis_name="d", momentum=0.5, rngs=nnx.Rngs(0)))
        state = nnx.as_pure(state)  # arrays: merge makes the variables in each trace

        def g(x, ct, state):
            def loss(x, state):
                m = nnx.merge(graphdef, state)
                y = m(x)
                return jnp.sum(y * ct), (y, {"mean": m.mean[...], "var": m.var[...]})

            return jax.grad(loss, has_aux=True)(x, state)

        return jax.jit(jax.vmap(g, (0, 0, None), axis_name="d"))(xs, ct, state)

    (dx_o, (y_o, st_o)), (dx_t, (y_t, st_t)) = run(ours_cls), run(flax_cls)
    assert_trees_close((y_o, dx_o, st_o), (y_t, dx_t, dict(st_t)), tol=F32_TOL)
    whole = np.asarray(xs, np.float64).reshape(-1, 3)
    expected = {"mean": 0.5 * whole.mean(0), "var": 0.5 + 0.5 * whole.var(0)}
    assert_trees_close(
        dict(st_o), jax.tree.map(lambda v: np.broadcast_to(v, (4, 3)), expected), tol=F32_TOL
    )


def test_linen_use_running_average_set_once():
    x = np.ones((8, 3), np.float32) * np.arange(8.0, dtype=np.float32)[:, None]
    m = bn_linen.BatchNorm(use_running_average=True)
    v = m.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="use_running_average"):
        m.apply(v, x, use_running_average=False)
    with pytest.raises(ValueError, match="use_running_average"):
        bn_linen.BatchNorm().apply(v, x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(axis_index_groups=[[0, 1]]), r"axis_index_groups.*expected None"),
        (dict(force_float32_reductions=False), "force_float32_reductions.*expected True"),
        (dict(epsilon=-1.0), "eps must be > 0"),
        (dict(momentum=2.0), r"momentum must be in \[0, 1\]"),
        (dict(momentum=True), r"momentum must be in \[0, 1\], got True"),
        (dict(axis=3), "axis 3 is out of range for x of rank 2"),
    ],
    ids=["axis_index_groups", "float32_reductions", "eps", "momentum", "momentum_bool", "axis"],
)
def test_linen_bad_attributes_raise_while_tracing(kwargs, match):
    m = bn_linen.BatchNorm(use_running_average=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda x: m.init(jax.random.key(0), x), np.ones((8, 3), np.float32))


# --- the converters (jaxbn.linen, re-exported by jaxbn.interop) ---------------------

# (shape, axis) of the converters' cases: (N, C), NCHW, two feature axes.
CONVERTER_CASES = [
    ((16, 5), -1),
    ((4, 3, 5, 6), 1),
    ((4, 3, 5, 2), (1, 3)),
]
IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CONVERTER_CASES]


def assert_close(a, b, rtol=F32_TOL, atol=F32_TOL):
    """Compares two pytrees leaf by leaf, with the same structure, elementwise.

    Normalized outputs are O(1) with a handful of roundings each, and the running
    statistics and gradients sum over the batch; a wrong convention (momentum,
    eps, biased variance) is off by 1e-3 or more.
    """
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(
            np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


def feature_shape(shape, axis):
    axes = (axis,) if isinstance(axis, int) else axis
    return tuple(shape[a] for a in sorted(a % len(shape) for a in axes))


def random_params(seed, fshape):
    """NumPy ``{"scale", "bias"}``, drawn with the seeds ``seed`` and ``seed + 1``."""
    return {"scale": 1.0 + 0.5 * normal(seed, fshape), "bias": normal(seed + 1, fshape)}


def batches(shape, n, seed=0):
    """Batches with a per-step offset, so the running statistics keep moving.

    NumPy arrays, drawn with the seeds ``seed`` to ``seed + n - 1``.
    """
    return [2.0 * normal(seed + i, shape) + 0.5 + i for i in range(n)]


@pytest.mark.parametrize(("shape", "axis"), CONVERTER_CASES, ids=IDS)
def test_converted_layer_and_module_match_flax(shape, axis):
    """nn.BatchNorm, the converted jaxbn layer and the module: same outputs and statistics."""
    fshape = feature_shape(shape, axis)
    flax_bn = nn.BatchNorm(axis=axis, momentum=0.8, use_fast_variance=False)
    wrapper = bn_linen.BatchNorm(axis=axis, momentum=0.8)
    layer = interop.batch_norm_from_flax(flax_bn, fshape if isinstance(axis, tuple) else fshape[0])
    xs = batches(shape, 4)

    flax_vars = flax_bn.init(jax.random.key(0), xs[0], use_running_average=True)
    flax_vars = {**flax_vars, "params": random_params(10, fshape)}  # apart from xs' seeds
    wrap_vars = dict(flax_vars)
    params, state = interop.from_flax(flax_vars)

    def flax_step(module, variables, x):
        y, updates = module.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        return y, {**variables, **updates}

    flax_step = jax.jit(flax_step, static_argnums=0)
    layer_step = jax.jit(lambda p, s, x: layer.apply(p, s, x, training=True))
    for x in xs:
        y_flax, flax_vars = flax_step(flax_bn, flax_vars, x)
        y_wrap, wrap_vars = flax_step(wrapper, wrap_vars, x)
        y_layer, state = layer_step(params, state, x)
        assert_close(y_wrap, y_flax)
        assert_close(y_layer, y_flax)
    # The statistics moved far from their initial 0 and 1 (a check that can fail).
    assert np.min(np.asarray(flax_vars["batch_stats"]["mean"])) > 1.0
    assert_close(wrap_vars["batch_stats"], flax_vars["batch_stats"])
    assert_close(interop.to_flax(params, state), flax_vars)

    x_eval = xs[-1] * 0.5 - 1.0
    y_flax = flax_bn.apply(flax_vars, x_eval, use_running_average=True)
    y_wrap = wrapper.apply(wrap_vars, x_eval, use_running_average=True)
    y_layer, same_state = layer.apply(params, state, x_eval, training=False)
    assert_close(same_state, state, rtol=0, atol=0)
    assert_close(y_wrap, y_flax)
    assert_close(y_layer, y_flax)


@pytest.mark.parametrize(
    ("use_scale", "use_bias"),
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["scale-bias", "scale", "bias", "none"],
)
def test_variables_layout_and_round_trip(use_scale, use_bias):
    x = np.ones((4, 2, 3), np.float32)
    flax_bn = nn.BatchNorm(use_running_average=True, use_scale=use_scale, use_bias=use_bias)
    flax_vars = flax_bn.init(jax.random.key(0), x)
    wrap_vars = bn_linen.BatchNorm(
        use_running_average=True, use_scale=use_scale, use_bias=use_bias
    ).init(jax.random.key(0), x)
    bn = interop.batch_norm_from_flax(flax_bn, 3)
    ours = interop.to_flax(*bn.init())
    for got in (wrap_vars, ours):
        assert jax.tree.structure(got) == jax.tree.structure(flax_vars)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(flax_vars), strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)

    trained = jax.tree.map(lambda v: np.asarray(v) + normal(1, v.shape), flax_vars)
    params, state = interop.from_flax(trained)
    assert set(params) == {k for k, on in (("scale", use_scale), ("bias", use_bias)) if on}
    assert jax.tree.structure(interop.to_flax(params, state)) == jax.tree.structure(trained)
    assert_close(interop.to_flax(params, state), trained, rtol=0, atol=0)
    again = interop.from_flax(interop.to_flax(params, state))
    assert_close(again, (params, state), rtol=0, atol=0)


def test_config_translation_both_ways():
    flax_bn = nn.BatchNorm(
        axis=1,
        momentum=0.9,
        epsilon=1e-3,
        use_scale=False,
        use_bias=True,
        axis_name="batch",
        param_dtype=jnp.float64,
        # Accepted: constant initializers equal to the defaults, built anew.
        scale_init=nn.initializers.ones_init(),
        bias_init=nn.initializers.zeros_init(),
    )
    bn = interop.batch_norm_from_flax(flax_bn, 7)
    assert bn == jaxbn.BatchNorm(
        7,
        axis=1,
        momentum=0.9,
        eps=1e-3,
        use_scale=False,
        use_bias=True,
        axis_name="batch",
        param_dtype=jnp.float64,
    )
    back = interop.to_flax_module(bn)
    assert isinstance(back, nn.BatchNorm)
    for name in ("axis", "momentum", "use_scale", "use_bias", "axis_name", "param_dtype"):
        assert getattr(back, name) == getattr(flax_bn, name), name
    assert back.epsilon == 1e-3
    assert back.use_fast_variance is False
    assert back.use_running_average is None
    assert interop.batch_norm_from_flax(back, 7) == bn
    # Both libraries' defaults agree.
    assert interop.batch_norm_from_flax(nn.BatchNorm(), 5) == jaxbn.BatchNorm(5)
    assert interop.batch_norm_from_flax(nn.BatchNorm(axis=[1, 2]), (2, 3)).axis == (1, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(axis_index_groups=[[0, 1]]), r"axis_index_groups.*expected None, got \[\[0, 1\]\]"),
        (dict(force_float32_reductions=False), "force_float32_reductions.*expected True"),
        (dict(scale_init=nn.initializers.normal()), "scale_init must be the default"),
        (dict(bias_init=nn.initializers.constant(0.5)), "bias_init must be the default"),
        (dict(momentum=1.5), r"momentum must be in \[0, 1\], got 1.5"),
    ],
    ids=["axis_index_groups", "float32_reductions", "scale_init", "bias_init", "momentum"],
)
def test_unsupported_flax_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.batch_norm_from_flax(nn.BatchNorm(**kwargs), 4)


def test_converters_reject_bad_input():
    with pytest.raises(TypeError, match=r"module must be a flax\.linen\.BatchNorm, got LayerNorm"):
        interop.batch_norm_from_flax(nn.LayerNorm(), 4)
    with pytest.raises(TypeError, match=r"bn must be a jaxbn\.BatchNorm, got BatchNorm"):
        interop.to_flax_module(nn.BatchNorm())
    params, state = jaxbn.BatchNorm(3).init()
    with pytest.raises(ValueError, match=r"state must hold the keys \['mean', 'var'\].*\['var'\]"):
        interop.to_flax(params, {"mean": state["mean"]})
    with pytest.raises(ValueError, match=r"params may only hold.*extra keys \['gamma'\]"):
        interop.to_flax({"gamma": params["scale"]}, state)
    with pytest.raises(ValueError, match=r'share one shape.*params\["bias"\]: \(4,\)'):
        interop.to_flax({**params, "bias": jnp.zeros(4)}, state)
    variables = interop.to_flax(params, state)
    with pytest.raises(ValueError, match=r"variables must hold the keys \['batch_stats'\]"):
        interop.from_flax({"params": variables["params"]})
    with pytest.raises(ValueError, match=r"variables may only hold.*extra keys \['cache'\]"):
        interop.from_flax({**variables, "cache": {}})
    with pytest.raises(ValueError, match=r'share one shape.*batch_stats"\]\["var"\]: \(2, 3\)'):
        interop.from_flax(
            {**variables, "batch_stats": {"mean": state["mean"], "var": jnp.ones((2, 3))}}
        )
    with pytest.raises(TypeError, match=r'variables\["batch_stats"\] must be a dict, got list'):
        interop.from_flax({"batch_stats": [1, 2]})


def test_dtype_maps_both_ways():
    flax_bn = nn.BatchNorm(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    bn = interop.batch_norm_from_flax(flax_bn, 4)
    assert bn.dtype == jnp.bfloat16 and bn.param_dtype == jnp.float32
    back = interop.to_flax_module(bn)
    assert back.dtype == jnp.bfloat16
    # And the output dtypes agree where both have the dtype set.
    x = np.ones((4, 4), np.float32) * np.arange(4.0, dtype=np.float32)[:, None]
    params, state = bn.init()
    y_bn, _ = bn.apply(params, state, x, training=True)
    y_flax, _ = back.apply(interop.to_flax(params, state), x, False, mutable=["batch_stats"])
    assert y_bn.dtype == y_flax.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(momentum=None), r"cannot express momentum=None: expected a float"),
        (dict(unbiased_running_var=True), r"cannot express unbiased_running_var=True"),
        (dict(virtual_batch_size=4), r"cannot express virtual_batch_size=4: expected None"),
        (dict(renorm=True), r"cannot express renorm=True: expected False"),
        (dict(debias=True), r"cannot express debias=True: expected False"),
        (dict(frozen=True), r"cannot express frozen=True: expected False"),
        (dict(activation="elu"), r"cannot express activation='elu': expected None"),
    ],
    ids=["cumulative", "unbiased", "ghost", "renorm", "debias", "frozen", "activation"],
)
def test_to_flax_module_refuses_what_flax_cannot_express(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.to_flax_module(jaxbn.BatchNorm(4, **kwargs))


def test_converters_refuse_non_floating_arrays():
    params, state = jaxbn.BatchNorm(3).init()
    with pytest.raises(
        TypeError, match=r'state\["mean"\] must have a floating-point dtype, got int32'
    ):
        interop.to_flax(params, {**state, "mean": jnp.zeros(3, jnp.int32)})
    with pytest.raises(
        TypeError, match=r'params\["scale"\] must have a floating-point dtype, got bool'
    ):
        interop.to_flax({**params, "scale": jnp.ones(3, bool)}, state)
    variables = interop.to_flax(params, state)
    bad = {**variables, "batch_stats": {**variables["batch_stats"], "var": jnp.ones(3, jnp.int8)}}
    with pytest.raises(TypeError, match=r'\["batch_stats"\]\["var"\] must have a floating-point'):
        interop.from_flax(bad)


def test_interop_is_the_linen_converters():
    for name in ("to_flax", "from_flax", "batch_norm_from_flax", "to_flax_module"):
        assert getattr(interop, name) is getattr(bn_linen, name)
    # Only the converters: the Linen module is jaxbn.linen.BatchNorm.
    assert not hasattr(interop, "FlaxBatchNorm")

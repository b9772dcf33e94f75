"""Folding batch norm into the preceding dense layer or convolution: same outputs, clear errors.

The models' own ``fold`` is tested with each model (tests/test_mlp.py, tests/test_cnn.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxbn
from jaxbn.fold import fold_into_conv, fold_into_dense
from tests._op_cases import normal, ones

IN, OUT, BATCH = 64, 24, 32
EPS = 1e-3
# Allowed error, in units of the dtype's unit roundoff, of the sum of magnitudes
# computed in ``exact_and_bound``. The matmul's rounding errors add up like a random
# walk, hence its sqrt(in_features) factor; 2 leaves room for the few roundings on
# top (measured: under 0.5 in float32).
ULPS = 2


def make_layers(seed, *, dense_bias, use_scale, use_bias, mean_offset=3.0, dtype=np.float32):
    """Random dense params and batch-norm params/state with non-trivial values.

    NumPy arrays of ``dtype``, each drawn with its own seed (``10 * seed`` to
    ``10 * seed + 6``): the same values whichever of them the config asks for.
    """
    s = 10 * seed
    dense = {"kernel": normal(s, (IN, OUT), dtype) / IN**0.5}
    if dense_bias:
        dense["bias"] = normal(s + 1, (OUT,), dtype)
    bn_params = {}
    if use_scale:
        bn_params["scale"] = 1.0 + 0.5 * normal(s + 2, (OUT,), dtype)
    if use_bias:
        bn_params["bias"] = normal(s + 3, (OUT,), dtype)
    bn_state = {
        "mean": mean_offset + normal(s + 4, (OUT,), dtype),
        "var": np.exp(normal(s + 5, (OUT,), dtype)),
    }
    x = normal(s + 6, (BATCH, IN), dtype) + 1.0
    return x, dense, bn_params, bn_state


def unfolded(x, dense, bn_params, bn_state, eps):
    """Dense then evaluation-mode batch norm, as the network runs them."""
    z = x @ dense["kernel"]
    if "bias" in dense:
        z = z + dense["bias"]
    return jaxbn.batch_norm_inference(
        z,
        bn_params.get("scale"),
        bn_params.get("bias"),
        bn_state["mean"],
        bn_state["var"],
        eps=eps,
    )


def exact_and_bound(x, dense, bn_params, bn_state, eps, dtype):
    """The two layers in float64 numpy, and a rounding-error bound for ``dtype``."""
    f64 = functools.partial(np.asarray, dtype=np.float64)
    kernel = f64(dense["kernel"])
    b = f64(dense.get("bias", np.zeros(OUT)))
    gamma = f64(bn_params.get("scale", np.ones(OUT)))
    beta = f64(bn_params.get("bias", np.zeros(OUT)))
    mean, var = f64(bn_state["mean"]), f64(bn_state["var"])
    a = gamma / np.sqrt(var + eps)
    xn = f64(x)
    exact = (xn @ kernel + b - mean) * a + beta
    unit = float(jnp.finfo(dtype).eps) / 2
    terms = (
        np.sqrt(IN) * (np.abs(xn) @ np.abs(kernel)) * np.abs(a)
        + np.abs((b - mean) * a)
        + np.abs(beta)
        + np.abs(exact)
    )
    return exact, ULPS * unit * terms


def assert_within(got, exact, bound, what):
    err = np.abs(np.asarray(got, np.float64) - exact)
    worst = np.max(err / bound)
    assert worst <= 1.0, f"{what}: error reaches {worst:.2f} times the rounding bound"


CONFIGS = [
    dict(dense_bias=False, use_scale=True, use_bias=True),
    dict(dense_bias=True, use_scale=True, use_bias=True),
    dict(dense_bias=False, use_scale=False, use_bias=True),
    dict(dense_bias=False, use_scale=True, use_bias=False),
    dict(dense_bias=True, use_scale=False, use_bias=False),
]
IDS = [
    "-".join(f"{'' if v else 'no_'}{k}" for k, v in c.items()).replace("use_", "") for c in CONFIGS
]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fold_matches_dense_then_batch_norm(config):
    x, dense, bn_params, bn_state = make_layers(0, **config)
    folded = fold_into_dense(dense, bn_params, bn_state, eps=EPS)
    assert set(folded) == {"kernel", "bias"}
    assert folded["kernel"].shape == (IN, OUT) and folded["bias"].shape == (OUT,)
    assert folded["kernel"].dtype == folded["bias"].dtype == jnp.float32
    got = x @ folded["kernel"] + folded["bias"]
    want = unfolded(x, dense, bn_params, bn_state, EPS)
    exact, bound = exact_and_bound(x, dense, bn_params, bn_state, EPS, jnp.float32)
    assert_within(got, exact, bound, "folded")
    assert_within(want, exact, bound, "unfolded")
    assert_within(got, np.asarray(want, np.float64), 2 * bound, "folded vs unfolded")


def test_fold_after_training_steps():
    """Running statistics and params moved by real training steps, then folded."""
    x, dense, _, _ = make_layers(1, dense_bias=False, use_scale=True, use_bias=True)
    bn = jaxbn.BatchNorm(OUT, momentum=0.5, eps=EPS)
    bn_params, bn_state = bn.init()
    params = {"dense": dense, "bn": bn_params}
    target = normal(2, (BATCH, OUT))

    def loss_fn(params, state, x):
        y, state = bn.apply(params["bn"], state, x @ params["dense"]["kernel"], training=True)
        return jnp.mean((y - target) ** 2), state

    @jax.jit
    def step(params, state, x):
        grads, state = jax.grad(loss_fn, has_aux=True)(params, state, x)
        return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), state

    for i in range(6):
        xi = 2.0 * normal(20 + i, (BATCH, IN)) + 3.0
        params, bn_state = step(params, bn_state, xi)
    # The statistics are far from their initial 0 and 1, and scale/bias moved.
    assert np.max(np.abs(np.asarray(bn_state["mean"]))) > 0.5
    assert np.max(np.abs(np.asarray(bn_state["var"]) - 1.0)) > 0.5
    assert np.max(np.abs(np.asarray(params["bn"]["scale"]) - 1.0)) > 1e-2

    folded = fold_into_dense(params["dense"], params["bn"], bn_state, eps=bn.eps)
    x_eval = 2.0 * x + 2.0
    got = x_eval @ folded["kernel"] + folded["bias"]
    want, _ = bn.apply(params["bn"], bn_state, x_eval @ params["dense"]["kernel"], training=False)
    exact, bound = exact_and_bound(
        x_eval, params["dense"], params["bn"], bn_state, bn.eps, jnp.float32
    )
    assert_within(got, exact, bound, "folded")
    assert_within(got, np.asarray(want, np.float64), 2 * bound, "folded vs layer.apply")


def test_bfloat16_kernel_is_folded_in_float32_and_cast_back():
    x, dense, bn_params, bn_state = make_layers(3, dense_bias=True, use_scale=True, use_bias=True)
    dense16 = jax.tree.map(lambda v: v.astype(jnp.bfloat16), dense)
    folded = fold_into_dense(dense16, bn_params, bn_state, eps=EPS)
    assert folded["kernel"].dtype == folded["bias"].dtype == jnp.bfloat16
    # Each folded entry is the float32 fold rounded once to bfloat16: within half
    # a bfloat16 ulp of the float64 fold of the same (bfloat16) inputs.
    a = np.asarray(bn_params["scale"], np.float64) / np.sqrt(
        np.asarray(bn_state["var"], np.float64) + EPS
    )
    kernel64 = np.asarray(dense16["kernel"], np.float64) * a
    half_ulp = float(jnp.finfo(jnp.bfloat16).eps) / 2 * np.abs(kernel64)
    np.testing.assert_array_less(
        np.abs(np.asarray(folded["kernel"], np.float64) - kernel64), half_ulp * 1.01
    )
    got = x.astype(jnp.bfloat16) @ folded["kernel"] + folded["bias"]
    exact, bound = exact_and_bound(
        x.astype(jnp.bfloat16), dense16, bn_params, bn_state, EPS, jnp.bfloat16
    )
    assert_within(got, exact, bound, "folded bfloat16")


def test_float64_fold_is_computed_in_float64():
    with jax.enable_x64(True):
        x, dense, bn_params, bn_state = make_layers(
            4, dense_bias=True, use_scale=True, use_bias=True, dtype=np.float64
        )
        folded = fold_into_dense(dense, bn_params, bn_state, eps=EPS)
        assert folded["kernel"].dtype == jnp.float64
        got = x @ folded["kernel"] + folded["bias"]
        exact, bound = exact_and_bound(x, dense, bn_params, bn_state, EPS, jnp.float64)
        assert_within(got, exact, bound, "folded float64")


def test_fold_under_jit():
    x, dense, bn_params, bn_state = make_layers(5, dense_bias=False, use_scale=True, use_bias=True)
    fold = jax.jit(functools.partial(fold_into_dense, eps=EPS))
    folded = fold(dense, bn_params, bn_state)
    eager = fold_into_dense(dense, bn_params, bn_state, eps=EPS)
    exact, bound = exact_and_bound(x, dense, bn_params, bn_state, EPS, jnp.float32)
    assert_within(x @ folded["kernel"] + folded["bias"], exact, bound, "jit")
    assert_within(x @ eager["kernel"] + eager["bias"], exact, bound, "eager")


def test_eps_is_used():
    """A different eps changes the fold (it is not silently ignored)."""
    _, dense, bn_params, bn_state = make_layers(6, dense_bias=False, use_scale=True, use_bias=True)
    bn_state = {"mean": bn_state["mean"], "var": np.full((OUT,), 0.01, np.float32)}
    small = fold_into_dense(dense, bn_params, bn_state, eps=1e-5)
    large = fold_into_dense(dense, bn_params, bn_state, eps=0.03)
    # a = gamma / sqrt(var + eps): the ratio of the kernels is sqrt(0.04 / 0.01001).
    ratio = np.asarray(small["kernel"]) / np.asarray(large["kernel"])
    np.testing.assert_allclose(ratio, np.sqrt(0.04 / 0.01001), rtol=1e-5)


def good_args():
    _, dense, bn_params, bn_state = make_layers(7, dense_bias=True, use_scale=True, use_bias=True)
    return dense, bn_params, bn_state


def replaced(tree, key, value):
    out = dict(tree)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


BAD = [
    (0, "kernel", ones((IN,)), ValueError, r'dense_params\["kernel"\].*\(64,\)'),
    (0, "kernel", ones((2, IN, OUT)), ValueError, r'dense_params\["kernel"\].*\(2, 64, 24\)'),
    (0, "kernel", ones((IN, OUT), np.int32), TypeError, r'dense_params\["kernel"\].*int32'),
    (0, "kernel", None, ValueError, r"dense_params must hold the keys \['kernel'\]"),
    (0, "bias", ones((OUT + 1,)), ValueError, r'dense_params\["bias"\].*\(24,\).*\(25,\)'),
    (0, "weights", ones((OUT,)), ValueError, r"dense_params.*extra keys \['weights'\]"),
    (1, "scale", ones((OUT, 1)), ValueError, r'bn_params\["scale"\].*\(24,\).*\(24, 1\)'),
    (1, "bias", ones((3,)), ValueError, r'bn_params\["bias"\].*\(24,\).*\(3,\)'),
    (2, "mean", ones((OUT - 1,)), ValueError, r'bn_state\["mean"\].*\(24,\).*\(23,\)'),
    (2, "var", ones(()), ValueError, r'bn_state\["var"\].*\(24,\).*\(\)'),
    (2, "var", None, ValueError, r"bn_state must hold the keys \['mean', 'var'\].*\['var'\]"),
    (2, "mean", ones((OUT,), np.int32), TypeError, r'bn_state\["mean"\].*int32'),
]


@pytest.mark.parametrize(
    ("which", "key", "value", "error", "match"),
    BAD,
    ids=[f"{['dense', 'bn_params', 'bn_state'][w]}-{k}-{i}" for i, (w, k, *_) in enumerate(BAD)],
)
def test_bad_arguments(which, key, value, error, match):
    args = list(good_args())
    args[which] = replaced(args[which], key, value)
    with pytest.raises(error, match=match):
        fold_into_dense(*args, eps=EPS)


@pytest.mark.parametrize(
    ("eps", "error"), [(0.0, ValueError), (-1e-5, ValueError), ("1", TypeError)]
)
def test_bad_eps(eps, error):
    with pytest.raises(error, match="eps"):
        fold_into_dense(*good_args(), eps=eps)


def test_not_a_dict():
    dense, bn_params, _ = good_args()
    with pytest.raises(TypeError, match="bn_state must be a dict, got tuple"):
        fold_into_dense(dense, bn_params, (1.0, 2.0), eps=EPS)


@pytest.mark.parametrize(
    "options", [{"momentum": None}, {"renorm": True}], ids=["cumulative", "renorm"]
)
def test_fold_ignores_extra_state_entries(options):
    bn = jaxbn.BatchNorm(4, **options)
    params, state = bn.init()
    x = normal(0, (16, 4)) * 2 + 1
    _, state = bn.apply(params, state, x, training=True)
    kernel = normal(1, (3, 4))
    folded = fold_into_dense({"kernel": kernel}, params, state, eps=bn.eps)
    h = normal(2, (5, 3))
    want = bn.apply(params, state, h @ kernel, training=False)[0]
    np.testing.assert_allclose(h @ folded["kernel"] + folded["bias"], want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- convolutions

C_IN, C_OUT = 3, 5


def make_conv_layers(seed, *, conv_bias, use_scale=True, use_bias=True, dtype=jnp.float32):
    """A random HWIO kernel, batch-norm params/state and NHWC images (NumPy arrays).

    Each drawn with its own seed, ``10 * seed`` to ``10 * seed + 6``.
    """
    s = 10 * seed
    conv = {"kernel": (normal(s, (3, 3, C_IN, C_OUT)) / 3).astype(dtype)}
    if conv_bias:
        conv["bias"] = normal(s + 1, (C_OUT,)).astype(dtype)
    bn_params = {}
    if use_scale:
        bn_params["scale"] = 1.0 + 0.5 * normal(s + 2, (C_OUT,))
    if use_bias:
        bn_params["bias"] = normal(s + 3, (C_OUT,))
    bn_state = {
        "mean": 2.0 + normal(s + 4, (C_OUT,)),
        "var": np.exp(normal(s + 5, (C_OUT,))),
    }
    x = normal(s + 6, (4, 6, 7, C_IN)) + 0.5
    return x, conv, bn_params, bn_state


def conv_layer(x, conv, data_format):
    y = lax.conv_general_dilated(
        x, conv["kernel"], (1, 1), "SAME", dimension_numbers=(data_format, "HWIO", data_format)
    )
    if "bias" in conv:
        y = y + (conv["bias"] if data_format == "NHWC" else conv["bias"][:, None, None])
    return y


CONV_CASES = [(0, "NHWC"), (1, "NCHW"), (2, "NHWC")]


@pytest.mark.parametrize(
    ("config", "data_format"),
    [(CONFIGS[i], f) for i, f in CONV_CASES],
    ids=[f"{IDS[i]}-{f}" for i, f in CONV_CASES],
)
def test_fold_into_conv_matches_conv_then_batch_norm(config, data_format):
    config = {("conv_bias" if k == "dense_bias" else k): v for k, v in config.items()}
    x, conv, bn_params, bn_state = make_conv_layers(10, **config)
    if data_format == "NCHW":
        x = np.moveaxis(x, -1, 1)
    folded = fold_into_conv(conv, bn_params, bn_state, eps=EPS)
    assert folded["kernel"].shape == conv["kernel"].shape and folded["bias"].shape == (C_OUT,)
    got = conv_layer(x, folded, data_format)
    want = jaxbn.batch_norm_inference(
        conv_layer(x, conv, data_format),
        bn_params.get("scale"),
        bn_params.get("bias"),
        bn_state["mean"],
        bn_state["var"],
        axis=-1 if data_format == "NHWC" else 1,
        eps=EPS,
    )
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_fold_into_conv_float64_formula():
    """Every output channel's kernel slice is scaled by a = gamma / sqrt(var + eps)."""
    _, conv, bn_params, bn_state = make_conv_layers(11, conv_bias=True)
    folded = fold_into_conv(conv, bn_params, bn_state, eps=EPS)
    f64 = functools.partial(np.asarray, dtype=np.float64)
    a = f64(bn_params["scale"]) / np.sqrt(f64(bn_state["var"]) + EPS)
    np.testing.assert_allclose(folded["kernel"], f64(conv["kernel"]) * a, rtol=1e-6)
    bias = (f64(conv["bias"]) - f64(bn_state["mean"])) * a + f64(bn_params["bias"])
    np.testing.assert_allclose(folded["bias"], bias, rtol=1e-6, atol=1e-6)


def test_fold_into_conv_bfloat16_is_rounded_once():
    _, conv, bn_params, bn_state = make_conv_layers(12, conv_bias=False, dtype=jnp.bfloat16)
    folded = fold_into_conv(conv, bn_params, bn_state, eps=EPS)
    assert folded["kernel"].dtype == folded["bias"].dtype == jnp.bfloat16
    a = np.asarray(bn_params["scale"], np.float64) / np.sqrt(
        np.asarray(bn_state["var"], np.float64) + EPS
    )
    exact = np.asarray(conv["kernel"], np.float64) * a
    # One rounding to bfloat16 (relative error <= 2^-8) of the float32 product.
    np.testing.assert_allclose(np.asarray(folded["kernel"], np.float64), exact, rtol=2**-8)


@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_into_conv_matches_pytorch(conv_bias):
    """The same numbers through ``torch.nn.utils.fusion.fuse_conv_bn_eval``."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    _, conv, bn_params, bn_state = make_conv_layers(13, conv_bias=conv_bias)
    t_conv = torch.nn.Conv2d(C_IN, C_OUT, 3, padding=1, bias=conv_bias).double().eval()
    t_bn = torch.nn.BatchNorm2d(C_OUT, eps=EPS).double().eval()

    def t(v):
        return torch.from_numpy(np.array(v, np.float64))

    with torch.no_grad():
        t_conv.weight.copy_(t(conv["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
        if conv_bias:
            t_conv.bias.copy_(t(conv["bias"]))
        t_bn.weight.copy_(t(bn_params["scale"]))
        t_bn.bias.copy_(t(bn_params["bias"]))
        t_bn.running_mean.copy_(t(bn_state["mean"]))
        t_bn.running_var.copy_(t(bn_state["var"]))
    fused = fuse_conv_bn_eval(t_conv, t_bn)
    want_kernel = fused.weight.detach().permute(2, 3, 1, 0).numpy()  # OIHW -> HWIO
    want_bias = fused.bias.detach().numpy()
    got = fold_into_conv(conv, bn_params, bn_state, eps=EPS)
    np.testing.assert_allclose(got["kernel"], want_kernel, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["bias"], want_bias, rtol=1e-6, atol=1e-6)


def conv_good_args():
    _, conv, bn_params, bn_state = make_conv_layers(14, conv_bias=True)
    return conv, bn_params, bn_state


CONV_BAD = [
    (0, "kernel", ones((C_IN, C_OUT)), ValueError, r'conv_params\["kernel"\].*\[\*spatial'),
    (
        0,
        "kernel",
        ones((C_OUT, C_IN, 3, 3)),  # PyTorch's OIHW
        ValueError,
        r"must have shape \(3,\) \(the kernel's output features, its last axis.*"
        r"\(5, 3, 3, 3\)\), got \(5,\)",
    ),
    (0, "kernel", ones((3, 3, C_IN, C_OUT), np.int32), TypeError, "floating-point"),
    (0, "bias", ones((C_OUT + 2,)), ValueError, r'conv_params\["bias"\].*\(5,\).*\(7,\)'),
    (2, "mean", ones((C_OUT - 1,)), ValueError, r'bn_state\["mean"\].*\(5,\).*\(4,\)'),
    (2, "var", ones((C_OUT, 1)), ValueError, r'bn_state\["var"\].*\(5,\).*\(5, 1\)'),
    (1, "bias", ones((1,)), ValueError, r'bn_params\["bias"\].*\(5,\).*\(1,\)'),
    (0, "weight", ones((C_OUT,)), ValueError, r"conv_params.*extra keys \['weight'\]"),
]


@pytest.mark.parametrize(
    ("which", "key", "value", "error", "match"),
    CONV_BAD,
    ids=[
        f"{['conv', 'bn_params', 'bn_state'][w]}-{k}-{i}" for i, (w, k, *_) in enumerate(CONV_BAD)
    ],
)
def test_fold_into_conv_bad_arguments(which, key, value, error, match):
    args = list(conv_good_args())
    args[which] = replaced(args[which], key, value)
    with pytest.raises(error, match=match):
        jax.eval_shape(functools.partial(fold_into_conv, eps=EPS), *args)

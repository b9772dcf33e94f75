"""The CNN and its convolution: values, gradients, layouts, training, errors.

The oracle for gradients is an independent forward written here with
``lax.conv_general_dilated`` (differentiated by JAX's own rules) and
:func:`jaxbn.reference.batch_norm`, on the CNN's params layout.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference
from jaxbn.cnn import CNN, conv
from jaxbn.train import cross_entropy, evaluate, fit, make_train_step
from tests._op_cases import normal, ones

# Relative tolerance (to the largest magnitude) per dtype, for sums of a few
# hundred products.
TOL = {jnp.float32: 2e-5, jnp.float64: 1e-12, jnp.bfloat16: 3e-2}


def close(got, want, dtype=jnp.float32):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(float(np.max(np.abs(want))), 1e-30)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


def tree_close(got, want, dtype=jnp.float32):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        close(a, b, dtype)


def lax_conv(x, kernel, strides, padding, data_format="NHWC"):
    one_axis = x.ndim == 3
    dims = ("NWC", "WIO", "NWC") if one_axis else (data_format, "HWIO", data_format)
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=dims)


# --------------------------------------------------------------------------- conv

CONV_CASES = [
    # (x shape NHWC, kernel shape, strides, padding)
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), "SAME"),
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 2), "SAME"),
    ((3, 9, 8, 2), (3, 2, 2, 4), (2, 3), "VALID"),
    ((2, 7, 7, 4), (5, 5, 4, 3), (3, 1), ((2, 1), (0, 3))),
    ((4, 10, 3), (5, 3, 4), (3,), "SAME"),  # one spatial axis
]
CONV_IDS = [
    f"{'x'.join(map(str, c[0]))}_k{c[1][0]}_s{'x'.join(map(str, c[2]))}" for c in CONV_CASES
]


def conv_inputs(case, dtype, data_format="NHWC"):
    shape, kshape, strides, padding = case
    x, kernel = normal(0, shape, dtype), normal(1, kshape, dtype)
    if data_format == "NCHW":
        x = np.moveaxis(x, -1, 1)
    return x, kernel, strides, padding


# (case, dtype, data_format): every case in float32, the other dtypes and NCHW
# on the strided ones.
VJP_CASES = [(i, jnp.float32, "NHWC") for i in range(len(CONV_CASES))] + [
    (3, jnp.float64, "NHWC"),
    (1, jnp.float32, "NCHW"),
    (3, jnp.bfloat16, "NCHW"),
]


@pytest.mark.parametrize(
    ("case", "dtype", "data_format"),
    [(CONV_CASES[i], d, f) for i, d, f in VJP_CASES],
    ids=[f"{CONV_IDS[i]}-{jnp.dtype(d).name}-{f}" for i, d, f in VJP_CASES],
)
def test_conv_values_and_vjp_match_lax(case, dtype, data_format):
    """Outputs and both cotangents equal autodiff of lax.conv_general_dilated."""
    with jax.enable_x64(dtype == jnp.float64):
        x, kernel, strides, padding = conv_inputs(case, dtype, data_format)
        ours = functools.partial(conv, strides=strides, padding=padding, data_format=data_format)
        theirs = functools.partial(
            lax_conv, strides=strides, padding=padding, data_format=data_format
        )
        y_shape = jax.eval_shape(ours, x, kernel).shape
        dy = normal(2, y_shape, dtype)

        @functools.partial(jax.jit, static_argnums=0)  # one compile, not op by op
        def values_and_vjp(fn, x, kernel, dy):
            y, vjp = jax.vjp(fn, x, kernel)
            return y, vjp(dy)

        y, (dx, dkernel) = values_and_vjp(ours, x, kernel, dy)
        y_ref, (dx_ref, dkernel_ref) = values_and_vjp(theirs, x, kernel, dy)
        assert y.dtype == y_ref.dtype == dtype
        close(y, y_ref, dtype)
        assert dx.dtype == dkernel.dtype == dtype
        assert float(jnp.max(jnp.abs(dkernel))) > 0
        close(dx, dx_ref, dtype)
        close(dkernel, dkernel_ref, dtype)


@pytest.mark.parametrize("case", CONV_CASES[1:4], ids=CONV_IDS[1:4])
def test_conv_vjp_against_float64_numpy(case):
    """The gradients against a direct float64 NumPy sum over the windows."""
    x, kernel, strides, padding = conv_inputs(case, jnp.float32)
    y, vjp = jax.vjp(functools.partial(conv, strides=strides, padding=padding), x, kernel)
    dy = normal(3, y.shape)
    dx, dkernel = vjp(dy)
    xn, kn, dyn = (np.asarray(a, np.float64) for a in (x, kernel, dy))
    kh, kw = kn.shape[:2]
    if padding == "SAME":
        pads = [
            (t // 2, t - t // 2)
            for t in (
                max((-(-n // s) - 1) * s + k - n, 0)
                for n, k, s in zip(xn.shape[1:3], (kh, kw), strides, strict=True)
            )
        ]
    elif padding == "VALID":
        pads = [(0, 0), (0, 0)]
    else:
        pads = list(padding)
    xp = np.pad(xn, [(0, 0), *pads, (0, 0)])
    dxp = np.zeros_like(xp)
    dk = np.zeros_like(kn)
    oh, ow = dyn.shape[1:3]
    for o1 in range(oh):
        for o2 in range(ow):
            r, c = o1 * strides[0], o2 * strides[1]
            window = xp[:, r : r + kh, c : c + kw, :]  # [N, kh, kw, in]
            g = dyn[:, o1, o2, :]  # [N, out]
            dk += np.einsum("nhwi,no->hwio", window, g)
            dxp[:, r : r + kh, c : c + kw, :] += np.einsum("no,hwio->nhwi", g, kn)
    h, w = xn.shape[1:3]
    dx_want = dxp[:, pads[0][0] : pads[0][0] + h, pads[1][0] : pads[1][0] + w, :]
    close(dx, dx_want)
    close(dkernel, dk)


def test_conv_check_grads_order_2():
    """Strided, with asymmetric explicit padding: the case with the most index arithmetic."""
    with jax.enable_x64(True):
        x, kernel, strides, padding = conv_inputs(CONV_CASES[3], jnp.float64)
        x, kernel = x[:1, ..., :2], kernel[..., :2, :2]
        fn = functools.partial(conv, strides=strides, padding=padding)
        check_grads(jax.jit(fn), (x, kernel), order=2, modes=["rev"])


def test_conv_under_vmap():
    x, kernel, strides, padding = conv_inputs(CONV_CASES[1], jnp.float32)
    fn = functools.partial(conv, strides=strides, padding=padding)
    kernels = np.stack([kernel, 2 * kernel + 1])
    got = jax.vmap(lambda k: fn(x, k))(kernels)
    close(got[1], lax_conv(x, kernels[1], strides, padding))


def _conv_forms(hlo: str) -> list[str]:
    return re.findall(r"convolution\([^)]*\).*?dim_labels=([^,\s]+)", hlo)


def _scanned_grad_hlo(conv_fn):
    x, kernel, strides, padding = conv_inputs(CONV_CASES[0], jnp.float32)
    dys = normal(4, (3, 2, 8, 8, 5))

    def body(k, dy):
        _, vjp = jax.vjp(lambda k: conv_fn(x, k, strides, padding), k)
        return k - 0.1 * vjp(dy)[0], None

    loop = jax.jit(lambda k: lax.scan(body, k, dys)[0])
    return loop.lower(kernel).compile().as_text()


def test_gradient_convolutions_are_canonical_inside_scan():
    """Inside a scan every convolution of the backward is in XLA:CPU's fast layout.

    XLA:CPU brings convolutions to the canonical ``b01f_01io->b01f`` form (the
    one its convolution library runs) only in a program's entry computation;
    autodiff of lax.conv_general_dilated inside a loop body keeps permuted
    forms (the negative control), which run as a naive loop nest.
    """
    if jax.default_backend() != "cpu":
        pytest.skip("a property of the CPU compiler")
    ours = _conv_forms(_scanned_grad_hlo(lambda x, k, s, p: conv(x, k, strides=s, padding=p)))
    assert ours and set(ours) == {"b01f_01io->b01f"}, ours
    autodiff = _conv_forms(_scanned_grad_hlo(lax_conv))
    assert set(autodiff) != {"b01f_01io->b01f"}, autodiff


CONV_BAD = [
    (dict(x=ones((2, 8, 8, 3)), kernel=ones((3, 3, 4, 5))), ValueError, "4 input channels"),
    (dict(x=ones((2, 8, 8)), kernel=ones((3, 3, 3, 5))), ValueError, "same rank"),
    (
        dict(x=ones((2, 8, 8, 3), np.int32), kernel=ones((3, 3, 3, 5))),
        TypeError,
        "x must have a floating-point dtype",
    ),
    (
        dict(x=ones((2, 8, 8, 3)), kernel=ones((3, 3, 3, 5)), data_format="NWHC"),
        ValueError,
        "data_format",
    ),
    (
        dict(x=ones((2, 8, 8, 3)), kernel=ones((3, 3, 3, 5)), strides=0),
        ValueError,
        "strides",
    ),
    (
        dict(x=ones((2, 8, 8, 3)), kernel=ones((3, 3, 3, 5)), padding=((1, 1),)),
        ValueError,
        "padding",
    ),
    (
        dict(x=ones((2, 3, 8, 8)), kernel=ones((3, 3, 3, 5))),
        ValueError,
        r"3 input channels.*has 8 \(NHWC\)",
    ),
    (  # no output position: an empty forward and a failing backward
        dict(x=ones((2, 4, 8, 3)), kernel=ones((5, 3, 3, 2)), padding="VALID"),
        ValueError,
        r"kernel's spatial size \(5, 3\) exceeds the image's \(4, 8\)",
    ),
    (
        dict(
            x=ones((2, 3, 4, 8)),
            kernel=ones((3, 9, 3, 2)),
            padding=((0, 0), (0, 0)),
            data_format="NCHW",
        ),
        ValueError,
        r"\(3, 9\) exceeds the image's \(4, 8\)",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), CONV_BAD, ids=range(len(CONV_BAD)))
def test_conv_bad_input(kwargs, error, match):
    kwargs = dict(kwargs)
    x, kernel = kwargs.pop("x"), kwargs.pop("kernel")
    with pytest.raises(error, match=match):
        jax.eval_shape(functools.partial(conv, **kwargs), x, kernel)


# --------------------------------------------------------------------------- the CNN


def oracle_forward(model: CNN, params, state, x, *, training: bool):
    """The CNN written out with lax convolutions and the reference batch norm."""
    nhwc = model.data_format == "NHWC"
    axis, spatial = (-1, (1, 2)) if nhwc else (1, (2, 3))
    strides = (
        model.strides
        if isinstance(model.strides, tuple)
        else (model.strides,) * len(model.channels)
    )
    pooling = (
        model.pooling
        if isinstance(model.pooling, tuple)
        else (model.pooling,) * len(model.channels)
    )
    k = model.kernel_size if isinstance(model.kernel_size, tuple) else (model.kernel_size,) * 2
    h, new_states = x, []
    for block, block_state, s, pool in zip(
        params["blocks"], state["blocks"], strides, pooling, strict=True
    ):
        s = s if isinstance(s, tuple) else (s, s)
        size = [h.shape[a] for a in spatial]
        pads = []
        for n, kk, ss in zip(size, k, s, strict=True):
            total = max((-(-n // ss) - 1) * ss + kk - n, 0)
            pads.append((total // 2, total - total // 2))
        z = lax_conv(h, block["conv"]["kernel"], s, pads, model.data_format)
        new = {}
        if "bias" in block["conv"]:
            b = block["conv"]["bias"]
            z = z + (b if nhwc else b[:, None, None])
        if "batch_norm" in block:
            bnp, old = block["batch_norm"], block_state["batch_norm"]
            shape = [1] * z.ndim
            shape[axis] = -1
            if training:
                z, mean, var = reference.batch_norm(
                    z, bnp["scale"], bnp["bias"], axis=axis, eps=model.eps
                )
                m = model.momentum
                mean, var = lax.stop_gradient((mean, var))
                new["batch_norm"] = {
                    "mean": m * old["mean"] + (1 - m) * mean,
                    "var": m * old["var"] + (1 - m) * var,
                }
            else:
                inv = lax.rsqrt(old["var"] + model.eps)
                z = (z - old["mean"].reshape(shape)) * (inv * bnp["scale"]).reshape(shape) + bnp[
                    "bias"
                ].reshape(shape)
                new["batch_norm"] = old
        h = jaxbn.mlp.ACTIVATIONS[model.activation](z)
        if pool is not None:
            win = tuple(2 if a in spatial else 1 for a in range(h.ndim))
            if pool == "max":
                h = lax.reduce_window(h, -jnp.inf, lax.max, win, win, "VALID")
            else:
                h = lax.reduce_window(h, 0.0, lax.add, win, win, "VALID") / 4
        new_states.append(new)
    logits = h.mean(spatial) @ params["head"]["kernel"] + params["head"]["bias"]
    return logits, {"blocks": new_states}


def images(seed, model: CNN, batch=6, size=(8, 8)):
    x = 2.0 * normal(seed, (batch, *size, model.in_channels)) + 0.5
    return x if model.data_format == "NHWC" else np.moveaxis(x, -1, 1)


DIGITS = jaxbn.data.load_digits()


def digit_images(x):
    return np.asarray(x, np.float32).reshape(-1, 8, 8, 1)


MODELS = {
    "plain": CNN(2, (4, 6), 3),
    "strides_pool": CNN(
        2, (4, 6, 5), 3, strides=(1, (2, 1), 1), pooling=("max", None, "avg"), activation="tanh"
    ),
    "kernel5_no_bn": CNN(2, (4, 6), 3, kernel_size=(5, 3), use_batch_norm=False),
}


def trained_state(model, params, state, seed):
    """Running statistics moved away from their initial values by a few batches.

    The batches are drawn with the seeds ``10 * seed`` to ``10 * seed + 2``.
    """
    step = jax.jit(functools.partial(model.apply, training=True))
    for i in range(3):
        _, state = step(params, state, images(10 * seed + i, model))
    return state


def test_init_layout():
    model = CNN(3, (4, 6), 5, kernel_size=(3, 5))
    params, state = model.init(jax.random.key(0))
    shapes = jax.tree.map(jnp.shape, params)
    assert shapes["blocks"][0] == {
        "conv": {"kernel": (3, 5, 3, 4)},
        "batch_norm": {"scale": (4,), "bias": (4,)},
    }
    assert shapes["blocks"][1]["conv"] == {"kernel": (3, 5, 4, 6)}
    assert shapes["head"] == {"kernel": (6, 5), "bias": (5,)}
    assert jax.tree.map(jnp.shape, state) == {
        "blocks": [{"batch_norm": {"mean": (c,), "var": (c,)}} for c in (4, 6)]
    }
    # LeCun normal: std 1 / sqrt(kh * kw * in).
    big = CNN(16, (256,), 2, kernel_size=3)
    kernel = big.init(jax.random.key(1))[0]["blocks"][0]["conv"]["kernel"]
    np.testing.assert_allclose(float(jnp.std(kernel)), 1 / np.sqrt(9 * 16), rtol=0.03)
    no_bn_params, no_bn_state = dataclasses.replace(model, use_batch_norm=False).init(
        jax.random.key(0)
    )
    assert jax.tree.map(jnp.shape, no_bn_params["blocks"][1]) == {
        "conv": {"kernel": (3, 5, 4, 6), "bias": (6,)}
    }
    assert no_bn_state == {"blocks": [{}, {}]}
    assert hash(model) == hash(CNN(3, (4, 6), 5, kernel_size=(3, 5)))


@pytest.mark.parametrize(
    ("model", "size", "out_hw"),
    [
        (CNN(1, (4, 4)), (8, 8), (8, 8)),
        (CNN(1, (4, 4), strides=2), (8, 8), (2, 2)),
        (CNN(1, (4, 4), strides=(2, 1)), (9, 9), (5, 5)),
        (CNN(1, (4, 4), pooling="max"), (8, 8), (2, 2)),
        (CNN(1, (4, 4), pooling=("avg", None)), (7, 10), (3, 5)),
    ],
)
def test_output_shapes(model, size, out_hw):
    params, state = model.init(jax.random.key(0))
    x = images(1, model, batch=3, size=size)
    logits, new_state = jax.eval_shape(
        functools.partial(model.apply, training=True), params, state, x
    )
    assert logits.shape == (3, model.num_classes)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    # The feature map the head averages over, from the oracle's shapes.
    h = x
    for block, (s, pool) in zip(params["blocks"], model._block_specs, strict=True):
        h = jax.eval_shape(functools.partial(conv, strides=s), h, block["conv"]["kernel"])
        if pool is not None:
            h = jax.ShapeDtypeStruct(
                (h.shape[0], h.shape[1] // 2, h.shape[2] // 2, h.shape[3]), h.dtype
            )
    assert h.shape[1:3] == out_hw


ORACLE_CASES = [
    ("plain", "NHWC"),
    ("strides_pool", "NHWC"),
    ("strides_pool", "NCHW"),
    ("kernel5_no_bn", "NCHW"),
]


@pytest.mark.parametrize(("name", "data_format"), ORACLE_CASES, ids=map("-".join, ORACLE_CASES))
def test_matches_the_oracle(name, data_format):
    """Logits and new state in both modes, and gradients, equal the reference network's.

    Gradients of every param and of x, with jaxbn's op and conv against autodiff
    of the oracle, for a random cotangent on the logits (never their sum).
    Both layouts match the same oracle, so NCHW is NHWC transposed.
    """
    model = dataclasses.replace(MODELS[name], data_format=data_format)
    params, state = model.init(jax.random.key(0))
    state = trained_state(model, params, state, 1)
    x = images(2, model)
    oracle = functools.partial(oracle_forward, model)
    for training in (True, False):
        logits, new_state = jax.jit(functools.partial(model.apply, training=training))(
            params, state, x
        )
        want_logits, want_state = jax.jit(functools.partial(oracle, training=training))(
            params, state, x
        )
        close(logits, want_logits)
        tree_close(new_state, want_state)
    ct = normal(3, (x.shape[0], model.num_classes))

    def loss(forward, params, x):
        logits, _ = forward(params, state, x, training=True)
        return jnp.sum(logits * ct)

    grads = jax.jit(jax.grad(functools.partial(loss, model.apply), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(functools.partial(loss, oracle), argnums=(0, 1)))(params, x)
    assert float(jnp.max(jnp.abs(grads[0]["blocks"][0]["conv"]["kernel"]))) > 0
    tree_close(grads, want)


def test_remat_gives_the_same_gradients():
    model = MODELS["strides_pool"]
    params, state = model.init(jax.random.key(0))
    x = images(1, model)
    labels = np.arange(6, dtype=np.int32) % 3

    def loss(model, params):
        return cross_entropy(model.apply(params, state, x, training=True)[0], labels)

    got = jax.jit(jax.grad(functools.partial(loss, dataclasses.replace(model, remat=True))))(params)
    tree_close(got, jax.jit(jax.grad(functools.partial(loss, model)))(params))


# --------------------------------------------------------------------------- fused activation

FUSED = {
    "leaky_relu": CNN(
        2,
        (4, 6, 5),
        3,
        strides=(1, (2, 1), 1),
        pooling=("max", None, "avg"),
        activation="leaky_relu",
        fuse_activation=True,
    ),
    "elu": CNN(2, (4, 6), 3, activation="elu", fuse_activation=True, pooling="avg"),
}


def _fused_setup(name, data_format):
    """A fused CNN, the unfused one, params with scales of both signs, moved statistics."""
    fused = dataclasses.replace(FUSED[name], data_format=data_format)
    unfused = dataclasses.replace(fused, fuse_activation=False)
    params, state = fused.init(jax.random.key(0))
    rng = np.random.default_rng(1)
    for block in params["blocks"]:
        bn = block["batch_norm"]
        bn["scale"] = rng.uniform(-2, 2, bn["scale"].shape).astype(np.float32)
        bn["bias"] = (0.3 * rng.standard_normal(bn["bias"].shape)).astype(np.float32)
    state = trained_state(unfused, params, state, 2)
    return fused, unfused, params, state


def _with_effective_scale(model, params):
    """The scale the fused layer multiplies by, ``|scale| + eps``, written out here."""
    blocks = []
    for block in params["blocks"]:
        bn = block["batch_norm"]
        blocks.append({**block, "batch_norm": {**bn, "scale": jnp.abs(bn["scale"]) + model.eps}})
    return {**params, "blocks": blocks}


FUSED_CASES = [("leaky_relu", "NHWC"), ("elu", "NCHW")]


@pytest.mark.parametrize(("name", "data_format"), FUSED_CASES, ids=map("-".join, FUSED_CASES))
def test_fused_equals_unfused_with_the_effective_scale(name, data_format):
    """Outputs, running statistics and gradients (params and x) of the fused CNN.

    The expected network is the unfused CNN given ``|scale| + eps`` as its scale;
    a random cotangent on the logits, gradients through the absolute value.
    """
    fused, unfused, params, state = _fused_setup(name, data_format)
    assert jax.tree.structure(fused.init(jax.random.key(0))) == jax.tree.structure(
        unfused.init(jax.random.key(0))
    )
    x = images(3, fused)
    ct = normal(4, (x.shape[0], fused.num_classes))
    for training in (True, False):
        got = jax.jit(functools.partial(fused.apply, training=training))(params, state, x)
        want = jax.jit(functools.partial(unfused.apply, training=training))(
            _with_effective_scale(unfused, params), state, x
        )
        tree_close(got, want)

    def loss(model, params, x, effective=False):
        if effective:
            params = _with_effective_scale(model, params)
        return jnp.sum(model.apply(params, state, x, training=True)[0] * ct)

    grads = jax.jit(jax.grad(functools.partial(loss, fused), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(functools.partial(loss, unfused, effective=True), argnums=(0, 1)))(
        params, x
    )
    assert float(jnp.max(jnp.abs(grads[0]["blocks"][0]["batch_norm"]["scale"]))) > 0
    tree_close(grads, want)


def test_fused_blocks_run_the_fused_op():
    """The fused CNN's gradient keeps no pre-activation: its jaxpr calls batch_norm_act."""
    fused, unfused, params, state = _fused_setup("leaky_relu", "NHWC")
    x = images(3, fused)

    def jaxpr(model):
        return str(jax.make_jaxpr(lambda p: model.apply(p, state, x, training=True))(params))

    assert jaxpr(fused).count("custom_vjp_call") >= 2 * len(fused.channels)
    assert "_batch_norm_act" in jaxpr(fused) and "_batch_norm_act" not in jaxpr(unfused)


def test_fused_step_keeps_one_activation_per_block():
    """Compiled memory of a training step: the fused CNN keeps each block's input once.

    With ``n`` blocks of the same size ``A`` (one activation), the backward needs
    the inputs of blocks 1 to n-1 (block 0's is the argument ``x``) and, at its
    peak, three working arrays (the conv's ``dy`` and its two transposed copies):
    ``n + 2`` activations. Without the ties in the conv's backward, XLA makes the
    transposed copy of each block's input in the forward and keeps it (``2n + 1``),
    or writes dx before freeing the copies (``n + 3``). The unfused CNN also keeps
    each convolution's output (the batch-norm input).
    """
    n, batch, size, width = 4, 16, 8, 8
    slab = batch * size * size * width * 4
    temp = {}
    for fuse in (False, True):
        model = CNN(3, (width,) * n, 10, activation="leaky_relu", fuse_activation=fuse)
        params, state = model.init(jax.random.key(0))
        opt = optax.sgd(0.1)
        batch_xy = (np.ones((batch, size, size, 3), np.float32), np.zeros((batch,), np.int32))
        compiled = (
            jax.jit(make_train_step(model, opt))
            .lower(params, state, opt.init(params), batch_xy)
            .compile()
        )
        temp[fuse] = compiled.memory_analysis().temp_size_in_bytes / slab
    assert temp[True] <= n + 2 + 0.25, temp
    assert temp[True] <= temp[False] - 1.5, temp


@pytest.mark.parametrize("fused", [False, True], ids=["unfused-NCHW", "fused-NHWC"])
def test_fold_gives_the_same_outputs_as_evaluation_mode(fused):
    """Folded, the CNN has no batch norm and the outputs of evaluation mode.

    The fused CNN folds ``|scale| + eps``: folding its plain scale would be
    wrong (the scales have both signs; the negative control).
    """
    if fused:
        model, _, params, state = _fused_setup("leaky_relu", "NHWC")
    else:
        model = dataclasses.replace(MODELS["strides_pool"], data_format="NCHW")
        params, state = model.init(jax.random.key(0))
        params = jax.tree.map(lambda v: np.asarray(v) * 1.3 + 0.1, params)
        state = trained_state(model, params, state, 1)
    folded, fparams, fstate = model.fold(params, state)
    assert not folded.use_batch_norm and not folded.fuse_activation
    assert all(set(b) == {"conv"} for b in fparams["blocks"])
    assert all(set(b["conv"]) == {"kernel", "bias"} for b in fparams["blocks"])
    x = images(2, model)
    want = jax.jit(functools.partial(model.apply, training=False))(params, state, x)[0]
    apply_folded = jax.jit(functools.partial(folded.apply, training=False))
    close(apply_folded(fparams, fstate, x)[0], want)
    if fused:
        _, wrong, _ = dataclasses.replace(model, fuse_activation=False).fold(params, state)
        assert not np.allclose(apply_folded(wrong, fstate, x)[0], want, atol=1e-3)


def test_fused_cnn_trains_to_the_unfused_accuracy():
    """A short run (measured: 90.8% unfused, 91.1% fused); the fused one keeps up."""
    model = CNN(1, (8, 16), 10, pooling="max", activation="leaky_relu", momentum=0.9)
    x, y = digit_images(DIGITS.x_train), DIGITS.y_train
    accuracy = {}
    for fuse in (False, True):
        m = dataclasses.replace(model, fuse_activation=fuse)
        opt = optax.adam(optax.cosine_decay_schedule(1e-2, 150))
        ts = fit(m, opt, x, y, steps=150, batch_size=32, key=jax.random.key(0))
        metrics = evaluate(m, ts.params, ts.state, digit_images(DIGITS.x_test), DIGITS.y_test)
        accuracy[fuse] = float(metrics["accuracy"])
    print(f"digits CNN accuracy: unfused {accuracy[False]:.4f}, fused {accuracy[True]:.4f}")
    assert accuracy[False] >= 0.88
    assert accuracy[True] >= accuracy[False] - 0.02


# --------------------------------------------------------------------------- training


# The accuracy run: the CNN of the README on the digits as 8x8x1 images (measured:
# 98.89%, 98.61%, 99.44% for keys 0, 1, 2; 98.33-98.89% without pooling).
ACCURACY_MODEL = CNN(1, (32, 64), 10, pooling="max")
ACCURACY_STEPS, ACCURACY_BATCH, ACCURACY_LR = 600, 64, 1e-2


def test_cnn_reaches_98_percent_on_the_digits():
    opt = optax.adam(optax.cosine_decay_schedule(ACCURACY_LR, ACCURACY_STEPS))
    start = time.perf_counter()
    ts = fit(
        ACCURACY_MODEL,
        opt,
        digit_images(DIGITS.x_train),
        DIGITS.y_train,
        steps=ACCURACY_STEPS,
        batch_size=ACCURACY_BATCH,
        key=jax.random.key(0),
    )
    metrics = evaluate(
        ACCURACY_MODEL, ts.params, ts.state, digit_images(DIGITS.x_test), DIGITS.y_test
    )
    elapsed = time.perf_counter() - start
    print(f"CNN digits: test accuracy {float(metrics['accuracy']):.4f} in {elapsed:.1f} s")
    assert float(metrics["accuracy"]) >= 0.98


# --------------------------------------------------------------------------- bad input

GOOD = CNN(2, (4, 6), 3)


def _params(model=GOOD):
    return model.init(jax.random.key(0))


def _swap_kernel(params, i, shape):
    params = jax.tree.map(lambda v: v, params)
    params["blocks"][i]["conv"]["kernel"] = ones(shape)
    return params


APPLY_BAD = [
    ("rank", lambda p, s: (p, s, ones((2, 8, 8))), ValueError, r"\[batch, height, width, 2\]"),
    (
        "layout",
        lambda p, s: (p, s, ones((2, 2, 8, 8))),
        ValueError,
        r"NHWC.*got \(2, 2, 8, 8\) \(that is the NCHW layout: pass data_format='NCHW'\)",
    ),
    ("channels", lambda p, s: (p, s, ones((2, 8, 8, 3))), ValueError, "in_channels=2"),
    (
        "kernel_channels",
        lambda p, s: (_swap_kernel(p, 1, (3, 3, 5, 6)), s, ones((2, 8, 8, 2))),
        ValueError,
        r"params\['blocks'\]\[1\]\['conv'\]\['kernel'\] must have shape \(3, 3, 4, 6\).*"
        r"got \(3, 3, 5, 6\)",
    ),
    (
        "blocks",
        lambda p, s: ({**p, "blocks": p["blocks"][:1]}, s, ones((2, 8, 8, 2))),
        ValueError,
        "params has 1 blocks, expected 2",
    ),
    (
        "int_x",
        lambda p, s: (p, s, ones((2, 8, 8, 2), np.int32)),
        TypeError,
        "floating-point",
    ),
]


@pytest.mark.parametrize(
    ("make", "error", "match"), [c[1:] for c in APPLY_BAD], ids=[c[0] for c in APPLY_BAD]
)
def test_apply_bad_input_while_tracing(make, error, match):
    params, state = _params()
    args = make(params, state)
    with pytest.raises(error, match=match):
        jax.eval_shape(functools.partial(GOOD.apply, training=True), *args)


def test_apply_nchw_layout_error():
    model = dataclasses.replace(GOOD, data_format="NCHW")
    params, state = _params(model)
    with pytest.raises(ValueError, match=r"\[batch, 2, height, width\].*pass data_format='NHWC'"):
        jax.eval_shape(
            functools.partial(model.apply, training=False), params, state, ones((2, 8, 8, 2))
        )


CONFIG_BAD = [
    (dict(channels=[4, 6]), TypeError, "channels must be a tuple"),
    (dict(channels=()), ValueError, "channels must hold at least one"),
    (dict(in_channels=0), ValueError, "in_channels"),
    (dict(kernel_size=(3,)), ValueError, "kernel_size"),
    (dict(strides=(1, 2, 1)), ValueError, "strides must be an int or a tuple of 2"),
    (dict(pooling="median"), ValueError, "pooling"),
    (dict(activation="swish!"), ValueError, "activation"),
    (dict(data_format="CHWN"), ValueError, "data_format"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(eps=0.0), ValueError, "eps"),
    (
        dict(fuse_activation=True),
        ValueError,
        r"activation \(with fuse_activation=True\) must be one of.*'relu' is not invertible",
    ),
    (
        dict(fuse_activation=True, activation="tanh"),
        ValueError,
        r"activation \(with fuse_activation=True\).*got 'tanh'",
    ),
    (
        dict(fuse_activation=True, activation="leaky_relu", use_batch_norm=False),
        ValueError,
        "fuse_activation=True needs use_batch_norm=True",
    ),
    (dict(fuse_activation=1), TypeError, "fuse_activation must be a bool"),
    (dict(debias=True, momentum=None), ValueError, "debias=True needs a momentum"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), CONFIG_BAD, ids=range(len(CONFIG_BAD)))
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        CNN(**{"in_channels": 2, "channels": (4, 6), **kwargs})


@pytest.mark.parametrize(
    "model, small, large",
    [
        (CNN(1, (4, 4, 4, 4), 10, pooling="max"), 8, 16),  # 8 -> 4 -> 2 -> 1 -> 0
        (CNN(1, (4, 4), 10, strides=2, pooling="avg"), 8, 16),  # 8 -> 4 -> 2 -> 1 -> 0
        (CNN(1, (4, 4, 4), 10, pooling="max", data_format="NCHW"), 4, 8),
    ],
    ids=["max-pooling", "strides-and-pooling", "nchw"],
)
def test_images_shrunk_to_nothing_are_refused_while_tracing(model, small, large):
    params, state = model.init(jax.random.key(0))

    def shape(size):
        return (2, size, size, 1) if model.data_format == "NHWC" else (2, 1, size, size)

    for training in (True, False):
        with pytest.raises(ValueError, match=r"too small for this CNN: after block \d+"):
            jax.eval_shape(
                lambda p, s, x, t=training: model.apply(p, s, x, training=t),
                params,
                state,
                jax.ShapeDtypeStruct(shape(small), jnp.float32),
            )
    # Images just large enough keep one position, and give finite logits.
    logits, _ = jax.jit(functools.partial(model.apply, training=False))(
        params, state, ones(shape(large))
    )
    assert bool(jnp.all(jnp.isfinite(logits)))

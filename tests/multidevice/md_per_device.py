"""Per-device parameters under ``vmap``, ``pmap`` and unchecked ``shard_map`` (no types).

Only checked ``shard_map`` types its values as replicated or varying over a mesh
axis. Under the other transforms every device holds its own copy of a
parameter, and JAX's autodiff of the reference gives each copy its own
contribution (the classic data-parallel idiom then averages them with
``lax.pmean``). The op, the fused op, the layer and the framework modules must
give the same; the statistics (and so ``dx``) still run over the global batch,
each device's terms weighted by its own scale.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import jaxbn
from jaxbn import reference
from tests._op_cases import normal

if jax.device_count() < 4:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs 4 devices (XLA_FLAGS)", allow_module_level=True)

D, N, C = 4, 6, 3


def fused_reference(activation):
    def op(x, scale, bias, *, axis_name):
        s = jnp.abs(scale) + 1e-5
        y, mean, var = reference.batch_norm(x, s, bias, axis_name=axis_name)
        return jaxbn.act.activate(y, activation), mean, var

    return op


def fused(activation):
    return functools.partial(jaxbn.batch_norm_act, activation=activation)


OPS = {
    "batch_norm": (jaxbn.batch_norm, reference.batch_norm),
    "fused_leaky_relu": (fused("leaky_relu"), fused_reference("leaky_relu")),
    "fused_elu": (fused("elu"), fused_reference("elu")),
}


def inputs(seed=0, dtype=np.float32):
    """Per-device x, parameters that differ between devices, and cotangents on every output.

    NumPy arrays of ``dtype``, drawn from the seeds ``6 * seed`` to ``6 * seed + 5``
    (independent draws).
    """
    s = 6 * seed
    x = 1.5 * normal(s, (D, N, C), dtype) + 0.5 * np.arange(D, dtype=dtype)[:, None, None]
    scale = 1.0 + 0.3 * normal(s + 1, (D, C), dtype)
    bias = 0.5 * normal(s + 2, (D, C), dtype)
    dy = normal(s + 3, (D, N, C), dtype)
    g_mean, g_var = normal(s + 4, (D, C), dtype), normal(s + 5, (D, C), dtype)
    return x, scale, bias, dy, g_mean, g_var


def local_grads(op):
    """This device's gradients of its own loss, with cotangents on y, mean and var."""

    def grads(x, scale, bias, dy, g_mean, g_var):
        def loss(x, scale, bias):
            y, mean, var = op(x, scale, bias, axis_name="i")
            return jnp.sum(y * dy) + jnp.sum(mean * g_mean) + jnp.sum(var * g_var)

        return jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)

    return grads


def unchecked_shard_map(f):
    mesh = jax.make_mesh((D,), ("i",), devices=jax.devices()[:D])

    def local(*args):
        return jax.tree.map(lambda v: v[None], f(*(a[0] for a in args)))

    mapped = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=P("i"), out_specs=P("i"), check_vma=False)
    )
    return lambda *args: mapped(*jax.device_put(args, NamedSharding(mesh, P("i"))))


TRANSFORMS = {
    "vmap": lambda f: jax.jit(jax.vmap(f, axis_name="i")),
    "pmap": lambda f: jax.pmap(f, axis_name="i", devices=jax.devices()[:D]),
    "shard_map_unchecked": unchecked_shard_map,
}


def assert_close(got, want, tol=2e-5):
    for g, w in zip(got, want, strict=True):
        scale = max(float(np.max(np.abs(w))), 1.0)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=tol * scale)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("name", list(OPS))
def test_per_device_parameters_get_their_own_contribution(name, transform):
    op, ref = OPS[name]
    args = inputs()
    got = TRANSFORMS[transform](local_grads(op))(*args)
    want = TRANSFORMS[transform](local_grads(ref))(*args)
    # Not a trivial agreement: the all-reduced dscale would be about D times larger.
    assert float(jnp.max(jnp.abs(want[1]))) > 0.1
    assert_close(got, want)


def test_the_layer_under_pmap_follows_the_reference():
    bn = jaxbn.BatchNorm(C, axis_name="i")
    _, state = bn.init()
    x, scale, bias, dy, _, _ = inputs(seed=1)

    def layer(x, scale, bias, *, axis_name):
        y, _ = bn.apply({"scale": scale, "bias": bias}, state, x, training=True)
        return y, jnp.zeros(C), jnp.zeros(C)

    zeros = np.zeros((D, C), np.float32)
    pmap = TRANSFORMS["pmap"]
    got = pmap(local_grads(layer))(x, scale, bias, dy, zeros, zeros)
    want = pmap(local_grads(reference.batch_norm))(x, scale, bias, dy, zeros, zeros)
    assert_close(got, want)


def classic_pmap_idiom(apply, variables, x, labels):
    """Replicated variables, per-device ``grad``, then ``lax.pmean`` of the gradients."""

    def step(variables, x, labels):
        def loss(params):
            y = apply({**variables, "params": params}, x)
            return jnp.mean((y - labels) ** 2)

        return jax.lax.pmean(jax.grad(loss)(variables["params"]), "i")

    replicated = jax.tree.map(lambda v: np.broadcast_to(v, (D, *v.shape)), variables)
    return jax.pmap(step, axis_name="i", devices=jax.devices()[:D])(replicated, x, labels)


def test_linen_module_in_the_classic_pmap_idiom_equals_flax():
    linen = pytest.importorskip("flax.linen")
    from jaxbn import linen as jlinen

    x, _, _, labels, _, _ = inputs(seed=2)
    grads = {}
    for name, cls in {"flax": linen.BatchNorm, "jaxbn": jlinen.BatchNorm}.items():
        module = cls(use_running_average=False, axis_name="i")
        variables = jax.eval_shape(module.init, jax.random.key(0), x[0])
        variables = jax.tree.map(lambda s: np.full(s.shape, 0.7, s.dtype), variables)
        variables["params"]["bias"] = np.full((C,), 0.2, np.float32)

        def apply(v, x, module=module):
            return module.apply(v, x, mutable=["batch_stats"])[0]

        grads[name] = classic_pmap_idiom(apply, variables, x, labels)
    assert float(jnp.max(jnp.abs(grads["flax"]["scale"]))) > 0.01
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        grads["jaxbn"],
        grads["flax"],
    )


def test_nnx_module_under_vmap_equals_flax():
    nnx = pytest.importorskip("flax.nnx")
    from jaxbn import nnx as jnnx

    x, _, _, dy, _, _ = inputs(seed=3)
    scale = 1.0 + 0.3 * normal(100, (D, C))
    per_device = {"scale": scale, "bias": np.zeros((D, C), np.float32)}
    grads = {}
    for name, cls in {"flax": nnx.BatchNorm, "jaxbn": jnnx.BatchNorm}.items():

        def grad(p, x, dy, cls=cls):
            def loss(p):
                model = cls(C, axis_name="i", rngs=nnx.Rngs(0))
                model.scale[...], model.bias[...] = p["scale"], p["bias"]
                return jnp.sum(model(x) * dy)

            return jax.grad(loss)(p)

        grads[name] = jax.vmap(grad, axis_name="i")(per_device, x, dy)
    assert float(jnp.max(jnp.abs(grads["flax"]["scale"]))) > 0.1
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        grads["jaxbn"],
        grads["flax"],
    )


@pytest.mark.parametrize(
    "transform",
    [
        "pmap",
        pytest.param(
            "vmap",
            marks=pytest.mark.xfail(
                strict=True,
                reason="documented in docs/data_parallel.md: under vmap the all-reduced "
                "statistics are unbatched, and their cotangent reaches the backward already "
                "summed over the copies, which it sums again (dx of the statistics D times)",
            ),
        ),
    ],
)
@pytest.mark.parametrize("name", list(OPS))
def test_grad_outside_the_map_with_cotangents_on_every_output(name, transform):
    """``grad`` of the whole mapped function: every device's y, mean and var in the loss."""
    op, ref = OPS[name]

    def grads(op):
        def loss(x, scale, bias, dy, g_mean, g_var):
            f = TRANSFORMS[transform](lambda x, s, b: op(x, s, b, axis_name="i"))
            y, mean, var = f(x, scale, bias)
            return jnp.sum(y * dy) + jnp.sum(mean * g_mean) + jnp.sum(var * g_var)

        return jax.grad(loss, argnums=(0, 1, 2))(*inputs(seed=7))

    assert_close(grads(op), grads(ref))


@pytest.mark.parametrize("name", list(OPS))
def test_grad_outside_an_unjitted_vmap_with_a_shared_parameter(name):
    """``grad`` of ``vmap``: the parameter is unmapped, vmap's transpose sums its copies;
    the statistics' cotangents are unmapped zeros (nothing uses them)."""
    op, ref = OPS[name]
    x, scale, bias, dy, _, _ = inputs(seed=5)

    def loss(op, x, scale, bias):
        f = jax.vmap(lambda x: op(x, scale[0], bias[0], axis_name="i")[0], axis_name="i")
        return jnp.sum(f(x) * dy)

    got = jax.grad(functools.partial(loss, op), argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(x, scale, bias)
    assert_close(got, want)


@pytest.mark.parametrize("name", list(OPS))
def test_finite_differences_of_a_jitted_vmap_with_per_device_parameters(name):
    """float64 finite differences of the whole mapped, jitted function (its output y)."""
    op = OPS[name][0]
    with jax.enable_x64(True):
        x, scale, bias = inputs(seed=6, dtype=np.float64)[:3]

        def mapped(x, scale, bias):
            return jax.vmap(lambda x, s, b: op(x, s, b, axis_name="i")[0], axis_name="i")(
                x, scale, bias
            )

        check_grads(jax.jit(mapped), (x, scale, bias), order=2, modes=["rev"])

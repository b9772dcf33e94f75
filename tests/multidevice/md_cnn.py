"""Data-parallel CNN training on forced CPU devices.

The reference is single-device training on the same global batch: batch norm's
statistics are synchronized over the devices, so a data-parallel step, loop or
run reproduces it to float32 rounding.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxbn.cnn import CNN
from jaxbn.data import load_digits
from jaxbn.train import data_mesh, fit, init_train_state, make_train_loop, make_train_step

if jax.device_count() < 4:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs 4 devices (XLA_FLAGS)", allow_module_level=True)

RTOL, ATOL = 1e-5, 1e-6
DIGITS = load_digits()
X = DIGITS.x_train[:256].reshape(-1, 8, 8, 1)
Y = DIGITS.y_train[:256]
MODEL = CNN(1, (4, 8), 10, pooling=("max", None))
OPT = optax.sgd(0.05, momentum=0.9)
BATCH = 32


def _leaves(tree):
    out = []
    for leaf in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf, np.float64))
    return out


def _close(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(_leaves(got), _leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL)


def _max_diff(got, want):
    return max(
        float(np.max(np.abs(a - b), initial=0.0))
        for a, b in zip(_leaves(got), _leaves(want), strict=True)
    )


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
def test_cnn_step_on_four_devices_equals_one(data_format):
    model = dataclasses.replace(MODEL, data_format=data_format)
    x = X if data_format == "NHWC" else np.moveaxis(X, -1, 1)
    ts = init_train_state(model, OPT, jax.random.key(0))
    batch = (jnp.asarray(x[:BATCH]), jnp.asarray(Y[:BATCH]))
    args = (ts.params, ts.state, ts.opt_state, batch)
    want = jax.jit(make_train_step(model, OPT))(*args)
    got = jax.jit(make_train_step(model, OPT, mesh=data_mesh(4)))(*args)
    _close(got, want)
    print(f"CNN step {data_format}, 4 devices: max |diff| {_max_diff(got, want):.3g}")


def test_cnn_batch_norm_is_synchronized():
    """Per-device statistics give another step: the synchronization is what matches."""
    ts = init_train_state(MODEL, OPT, jax.random.key(1))
    mesh = data_mesh(4)
    specs = (P(), P(), P(), P("data"))
    args = jax.device_put(
        (ts.params, ts.state, ts.opt_state, (jnp.asarray(X[:BATCH]), jnp.asarray(Y[:BATCH]))),
        tuple(jax.NamedSharding(mesh, s) for s in specs),
    )
    synced = jax.jit(make_train_step(MODEL, OPT, mesh=mesh))(*args)
    local = make_train_step(MODEL, OPT, axis_name="data")
    out_specs = (P(), P("data"), P(), P())
    unsynced = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs))(*args)
    assert _max_diff(unsynced[0], synced[0]) > 1e-4


def test_cnn_scan_loop_on_four_devices_equals_one():
    ts = init_train_state(MODEL, OPT, jax.random.key(2))
    want = make_train_loop(MODEL, OPT, batch_size=BATCH)(ts, X, Y, 8)
    got = make_train_loop(MODEL, OPT, batch_size=BATCH, mesh=data_mesh(4))(ts, X, Y, 8)
    _close(got, want)
    print(f"CNN loop, 4 devices: max |diff| {_max_diff(got, want):.3g}")


def test_cnn_fit_checkpoint_from_four_devices_resumes_on_one(tmp_path):
    kwargs = dict(batch_size=BATCH, key=jax.random.key(3), chunk_size=3)
    want = fit(MODEL, OPT, X, Y, steps=6, **kwargs)
    path = tmp_path / "cnn.npz"
    fit(MODEL, OPT, X, Y, steps=3, checkpoint_path=path, mesh=data_mesh(4), **kwargs)
    got = fit(MODEL, OPT, X, Y, steps=6, checkpoint_path=path, resume=True, **kwargs)
    _close(got, want)

"""Statistics for evaluation: precise_stats, debiased running averages, frozen batch norm."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxbn
from jaxbn.data import batch_indices
from jaxbn.stats import precise_stats_from_data
from tests._op_cases import bernoulli, normal, ones


def data(shape, seed=0, offset=3.0, scale=2.0):
    return scale * normal(seed, shape) + offset


def population(x, feat_axes):
    """Mean and population variance over every axis but ``feat_axes``, in float64."""
    x = np.asarray(x, np.float64)
    red = tuple(a for a in range(x.ndim) if a not in feat_axes)
    return x.mean(red), x.var(red)


def bn_layers(state):
    """The batch-norm dicts of an MLP state, in order."""
    return [layer["batch_norm"] for layer in state["layers"] if "batch_norm" in layer]


# --- precise_stats -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,axis",
    [((6, 16, 5), -1), ((4, 8, 3, 3, 5), -1), ((3, 8, 5, 2, 2), 1)],
    ids=["dense", "nhwc", "nchw"],
)
def test_one_layer_equals_population_statistics_of_the_whole_data_set(shape, axis):
    # Large offset: the pooled variance must stay accurate when |mean| >> std.
    xs = data(shape, offset=100.0)
    feat = (axis % (len(shape) - 1),)
    bn = jaxbn.BatchNorm(5, axis=axis, momentum=0.999)
    params, state = bn.init()
    got = jaxbn.precise_stats(bn, params, state, xs)
    # All batches at once: one array of every example.
    mean, var = population(xs.reshape(-1, *shape[2:]), feat)
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(got["var"], var, rtol=2e-5)
    assert got["mean"].dtype == got["var"].dtype == jnp.float32


def test_mlp_first_layer_sees_the_inputs_of_the_whole_data_set():
    model = jaxbn.MLP((4, 8, 6, 3), momentum=0.999)
    params, state = model.init(jax.random.key(0))
    xs = data((5, 12, 4))
    got = jaxbn.precise_stats(model, params, state, xs)
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    mean, var = population(np.asarray(xs, np.float64).reshape(-1, 4) @ kernel, (1,))
    first, second = bn_layers(got)
    np.testing.assert_allclose(first["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first["var"], var, rtol=1e-5)
    # The second layer: its inputs in training mode, batch by batch, pooled.
    pre = [
        model.pre_activations(params, state, x, training=True)[0]
        for x in np.asarray(xs, np.float64)
    ]
    h = np.concatenate([np.maximum(np.asarray(p, np.float64), 0.0) for p in pre])
    mean2, var2 = population(h @ np.asarray(params["layers"][1]["dense"]["kernel"]), (1,))
    np.testing.assert_allclose(second["mean"], mean2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second["var"], var2, rtol=1e-4)
    # Nothing else in the state changed; the input state is not modified.
    assert jax.tree.structure(got) == jax.tree.structure(state)
    np.testing.assert_array_equal(bn_layers(state)[0]["var"], np.ones(8))


def test_unequal_batch_sizes_weigh_every_example_equally():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    x = data((68, 3), offset=1.0)
    sizes = [3, 17, 40, 8]
    batches = np.split(np.asarray(x), np.cumsum(sizes)[:-1])
    got = jaxbn.precise_stats(bn, params, state, batches)
    mean, var = population(x, (1,))
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)
    # Negative control: weighing the batches equally gives a different answer.
    per_batch = np.mean([b.astype(np.float64).mean(0) for b in batches], 0)
    assert np.abs(per_batch - mean).max() > 1e-2


ONE_ROW = {  # the 9 rows of x as batches whose last (or every) batch holds one row
    "last": (lambda x: [x[:4], x[4:8], x[8:]], True),
    "first": (lambda x: [x[:1], x[1:]], True),
    "masked": (lambda x: [(x[:8], np.ones(8, bool)), (x[8:], np.ones(1, bool))], True),
    "rows stacked": (lambda x: x[:, None], True),
    "rows listed": (lambda x: list(x[:, None]), True),
    "rows one step each": (lambda x: list(x[:, None]), False),
}


@pytest.mark.parametrize("layout,stack", ONE_ROW.values(), ids=ONE_ROW.keys())
def test_a_one_row_batch_among_others_is_pooled_with_them(layout, stack):
    model = jaxbn.MLP((4, 6, 6, 3), momentum=0.9)
    params, state = model.init(jax.random.key(0))
    x = np.asarray(data((9, 4)))
    got = bn_layers(jaxbn.precise_stats(model, params, state, layout(x), stack=stack))
    # The first layer's statistics are those of all 9 rows at once.
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    mean, var = population(x.astype(np.float64) @ kernel, (1,))
    np.testing.assert_allclose(got[0]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0]["var"], var, rtol=1e-5)
    assert all(np.isfinite(layer["var"]).all() for layer in got)


@pytest.mark.parametrize(
    "batches", [[np.ones((1, 4))], np.ones((1, 1, 4))], ids=["list", "stacked"]
)
def test_one_row_in_all_is_refused(batches):
    params, state = MLP.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"one example in all.*more than 1 value per feature"):
        jaxbn.precise_stats(MLP, params, state, batches)


def test_scan_path_equals_loop_path():
    model = jaxbn.MLP((4, 8, 8, 3), momentum=0.9)
    params, state = model.init(jax.random.key(1))
    xs = data((7, 10, 4), seed=2)
    scanned = jaxbn.precise_stats(model, params, state, xs)
    looped = jaxbn.precise_stats(model, params, state, list(xs), stack=False)
    from_list = jaxbn.precise_stats(model, params, state, list(xs))  # stacked from a list
    # A stacked array may be traced: precise_stats composes with jit.
    jitted = jax.jit(lambda p, s, xs: jaxbn.precise_stats(model, p, s, xs))(params, state, xs)
    jax.tree.map(np.testing.assert_array_equal, jitted, scanned)
    for a, b, c in zip(bn_layers(scanned), bn_layers(looped), bn_layers(from_list), strict=True):
        for k in ("mean", "var"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(a[k], c[k], rtol=1e-6, atol=1e-7)


def test_masks_count_only_the_kept_examples():
    x = data((4, 10, 3))
    keep = bernoulli(5, 0.6, (4, 10))
    keep[:, :2] = True
    keep[3] = False  # an all-masked batch weighs nothing
    kept = x[keep]
    mean, var = population(kept, (1,))
    # A model whose apply takes a mask (BatchNorm): the mask is passed, one lax.scan.
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    got = jaxbn.precise_stats(bn, params, state, list(zip(x, keep, strict=True)))
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)
    # A model whose apply takes none (MLP): the masked examples are dropped.
    model = jaxbn.MLP((3, 6, 2))
    params, state = model.init(jax.random.key(0))
    got = jaxbn.precise_stats(model, params, state, list(zip(x, keep, strict=True)))
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    mean, var = population(kept.astype(np.float64) @ kernel, (1,))
    np.testing.assert_allclose(bn_layers(got)[0]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_layers(got)[0]["var"], var, rtol=1e-5)


def test_max_batches_stops_reading_the_iterable():
    bn = jaxbn.BatchNorm(3)
    params, state = bn.init()
    x = data((5, 8, 3))
    read = []

    def batches():
        for i, b in enumerate(x):
            read.append(i)
            yield b

    got = jaxbn.precise_stats(bn, params, state, batches(), max_batches=2)
    mean, var = population(x[:2].reshape(-1, 3), (1,))
    np.testing.assert_allclose(got["var"], var, rtol=1e-5)
    np.testing.assert_allclose(got["mean"], mean, rtol=1e-6)
    assert read == [0, 1, 2]  # the third is read to learn that it is one too many
    stacked = jaxbn.precise_stats(bn, params, state, x, max_batches=2)
    np.testing.assert_allclose(stacked["var"], var, rtol=1e-5)


def test_unbiased_layer_gets_the_correction_on_the_total_count():
    x = data((3, 4, 2, 2, 5))  # NHWC batches: 16 values per feature per batch
    bn = jaxbn.BatchNorm(5, unbiased_running_var=True)
    params, state = bn.init()
    got = jaxbn.precise_stats(bn, params, state, x)
    flat = np.asarray(x, np.float64).reshape(-1, 5)
    np.testing.assert_allclose(got["var"], flat.var(0, ddof=1), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs,kept",
    [
        ({"momentum": None}, {"count"}),
        ({"momentum": 0.9, "debias": True}, {"count"}),
        ({"renorm": True}, {"renorm_mean", "renorm_var"}),
        ({"virtual_batch_size": 4}, set()),
    ],
    ids=["cumulative", "debias", "renorm", "ghost"],
)
def test_other_state_entries_are_kept(kwargs, kept):
    bn = jaxbn.BatchNorm(3, **kwargs)
    params, state = bn.init()
    step = jax.jit(lambda s, x: bn.apply(params, s, x, training=True)[1])
    for i in range(3):
        state = step(state, data((8, 3), seed=i))
    x = data((4, 8, 3), seed=9)
    got = jaxbn.precise_stats(bn, params, state, x)
    assert set(got) == set(state)
    for k in kept:
        np.testing.assert_array_equal(got[k], state[k])
    if "virtual_batch_size" not in kwargs:
        mean, var = population(x.reshape(-1, 3), (1,))
        np.testing.assert_allclose(got["mean"], mean, rtol=1e-5)
        np.testing.assert_allclose(got["var"], var, rtol=1e-5)
    else:  # the groups' average variance, pooled with the spread of the batch means
        groups = np.asarray(x, np.float64).reshape(4, 2, 4, 3)
        within = groups.var(2).mean((0, 1))
        batch_means = groups.mean((1, 2))
        np.testing.assert_allclose(got["var"], within + batch_means.var(0), rtol=1e-5)


def test_frozen_layers_keep_their_statistics():
    model = jaxbn.MLP((4, 6, 3), frozen=True)
    params, state = model.init(jax.random.key(0))
    state = jax.tree.map(lambda v: np.asarray(v) + 0.5, state)
    got = jaxbn.precise_stats(model, params, state, data((3, 8, 4)))
    np.testing.assert_allclose(bn_layers(got)[0]["mean"], bn_layers(state)[0]["mean"], rtol=1e-6)
    np.testing.assert_allclose(bn_layers(got)[0]["var"], bn_layers(state)[0]["var"], rtol=1e-6)


def test_a_model_with_axis_name_runs_on_one_device():
    model = jaxbn.MLP((4, 6, 3), axis_name="d")
    params, state = model.init(jax.random.key(0))
    xs = data((3, 8, 4))
    got = jaxbn.precise_stats(model, params, state, xs)
    local = dataclasses.replace(model, axis_name=None)
    want = jaxbn.precise_stats(local, params, state, xs)
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_precise_stats_from_data_uses_the_training_batches():
    model = jaxbn.MLP((4, 8, 3))
    params, state = model.init(jax.random.key(0))
    x = data((40, 4))
    key = jax.random.key(3)
    got = precise_stats_from_data(model, params, state, x, batch_size=10, num_batches=3, key=key)
    idx = np.stack([batch_indices(key, t, num_examples=40, batch_size=10) for t in range(3)])
    want = jaxbn.precise_stats(model, params, state, list(np.asarray(x)[idx]), stack=False)
    np.testing.assert_allclose(bn_layers(got)[0]["var"], bn_layers(want)[0]["var"], rtol=1e-6)
    # One epoch of batches visits every example once: the whole training set.
    whole = precise_stats_from_data(model, params, state, x, batch_size=10, num_batches=4, key=key)
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    _, var = population(np.asarray(x, np.float64) @ kernel, (1,))
    np.testing.assert_allclose(bn_layers(whole)[0]["var"], var, rtol=1e-5)
    with pytest.raises(ValueError, match="num_batches"):
        precise_stats_from_data(model, params, state, x, batch_size=10, num_batches=0, key=key)
    with pytest.raises(ValueError, match="batch_size"):
        precise_stats_from_data(model, params, state, x, batch_size=41, num_batches=1, key=key)


@dataclasses.dataclass(frozen=True)
class _NoMomentum:
    def apply(self, params, state, x, *, training):
        return x, state


@dataclasses.dataclass(frozen=True)
class _UnbiasedModel:
    momentum: float = 0.9
    unbiased_running_var: bool = True

    def apply(self, params, state, x, *, training):
        bn = jaxbn.BatchNorm(x.shape[-1], momentum=self.momentum, unbiased_running_var=True)
        return bn.apply(params, state, x, training=training)


def with_set(a, index, value):
    """A copy of NumPy array ``a`` with ``a[index] = value``: ``a.at[index].set(value)``."""
    a = a.copy()
    a[index] = value
    return a


MLP = jaxbn.MLP((4, 6, 3))
GOOD = with_set(ones((8, 4)), 0, 2.0)
BAD_INPUTS = [
    ("empty", MLP, [], ValueError, "batches is empty"),
    ("all masked", MLP, [(GOOD, np.zeros(8, bool))], ValueError, "batches is empty"),
    ("features", MLP, [ones((8, 5))], ValueError, r"batches\[0\].*\[batch, 4\]"),
    ("features stacked", MLP, ones((2, 8, 5)), ValueError, r"batches\[0\].*\[batch, 4\]"),
    ("rank", MLP, ones(4), ValueError, "stacked array"),
    ("labels", MLP, [(GOOD, np.zeros(8, np.int32))], TypeError, "boolean mask"),
    ("mask size", MLP, [(GOOD, np.ones(7, bool))], ValueError, "mask of batches"),
    ("mask rank", MLP, [(GOOD, np.ones((8, 2), bool))], ValueError, "per example"),
    (
        "mask along features",
        jaxbn.BatchNorm(4),
        [(GOOD, with_set(np.ones((8, 4), bool), (0, 1), False))],
        ValueError,
        "per example",
    ),
    ("triple", MLP, [(GOOD, GOOD, GOOD)], ValueError, r"batches\[0\] must be x or a pair"),
    ("not iterable", MLP, 3, TypeError, "iterable"),
    ("nan", MLP, [GOOD, with_set(GOOD, (2, 1), np.nan)], ValueError, r"finite: batches\[1\]"),
    ("inf stacked", MLP, np.stack([GOOD, with_set(GOOD, (0, 0), np.inf)]), ValueError, "finite"),
    (
        "nan kept by a mask",
        MLP,
        [(with_set(GOOD, (3, 0), np.nan), np.arange(8) != 2)],
        ValueError,
        r"finite: batches\[0\]",
    ),
    ("no momentum", _NoMomentum(), [GOOD], TypeError, "momentum"),
    ("unbiased", _UnbiasedModel(), [GOOD], ValueError, "unbiased_running_var"),
]


@pytest.mark.parametrize(
    "model,batches,error,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input(model, batches, error, match):
    params, state = MLP.init(jax.random.key(0))
    if not isinstance(model, jaxbn.MLP):
        params, state = jaxbn.BatchNorm(4).init()
    with pytest.raises(error, match=match):
        jaxbn.precise_stats(model, params, state, batches)


def test_a_masked_example_need_not_be_finite():
    params, state = MLP.init(jax.random.key(0))
    keep = np.arange(8) != 3
    got = jaxbn.precise_stats(MLP, params, state, [(with_set(GOOD, 3, np.nan), keep)])
    want = jaxbn.precise_stats(MLP, params, state, [GOOD[keep]])
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_bad_input_raises_while_tracing():
    params, state = MLP.init(jax.random.key(0))

    def f(params, state):
        return jaxbn.precise_stats(MLP, params, state, [ones((8, 5))])

    with pytest.raises(ValueError, match=r"batches\[0\]"):
        jax.eval_shape(f, params, state)
    # A good call traces too (params may be traced: precise_stats runs inside jit).
    out = jax.eval_shape(lambda p, s: jaxbn.precise_stats(MLP, p, s, [GOOD]), params, state)
    assert jax.tree.structure(out) == jax.tree.structure(state)
    with pytest.raises(ValueError, match="max_batches"):
        jaxbn.precise_stats(MLP, params, state, [GOOD], max_batches=0)
    with pytest.raises(ValueError, match="no batch-norm statistics"):
        jaxbn.precise_stats(MLP, params, {"layers": [{}, {}]}, [GOOD])
    with pytest.raises(ValueError, match="examples of shape"):
        jaxbn.precise_stats(MLP, params, state, [GOOD, ones((8, 4, 1))])


# --- debias ---------------------------------------------------------------------------


def _vmap_axis(bn, params, state, x):
    """``apply`` over 2 'devices' (a vmapped named axis): statistics of both halves."""
    f = jax.vmap(
        lambda xi: bn.apply(params, state, xi, training=True)[1], axis_name="d", out_axes=None
    )
    return f(x.reshape(2, -1, *x.shape[1:]))


DEBIAS_CASES = {
    "plain": ({}, None),
    "ghost": ({"virtual_batch_size": 8}, None),
    "renorm": ({"renorm": True}, None),
    "mask": ({}, "mask"),
    "axis_name": ({"axis_name": "d"}, "vmap"),
}


@pytest.mark.parametrize("kwargs,how", DEBIAS_CASES.values(), ids=DEBIAS_CASES.keys())
def test_debiased_statistics_after_one_step_are_the_batch_statistics(kwargs, how):
    bn = jaxbn.BatchNorm(3, momentum=0.999, debias=True, **kwargs)
    params, state = bn.init()
    assert int(state["count"]) == 0
    x = data((16, 3), offset=5.0)
    keep = np.arange(16) % 3 != 0
    if how == "mask":
        new = bn.apply(params, state, x, training=True, mask=keep)[1]
        mean, var = population(x[keep], (1,))
    elif how == "vmap":
        new = _vmap_axis(bn, params, state, x)
        mean, var = population(x, (1,))
    elif "virtual_batch_size" in kwargs:
        new = bn.apply(params, state, x, training=True)[1]
        groups = np.asarray(x, np.float64).reshape(2, 8, 3)
        mean, var = groups.mean(1).mean(0), groups.var(1).mean(0)
    else:
        new = bn.apply(params, state, x, training=True)[1]
        mean, var = population(x, (1,))
        # Exactly what the op computes, not merely close.
        _, op_mean, op_var = jaxbn.batch_norm(x, None, None)
        np.testing.assert_array_equal(new["mean"], op_mean)
        np.testing.assert_array_equal(new["var"], op_var)
    assert int(new["count"]) == 1
    np.testing.assert_allclose(new["mean"], mean, rtol=1e-5)
    np.testing.assert_allclose(new["var"], var, rtol=1e-5)
    # Without debias the first step is still 99.9 % the initial values.
    plain = dataclasses.replace(bn, debias=False)
    _, pstate = plain.init()
    if how is None:
        assert np.abs(plain.apply(params, pstate, x, training=True)[1]["mean"]).max() < 0.1


def test_debiased_average_is_hidden_over_one_minus_momentum_power_and_tends_to_the_plain():
    m = 0.9
    bn = jaxbn.BatchNorm(2, momentum=m, debias=True)
    plain = jaxbn.BatchNorm(2, momentum=m)
    params, state = bn.init()
    _, pstate = plain.init()
    xs = data((200, 6, 2), seed=4, offset=2.0)

    def body(carry, x):
        s, ps = carry
        s = bn.apply(params, s, x, training=True)[1]
        ps = plain.apply(params, ps, x, training=True)[1]
        return (s, ps), (s["mean"], s["var"])

    (state, pstate), (means, vars_) = jax.lax.scan(body, (state, pstate), xs)
    # Independently: a hidden average from zero, divided by 1 - m^t.
    xn = np.asarray(xs, np.float64)
    hidden_mean, hidden_var = np.zeros(2), np.zeros(2)
    for t in range(1, 201):
        hidden_mean = m * hidden_mean + (1 - m) * xn[t - 1].mean(0)
        hidden_var = m * hidden_var + (1 - m) * xn[t - 1].var(0)
        if t in (1, 2, 5, 20, 200):
            np.testing.assert_allclose(means[t - 1], hidden_mean / (1 - m**t), rtol=1e-5)
            np.testing.assert_allclose(vars_[t - 1], hidden_var / (1 - m**t), rtol=1e-5)
    assert int(state["count"]) == 200
    # After many steps m^t ~ 7e-10: the debiased and the plain averages agree.
    np.testing.assert_allclose(state["mean"], pstate["mean"], rtol=1e-5)
    np.testing.assert_allclose(state["var"], pstate["var"], rtol=1e-5)
    # ... while early on they differ by the bias toward the initial values.
    assert np.abs(means[2] - hidden_mean).max() > 0.0


def test_debias_before_any_step_evaluates_with_the_initial_statistics():
    bn = jaxbn.BatchNorm(3, debias=True)
    params, state = bn.init()
    x = data((4, 3))
    y, out = bn.apply(params, state, x, training=False)
    np.testing.assert_allclose(y, np.asarray(x) / np.sqrt(1.0 + 1e-5), rtol=1e-6)
    assert out is not state and int(out["count"]) == 0


def test_debias_all_masked_batch_changes_nothing_and_mlp_passes_debias():
    bn = jaxbn.BatchNorm(3, debias=True)
    params, state = bn.init()
    _, new = bn.apply(params, state, data((4, 3)), training=True, mask=np.zeros(4, bool))
    assert int(new["count"]) == 0
    np.testing.assert_array_equal(new["var"], state["var"])
    model = jaxbn.MLP((4, 6, 3), momentum=0.999, debias=True)
    params, state = model.init(jax.random.key(0))
    x = data((10, 4))
    _, new = model.apply(params, state, x, training=True)
    pre = model.pre_activations(params, state, x, training=True)  # noqa: F841 (runs)
    kernel = np.asarray(params["layers"][0]["dense"]["kernel"], np.float64)
    mean, var = population(np.asarray(x, np.float64) @ kernel, (1,))
    np.testing.assert_allclose(bn_layers(new)[0]["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn_layers(new)[0]["var"], var, rtol=1e-5)
    # Folding reads the debiased statistics as they are.
    folded, fparams, fstate = model.fold(params, new)
    np.testing.assert_allclose(
        folded.apply(fparams, fstate, x, training=False)[0],
        model.apply(params, new, x, training=False)[0],
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"momentum": None, "debias": True}, ValueError, "cumulative average"),
        ({"momentum": 1.0, "debias": True}, ValueError, "momentum < 1"),
        ({"debias": 1}, TypeError, "debias must be a bool"),
        ({"frozen": "yes"}, TypeError, "frozen must be a bool"),
        ({"frozen": True, "renorm": True}, ValueError, "frozen=True.*renorm"),
        ({"frozen": True, "virtual_batch_size": 4}, ValueError, "frozen=True.*virtual"),
    ],
    ids=[
        "debias-cumulative",
        "debias-momentum-1",
        "debias-type",
        "frozen-type",
        "frozen-renorm",
        "frozen-ghost",
    ],
)
def test_debias_and_frozen_bad_config(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxbn.BatchNorm(3, **kwargs)


# --- frozen ---------------------------------------------------------------------------


def eval_reference(x, scale, bias, mean, var, axis, eps=1e-5):
    """Evaluation-mode batch norm in plain jnp: the autodiff oracle for frozen mode."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    r = lambda v: jnp.reshape(v, shape)  # noqa: E731
    return (x - r(mean)) / jnp.sqrt(r(var) + eps) * r(scale) + r(bias)


FROZEN_CASES = [((8, 3), -1, jnp.float32), ((4, 3, 5, 5), 1, jnp.float32), ((6, 4), -1, None)]


@pytest.mark.parametrize("shape,axis,dtype", FROZEN_CASES, ids=["dense", "nchw", "f64"])
def test_frozen_training_leaves_state_and_differentiates_the_fixed_affine_map(shape, axis, dtype):
    with jax.enable_x64(dtype is None):
        dtype = dtype or jnp.float64
        c = shape[axis]
        bn = jaxbn.BatchNorm(c, axis=axis, momentum=None, frozen=True, param_dtype=dtype)
        x = normal(7, shape, dtype) + 2.0
        params = {"scale": normal(8, (c,), dtype), "bias": normal(9, (c,), dtype)}
        state = {
            "mean": normal(10, (c,), dtype),
            "var": np.exp(normal(11, (c,), dtype)),
            "count": np.array(5, np.int32),
        }
        y, new = bn.apply(params, state, x, training=True)
        for k in state:
            np.testing.assert_array_equal(new[k], state[k])
        ref = lambda x, s, b: eval_reference(x, s, b, state["mean"], state["var"], axis)  # noqa: E731
        tol = 1e-5 if dtype == jnp.float32 else 1e-12
        np.testing.assert_allclose(y, ref(x, params["scale"], params["bias"]), rtol=tol, atol=tol)
        # A random cotangent on y; the gradient equals the evaluation-mode reference's.
        dy = normal(12, shape, dtype)

        def frozen(x, s, b):
            return bn.apply({"scale": s, "bias": b}, state, x, training=True)[0]

        _, vjp = jax.vjp(frozen, x, params["scale"], params["bias"])
        _, vjp_ref = jax.vjp(ref, x, params["scale"], params["bias"])
        for got, want in zip(vjp(dy), vjp_ref(dy), strict=True):
            assert np.abs(np.asarray(want)).max() > 0
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
        # No gradient into the state: the batch does not enter the statistics.
        g_state = jax.grad(
            lambda s: jnp.vdot(dy, bn.apply(params, s, x, training=True)[0]), allow_int=True
        )(state)
        np.testing.assert_array_equal(g_state["mean"], 0.0)
        np.testing.assert_array_equal(g_state["var"], 0.0)
        if dtype == jnp.float64:
            check_grads(
                jax.jit(frozen), (x, params["scale"], params["bias"]), order=2, modes=["rev"]
            )


def test_frozen_mlp_training_step_leaves_state_and_accepts_masks():
    model = jaxbn.MLP((4, 6, 3), frozen=True)
    params, state = model.init(jax.random.key(0))
    x = data((8, 4))
    logits, new = model.apply(params, state, x, training=True)
    jax.tree.map(np.testing.assert_array_equal, new, state)
    evaluated, _ = model.apply(params, state, x, training=False)
    np.testing.assert_array_equal(logits, evaluated)
    bn = jaxbn.BatchNorm(3, frozen=True)
    params, state = bn.init()
    _, new = bn.apply(params, state, data((8, 3)), training=True, mask=np.ones(8, bool))
    jax.tree.map(np.testing.assert_array_equal, new, state)
    with pytest.raises(ValueError, match="mask"):
        bn.apply(params, state, data((8, 3)), training=True, mask=np.ones(5, bool))


def test_fit_recomputes_precise_statistics_at_the_end():
    import optax

    from jaxbn.data import make_blobs
    from jaxbn.train import fit

    blobs = make_blobs(num_examples=200, num_features=6, num_classes=3)
    model, opt = jaxbn.MLP((6, 8, 3), momentum=0.999), optax.sgd(0.1)
    kwargs = dict(steps=10, batch_size=20, key=jax.random.key(0))
    plain = fit(model, opt, blobs.x_train, blobs.y_train, **kwargs)
    precise = fit(model, opt, blobs.x_train, blobs.y_train, precise_stats_batches=5, **kwargs)
    expected = precise_stats_from_data(
        model,
        plain.params,
        plain.state,
        blobs.x_train,
        batch_size=20,
        num_batches=5,
        key=plain.key,
    )
    for a, b in zip(jax.tree.leaves(precise.params), jax.tree.leaves(plain.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the params are untouched
    for a, b in zip(jax.tree.leaves(precise.state), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # ... and differ from the running averages that training left (momentum 0.999).
    running = plain.state["layers"][0]["batch_norm"]["var"]
    assert np.max(np.abs(precise.state["layers"][0]["batch_norm"]["var"] - running)) > 1e-2


@pytest.mark.parametrize(
    "config", [{"debias": True}, {"momentum": None}], ids=["debias", "cumulative"]
)
def test_a_mask_varying_along_features_is_refused_where_the_state_counts_updates(config):
    # The state holds one update count per layer: a feature masked out of a step would
    # be averaged as if it had been updated (its initial 0 and 1 mixed in).
    bn = jaxbn.BatchNorm(
        2, momentum=config.get("momentum", 0.9), debias=config.get("debias", False)
    )
    params, state = bn.init()
    x = np.array([[1.0, 10.0], [3.0, 10.0]], np.float32)
    per_feature = np.array([[True, False], [True, False]])
    with pytest.raises(ValueError, match="varies along the feature axes"):
        jax.eval_shape(lambda x: bn.apply(params, state, x, training=True, mask=per_feature), x)
    # A mask over the examples is fine.
    bn.apply(params, state, x, training=True, mask=np.array([True, True]))


# --- the CNN ---------------------------------------------------------------------------


def _conv_same_3x3(x, kernel):
    """A 3x3 "SAME" convolution, NHWC with an HWIO kernel, as shifted matmuls in float64."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, h, w, kernel.shape[-1]))
    for i in range(3):
        for j in range(3):
            out += padded[:, i : i + h, j : j + w, :] @ kernel[i, j]
    return out


@pytest.mark.parametrize(
    "data_format,fuse", [("NHWC", False), ("NCHW", True)], ids=["NHWC-unfused", "NCHW-fused"]
)
def test_cnn_blocks_get_the_population_statistics_of_their_inputs(data_format, fuse):
    """precise_stats on jaxbn.CNN: both blocks, recomputed here in float64 NumPy.

    Block 0 sees the convolution of every input image; block 1 the convolution of
    block 0's output in training mode (each batch normalized with its own
    statistics), pooled over all batches.
    """
    model = jaxbn.CNN(
        2,
        (4, 3),
        3,
        momentum=0.999,
        activation="leaky_relu",
        fuse_activation=fuse,
        data_format=data_format,
    )
    params, state = model.init(jax.random.key(0))
    scale = np.array([1.5, -0.5, 0.7, 2.0], np.float32)  # of both signs: |scale| + eps when fused
    params["blocks"][0]["batch_norm"]["scale"] = scale
    xs = data((3, 5, 6, 6, 2))  # 3 batches of 5 NHWC images
    batches = xs if data_format == "NHWC" else np.moveaxis(xs, -1, 2)
    got = jaxbn.precise_stats(model, params, state, batches)
    kernels = [np.asarray(b["conv"]["kernel"], np.float64) for b in params["blocks"]]
    x64 = np.asarray(xs, np.float64)
    z0 = np.stack([_conv_same_3x3(x, kernels[0]) for x in x64])  # [3, 5, 6, 6, 4]
    mean0, var0 = population(z0.reshape(-1, 4), (1,))
    s0 = np.abs(np.asarray(scale, np.float64)) + model.eps if fuse else np.asarray(scale)
    z1 = []
    for z in z0:
        y = (z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + model.eps) * s0
        h = np.where(y >= 0, y, 0.01 * y)  # bias 0; leaky ReLU
        z1.append(_conv_same_3x3(h, kernels[1]))
    mean1, var1 = population(np.stack(z1).reshape(-1, 3), (1,))
    first, second = (b["batch_norm"] for b in got["blocks"])
    np.testing.assert_allclose(first["mean"], mean0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(first["var"], var0, rtol=1e-5)
    np.testing.assert_allclose(second["mean"], mean1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second["var"], var1, rtol=1e-4)
    # The running averages after one step of momentum 0.999 are far from these.
    _, stepped = model.apply(params, state, batches[0], training=True)
    assert np.max(np.abs(stepped["blocks"][0]["batch_norm"]["var"] - var0)) > 0.5

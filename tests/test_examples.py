"""End-to-end runs of examples/train_mlp.py and examples/paper_figure1.py, tiny settings."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from jaxbn.checkpoint import CheckpointError

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_mlp():
    return _load("train_mlp")


TINY = ["--hidden", "32,32", "--batch-size", "50", "--log-every", "20", "--no-progress"]


def _arrays(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files if k.startswith("tree/")}


def test_train_mlp_runs_end_to_end(train_mlp, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train_mlp.main([*TINY, "--steps", "60", "--out", str(out)])
    assert metrics["steps"] == 60
    assert [h["step"] for h in metrics["history"]] == [20, 40, 60]
    # Sixty steps already beat chance (10%) by far on the digits.
    assert metrics["final"]["test_accuracy"] > 0.5
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "training_curve.png").stat().st_size > 1000
    assert (out / "checkpoint.npz").exists()
    assert "final test accuracy" in capsys.readouterr().out


def test_train_mlp_without_batch_norm(train_mlp, tmp_path):
    metrics = train_mlp.main(
        [
            *TINY,
            "--no-batch-norm",
            "--steps",
            "20",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--activation",
            "tanh",
            "--out",
            str(tmp_path),
        ]
    )
    assert metrics["config"]["batch_norm"] is False
    names = _arrays(tmp_path / "checkpoint.npz").keys()
    assert any("dense/bias" in k for k in names)
    assert not any("batch_norm" in k for k in names)


def test_train_mlp_resume_matches_uninterrupted(train_mlp, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_mlp.main([*TINY, "--steps", "60", "--checkpoint-every", "20", "--out", str(straight)])
    train_mlp.main([*TINY, "--steps", "40", "--checkpoint-every", "20", "--out", str(resumed)])
    metrics = train_mlp.main(
        [*TINY, "--steps", "60", "--checkpoint-every", "20", "--out", str(resumed), "--resume"]
    )
    assert [h["step"] for h in metrics["history"]] == [20, 40, 60]  # history carried over
    a, b = _arrays(straight / "checkpoint.npz"), _arrays(resumed / "checkpoint.npz")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_train_mlp_resume_with_other_settings_fails(train_mlp, tmp_path):
    train_mlp.main([*TINY, "--steps", "20", "--out", str(tmp_path)])
    with pytest.raises(CheckpointError, match=r"lr: checkpoint has 0\.01, expected 0\.02"):
        train_mlp.main([*TINY, "--steps", "40", "--lr", "0.02", "--out", str(tmp_path), "--resume"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_mlp.main([*TINY, "--steps", "40", "--out", str(tmp_path / "none"), "--resume"])


def test_train_mlp_help(train_mlp, capsys):
    with pytest.raises(SystemExit) as info:
        train_mlp.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = "--no-batch-norm --hidden --activation --steps --batch-size --lr --optimizer"
    flags += " --seed --out --checkpoint-every --resume"
    for flag in flags.split():
        assert flag in text


def test_train_mlp_rejects_bad_hidden(train_mlp, capsys):
    with pytest.raises(SystemExit):
        train_mlp.main(["--hidden", "100,abc"])
    assert "expected comma-separated positive ints" in capsys.readouterr().err


@pytest.fixture(scope="module")
def paper_figure1():
    return _load("paper_figure1")


def test_paper_figure1_runs_end_to_end(paper_figure1, tmp_path, capsys):
    argv = ["--steps", "40", "--eval-every", "20", "--hidden", "2", "16", "--unit", "3"]
    results = paper_figure1.main([*argv, "--out", str(tmp_path), "--no-progress"])
    for name in ("with_batch_norm", "without_batch_norm"):
        r = results[name]
        assert r["step"] == [0, 20, 40]
        assert len(r["test_accuracy"]) == 3 and all(0 <= a <= 1 for a in r["test_accuracy"])
        pct = np.asarray(r["percentiles"])
        assert pct.shape == (3, 3) and np.all(np.diff(pct, axis=1) >= 0)
    assert [row["step"] for row in results["table"]] == [20, 40]
    md = (tmp_path / "figure1.md").read_text()
    assert md.count("\n") == 4 and "| 40 |" in md
    assert (tmp_path / "figure1.png").stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["table"] == results["table"]
    assert "figure:" in capsys.readouterr().out


def test_paper_figure1_percentiles_match_numpy(paper_figure1):
    import jax

    from jaxbn.mlp import MLP

    model = MLP((5, 8, 6, 3), activation="sigmoid")
    params, state = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (50, 5))
    got = paper_figure1.unit_percentiles(model, params, state, x, 2)
    pre = np.asarray(model.pre_activations(params, state, x, training=True)[-1])[:, 2]
    np.testing.assert_allclose(got, np.percentile(pre, [15, 50, 85]), rtol=1e-5, atol=1e-6)


def test_paper_figure1_rejects_bad_unit(paper_figure1, tmp_path):
    with pytest.raises(ValueError, match=r"--unit must be in \[0, 100\), got 100"):
        paper_figure1.main(["--unit", "100", "--out", str(tmp_path)])

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

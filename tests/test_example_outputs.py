"""The examples never write over a previous run's outputs without being told to.

The studies (``paper_figure1.py``, ``study_eval_stats.py``) refuse an ``--out`` that
holds a previous run unless ``--overwrite`` is given, and each study model has a
default folder of its own; ``train_mlp.py --overwrite`` never leaves one run's
checkpoint beside another run's metrics, however it is interrupted.
"""

import json

import numpy as np
import pytest

from jaxbn.checkpoint import read_metadata


@pytest.fixture(scope="module")
def study(load_example):
    return load_example("study_eval_stats")


@pytest.fixture(scope="module")
def figure1(load_example):
    return load_example("paper_figure1")


STUDY = ["--steps", "12", "--chunk", "5", "--seeds", "2", "--hidden", "16", "--batch-size", "64"]
CNN_STUDY = ["--model", "cnn", "--channels", "4,8", "--steps", "10", "--chunk", "5", "--seeds", "1"]
FIGURE1 = ["--steps", "4", "--eval-every", "2", "--hidden", "1", "8", "--unit", "0"]


def _refused(capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def _kept_unless_overwrite(capsys, main, argv, folder):
    """A second run into ``folder`` is refused and leaves it as it was; --overwrite replaces it."""
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert "results.json" in before
    err = _refused(capsys, main, [*argv, "--steps", "2"])
    assert "holds a previous run" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # untouched
    main([*argv, "--steps", "2", "--overwrite"])
    assert json.loads((folder / "results.json").read_text())["config"]["steps"] == 2


def test_a_previous_figure1_is_kept_unless_overwrite(figure1, tmp_path, capsys):
    argv = [*FIGURE1, "--out", str(tmp_path), "--no-progress"]
    figure1.main(argv)
    _kept_unless_overwrite(capsys, figure1.main, argv, tmp_path)


def test_each_study_model_runs_into_its_own_default_folder_kept_unless_overwrite(
    study, tmp_path, monkeypatch, capsys
):
    """Tiny runs of both models, each into its default folder; a rerun is refused."""
    monkeypatch.chdir(tmp_path)
    for argv, steps, shape in ((STUDY, [5, 10, 12], (2, 3)), (CNN_STUDY, [5, 10], (1, 2))):
        results = study.main([*argv, "--no-progress"])  # the CNN's is not refused: another folder
        assert results["steps"] == steps
        for name in study.METHODS:
            acc = np.asarray(results["accuracy"][name])
            assert acc.shape == shape and np.all((acc >= 0) & (acc <= 1))
        # After a few steps of momentum 0.999 the running averages are nearly the
        # initial 0 and 1; the precise statistics are those of the network.
        assert np.mean(results["accuracy"]["precise"]) > np.mean(results["accuracy"]["running"])
    folder, cnn_folder = tmp_path / "runs/study_eval_stats", tmp_path / "runs/study_eval_stats_cnn"
    mlp, cnn = (json.loads((f / "results.json").read_text()) for f in (folder, cnn_folder))
    assert (mlp["config"]["model"], cnn["config"]["model"]) == ("mlp", "cnn")
    assert cnn["accuracy"] == results["accuracy"]  # the last run's, as saved
    assert (folder / "eval_stats.png").stat().st_size > 0
    assert "precise" in (folder / "eval_stats.md").read_text()
    assert "CNN 4-8" in (cnn_folder / "eval_stats.md").read_text()
    with pytest.raises(ValueError, match="--seeds"):
        study.main(["--seeds", "0", "--out", str(tmp_path / "other"), "--no-progress"])
    _kept_unless_overwrite(capsys, study.main, [*STUDY, "--no-progress"], folder)


@pytest.fixture(scope="module")
def train_mlp(load_example):
    return load_example("train_mlp")


TINY = ["--hidden", "16", "--batch-size", "50", "--log-every", "10", "--no-progress"]


def _interrupted(train_mlp, monkeypatch, argv, *, after_step):
    """Runs ``train_mlp`` and stops it (as Ctrl-C would) after the chunk ending at a step."""
    runner = train_mlp._runner
    real_fit = runner.fit

    def fit(*args, callback, **kwargs):
        def stop(ts, chunk):
            callback(ts, chunk)
            if int(ts.step) > after_step:
                raise KeyboardInterrupt

        return real_fit(*args, callback=stop, **kwargs)

    monkeypatch.setattr(runner, "fit", fit)
    with pytest.raises(KeyboardInterrupt):
        train_mlp.main(argv)
    monkeypatch.setattr(runner, "fit", real_fit)


def test_an_interrupted_overwrite_never_mixes_two_runs(train_mlp, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_mlp.main([*TINY, "--steps", "20", "--lr", "0.01", "--out", str(out)])
    first = json.loads((out / "metrics.json").read_text())
    assert first["config"]["lr"] == 0.01
    again = [*TINY, "--steps", "40", "--lr", "0.05", "--checkpoint-every", "20", "--out", str(out)]
    # Stopped before its first checkpoint: the previous run is whole.
    _interrupted(train_mlp, monkeypatch, [*again, "--overwrite"], after_step=10)
    assert json.loads((out / "metrics.json").read_text()) == first
    assert read_metadata(str(out / "checkpoint.npz"))["step"] == 20
    assert read_metadata(str(out / "checkpoint.npz"))["config"]["config"]["lr"] == 0.01
    # Stopped after it: its checkpoint alone, the previous metrics and curve gone.
    _interrupted(train_mlp, monkeypatch, [*again, "--overwrite"], after_step=20)
    assert read_metadata(str(out / "checkpoint.npz"))["config"]["config"]["lr"] == 0.05
    assert not (out / "metrics.json").exists() and not (out / "training_curve.png").exists()
    # That checkpoint resumes to a whole run of its own.
    metrics = train_mlp.main([*again, "--resume"])
    assert metrics["config"]["lr"] == 0.05 and metrics["steps"] == 40
    assert json.loads((out / "metrics.json").read_text())["config"]["lr"] == 0.05

"""End-to-end runs of examples/train_mlp.py (and its shared _runner.py) and
examples/paper_figure1.py, tiny settings."""

import contextlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxbn.data import load_digits
from jaxbn.train import TrainingDiverged

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


@pytest.fixture(scope="module")
def train_mlp(load_example):
    return load_example("train_mlp")


TINY = ["--hidden", "32,32", "--batch-size", "50", "--log-every", "20", "--no-progress"]


def _arrays(path):
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files if k.startswith("tree/")}


@pytest.fixture(scope="module")
def run_60(train_mlp, tmp_path_factory):
    """``(metrics, out, stdout)`` of one 60-step run checkpointed every 20 steps,
    shared by the tests that read such a run (it trains and compiles once)."""
    out = tmp_path_factory.mktemp("run_60") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        argv = [*TINY, "--steps", "60", "--checkpoint-every", "20", "--out", str(out)]
        metrics = train_mlp.main(argv)
    return metrics, out, stdout.getvalue()


def test_train_mlp_runs_end_to_end(run_60):
    metrics, out, stdout = run_60
    assert metrics["steps"] == 60
    assert [h["step"] for h in metrics["history"]] == [20, 40, 60]
    # Sixty steps already beat chance (10%) by far on the digits.
    assert metrics["final"]["test_accuracy"] > 0.5
    assert metrics["history"][-1]["train_loss"] < metrics["history"][0]["train_loss"]
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "training_curve.png").stat().st_size > 1000
    assert (out / "checkpoint.npz").exists()
    assert "final test accuracy" in stdout


def test_train_mlp_times_training_apart_from_evaluation_and_checkpoints(run_60):
    timing = run_60[0]["timing"]
    named = (
        "train_seconds",
        "train_seconds_of_first_calls",
        "evaluation_seconds",
        "checkpoint_seconds",
        "total_seconds",
    )
    for name in named:
        assert timing[name] > 0, name
    # The first chunk compiles; the two after it give the steady throughput.
    assert timing["train_seconds_of_first_calls"] < timing["train_seconds"]
    steady = timing["train_seconds"] - timing["train_seconds_of_first_calls"]
    np.testing.assert_allclose(timing["train_steps_per_second"], 40 / steady, rtol=1e-9)
    parts = timing["train_seconds"] + timing["evaluation_seconds"] + timing["checkpoint_seconds"]
    assert parts <= timing["total_seconds"]


def test_train_mlp_progress_bar_says_compiling_first(train_mlp, tmp_path, capsys):
    argv = [a for a in TINY if a != "--no-progress"]
    train_mlp.main([*argv, "--steps", "40", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "compiling" in err and "train" in err
    assert err.index("compiling") < err.index("train:")


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


DIAGNOSE_TINY = {
    "train_mlp": TINY,
    "train_cnn": ["--channels", "4,8", "--batch-size", "50", "--log-every", "20", "--no-progress"],
}


@pytest.mark.parametrize("script", DIAGNOSE_TINY)
def test_diagnose_prints_the_report_after_training(load_example, tmp_path, capsys, script):
    example = load_example(script)
    example.main([*DIAGNOSE_TINY[script], "--steps", "20", "--diagnose", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    model = "MLP" if script == "train_mlp" else "CNN"
    n_test = len(load_digits().y_test)
    assert f"batch-norm diagnosis: {model} on {n_test} examples, batch size 50" in out
    assert "verdict: " in out and out.index("verdict: ") < out.index("final test accuracy")


def test_diagnose_without_batch_norm_is_refused_first(train_mlp, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_mlp._runner, "fit", None)  # nothing trains or compiles
    with pytest.raises(SystemExit) as info:
        train_mlp.main([*TINY, "--no-batch-norm", "--diagnose", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "error: argument --diagnose: not with --no-batch-norm" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_each_variant_has_its_own_default_folder(train_mlp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train_mlp.main([*TINY, "--steps", "0"])
    train_mlp.main([*TINY, "--steps", "0", "--no-batch-norm"])
    with_bn = json.loads((tmp_path / "runs" / "train_mlp" / "metrics.json").read_text())
    without = json.loads((tmp_path / "runs" / "train_mlp_no_bn" / "metrics.json").read_text())
    assert (with_bn["config"]["batch_norm"], without["config"]["batch_norm"]) == (True, False)


def test_the_readme_commands_run_in_order_each_in_its_own_default_folder(train_mlp, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    # The README runs one device, then the same script on several: a folder each.
    monkeypatch.chdir(tmp_path)
    train_mlp.main([*TINY, "--steps", "0"])
    env = {
        **os.environ,
        "PYTHONPATH": str(EXAMPLES.parent),
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    two = subprocess.run(
        [sys.executable, EXAMPLES / "train_mlp.py", *TINY, "--steps", "0", "--devices", "2"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr
    assert "outputs in runs/train_mlp_2_devices" in two.stdout
    runs = tmp_path / "runs"
    assert json.loads((runs / "train_mlp_2_devices" / "metrics.json").read_text())["devices"] == 2
    assert json.loads((runs / "train_mlp" / "metrics.json").read_text())["devices"] == 1


def test_a_run_of_one_chunk_reports_its_throughput_and_resuming_it_says_so(
    train_mlp, tmp_path, capsys
):
    argv = [*TINY, "--steps", "20", "--out", str(tmp_path)]
    first = train_mlp.main(argv)
    # Every step ran in the call that compiled: the compilation JAX reports is left out.
    timing = first["timing"]
    assert 0 < timing["compile_seconds_of_first_calls"] < timing["train_seconds_of_first_calls"]
    run_seconds = timing["train_seconds"] - timing["compile_seconds_of_first_calls"]
    np.testing.assert_allclose(timing["train_steps_per_second"], 20 / run_seconds, rtol=1e-9)
    # A finished run resumed: nothing trains, its figures are kept.
    written = (tmp_path / "metrics.json").read_text()
    capsys.readouterr()
    again = train_mlp.main([*argv, "--resume"])
    assert again == first and (tmp_path / "metrics.json").read_text() == written
    assert "already finished (step 20 of --steps 20)" in capsys.readouterr().out


def test_train_mlp_never_overwrites_a_previous_run(train_mlp, run_60, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_60[1], out)
    before = (out / "checkpoint.npz").read_bytes()
    with pytest.raises(SystemExit) as info:
        train_mlp.main([*TINY, "--steps", "20", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --out" in err and "--resume" in err and "--overwrite" in err
    assert (out / "checkpoint.npz").read_bytes() == before
    metrics = train_mlp.main([*TINY, "--steps", "20", "--out", str(out), "--overwrite"])
    assert metrics["steps"] == 20 and [h["step"] for h in metrics["history"]] == [20]


def test_train_mlp_resume_matches_uninterrupted(train_mlp, run_60, tmp_path):
    straight, resumed = run_60[1], tmp_path / "resumed"
    train_mlp.main([*TINY, "--steps", "40", "--checkpoint-every", "20", "--out", str(resumed)])
    metrics = train_mlp.main(
        [*TINY, "--steps", "60", "--checkpoint-every", "20", "--out", str(resumed), "--resume"]
    )
    assert [h["step"] for h in metrics["history"]] == [20, 40, 60]  # history carried over
    a, b = _arrays(straight / "checkpoint.npz"), _arrays(resumed / "checkpoint.npz")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


#: (flags, the error that must follow "error: "); A_FILE is a file, DONE a copy of the
#: finished 60-step run, both in the test's tmp_path; N_TRAIN the training split's size.
BAD_ARGUMENTS = {
    "batch-size-above-split": (
        ["--batch-size", "5000"],
        "argument --batch-size: expected at most the N_TRAIN examples of the training split, "
        "got 5000",
    ),
    "steps-negative": (["--steps", "-1"], "argument --steps: expected an int >= 0, got '-1'"),
    "checkpoint-every-negative": (
        ["--checkpoint-every", "-1"],
        "argument --checkpoint-every: expected an int >= 0, got '-1'",
    ),
    "log-every-zero": (["--log-every", "0"], "argument --log-every: expected an int >= 1"),
    "lr-nan": (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    "lr-inf": (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    "lr-zero": (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    "lr-negative": (["--lr", "-0.1"], "argument --lr: expected a finite number > 0"),
    "seed-negative": (["--seed", "-1"], "argument --seed: expected an int >= 0"),
    "seed-too-large": (["--seed", str(2**32)], "argument --seed: expected an int in [0, 2**32)"),
    "devices-zero": (["--devices", "0"], "argument --devices: expected an int >= 1"),
    "out-is-a-file": (["--out", "A_FILE"], "argument --out: 'A_FILE' is a file"),
    "out-under-a-file": (["--out", "A_FILE/run"], "argument --out: cannot create 'A_FILE/run'"),
    "resume-without-checkpoint": (["--resume"], "argument --resume: there is no checkpoint"),
    "resume-and-overwrite": (
        ["--resume", "--overwrite"],
        "argument --overwrite: not allowed with --resume",
    ),
    "resume-below-the-checkpoint": (
        ["--resume", "--steps", "10", "--out", "DONE"],
        "argument --steps: the checkpoint 'DONE/checkpoint.npz' is at step 60; "
        "expected --steps >= 60, got 10",
    ),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_train_mlp_checks_every_argument_first(
    train_mlp, tmp_path, capsys, monkeypatch, request, case
):
    paths = {"A_FILE": str(tmp_path / "a_file"), "DONE": str(tmp_path / "done")}
    paths["N_TRAIN"] = str(len(load_digits().y_train))
    (tmp_path / "a_file").write_text("not a folder")
    if case == "resume-below-the-checkpoint":  # a finished 60-step run
        shutil.copytree(request.getfixturevalue("run_60")[1], paths["DONE"])
    flags, message = BAD_ARGUMENTS[case]
    for name, path in paths.items():
        flags = [f.replace(name, path) for f in flags]
        message = message.replace(name, path)
    if "--out" not in flags:
        flags = [*flags, "--out", str(tmp_path / "out")]
    monkeypatch.setattr(train_mlp._runner, "fit", None)  # nothing trains or compiles
    with pytest.raises(SystemExit) as info:
        train_mlp.main([*TINY, *flags])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: " + message in err  # no usage block
    assert not (tmp_path / "out").exists()  # --out is not created


def test_failed_run_leaves_no_empty_out(train_mlp, tmp_path):
    out = tmp_path / "diverges"
    argv = [*TINY, "--no-batch-norm", "--optimizer", "sgd", "--lr", "1e8", "--steps", "200"]
    with pytest.raises(TrainingDiverged):
        train_mlp.main([*argv, "--checkpoint-every", "0", "--out", str(out)])
    assert not out.exists()


def test_resume_with_other_settings_is_refused_in_one_line(train_mlp, tmp_path):
    """As a script: a resume the checkpoint refuses prints one line naming the difference."""
    out = tmp_path / "run"
    argv = [*TINY, "--steps", "20", "--out", str(out)]
    train_mlp.main(argv)
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    script = EXAMPLES / "train_mlp.py"
    resumed = subprocess.run(
        [sys.executable, script, *argv, "--lr", "0.02", "--resume", "--steps", "40"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 1
    assert resumed.stderr.startswith("error: checkpoint")
    assert "config.lr: checkpoint has 0.01, expected 0.02" in resumed.stderr
    assert "Traceback" not in resumed.stderr and resumed.stderr.count("\n") == 1


def test_train_mlp_help(train_mlp, capsys):
    with pytest.raises(SystemExit) as info:
        train_mlp.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = "--no-batch-norm --hidden --activation --steps --batch-size --lr --optimizer"
    flags += " --seed --out --checkpoint-every --resume --overwrite --devices"
    for flag in flags.split():
        assert flag in text


@pytest.mark.parametrize("hidden", ["100,abc", "100,,100", "100,", "0"])
def test_train_mlp_rejects_bad_hidden(train_mlp, capsys, hidden):
    with pytest.raises(SystemExit):
        train_mlp.main(["--hidden", hidden])
    assert "expected comma-separated positive ints" in capsys.readouterr().err


@pytest.fixture(scope="module")
def paper_figure1(load_example):
    return load_example("paper_figure1")


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

"""The chart script draws the committed benchmark results."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plot_results_draws_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(
        "plot_results", ROOT / "benchmarks" / "plot_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "chart.png"
    results = ROOT / "benchmarks" / "results"
    module.main(
        [
            "--op",
            str(results / "op.json"),
            "--train",
            str(results / "train.json"),
            "--out",
            str(out),
        ]
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""The chart script draws bench_op.py's and bench_train.py's results."""

import json

import pytest


def test_plot_results_draws_op_and_train_results(import_benchmark, tmp_path):
    pytest.importorskip("matplotlib")
    plot = import_benchmark("plot_results")
    op = {
        "cases": [
            {
                "name": "batch_norm_8x4_float32",
                "jaxbn_over_floor": 2.0,
                "contenders": {"jaxbn": {"ratio_to_jaxbn": 1.0}, "flax": {"ratio_to_jaxbn": 1.5}},
            }
        ],
        "machine": {"cpu": "test", "cores": 2, "date": "2026-12-06"},
    }
    train = {
        "models": [
            {
                "name": "paper",
                "contenders": {
                    "jaxbn-scan": {"speed_ratio": 1.0},
                    "flax-jit": {"speed_ratio": 0.8},
                },
            }
        ]
    }
    paths = {k: tmp_path / f"{k}.json" for k in ("op", "train")}
    paths["op"].write_text(json.dumps(op))
    paths["train"].write_text(json.dumps(train))
    out = tmp_path / "chart.png"
    plot.main(["--op", str(paths["op"]), "--train", str(paths["train"]), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

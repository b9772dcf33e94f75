"""Smoke test of ``benchmarks/bench_fused.py``: a tiny network, structure only.

No timing or memory target is asserted (the sizes are far from the benchmark's);
the test checks that the three contenders ran, took the same step (up to the
fused layer's ``|scale| + eps``), reported positive memory and speed and the
paired fused/unfused ratio, and that the JSON file is written.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


@pytest.fixture(scope="module")
def quick_results(import_benchmark, tmp_path_factory):
    bench = import_benchmark("bench_fused")
    path = tmp_path_factory.mktemp("bench") / "fused.json"
    return bench.main(["--quick", "--json", str(path)]), path


def test_fused_results_structure(quick_results):
    results, path = quick_results
    entries = results["results"]["contenders"]
    assert list(entries) == ["jaxbn-fused", "jaxbn-unfused", "flax"]
    have_flax = importlib.util.find_spec("flax") is not None
    for name, e in entries.items():
        if name == "flax" and not have_flax:
            assert e["steps_per_s"] is None and "not installed" in e["note"]
            continue
        assert math.isfinite(e["steps_per_s"]) and e["steps_per_s"] > 0, name
        assert e["memory"]["temp_bytes"] > 0 and e["memory"]["output_bytes"] > 0, name
        assert e["rel_err"] < 1e-3, name  # the same SGD step from the same start
        assert len(e["times_s"]) == 2  # interleaved rounds: paired for the ratio
    assert results["fused_vs_unfused_steps"] > 0
    if have_flax:
        assert entries["jaxbn-fused"]["memory"]["temp_vs_flax"] > 0
    written = json.loads(path.read_text())
    assert written["case"] == results["case"] == "mlp_16-32-32-4_leaky_relu_b16_float32"


def test_fused_cnn_results_structure(import_benchmark, tmp_path):
    """``--model cnn``: bench_cnn.py's CNN with leaky ReLU, the same three contenders."""
    bench = import_benchmark("bench_fused")
    path = tmp_path / "fused_cnn.json"
    results = bench.main(["--model", "cnn", "--quick", "--json", str(path)])
    assert results["model"] == "cnn" and results["case"] == "cnn_2x4_6x6x3_b8_float32"
    entries = results["results"]["contenders"]
    assert list(entries) == ["jaxbn-fused", "jaxbn-unfused", "flax"]
    for name, e in entries.items():
        if e["steps_per_s"] is None:  # flax not installed
            assert name == "flax" and "not installed" in e["note"]
            continue
        assert e["memory"]["temp_bytes"] > 0, name
        assert e["rel_err"] < 1e-3, name
    assert json.loads(path.read_text())["case"] == results["case"]

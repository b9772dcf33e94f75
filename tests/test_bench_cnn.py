"""Smoke test of ``benchmarks/bench_cnn.py``: a tiny CNN, tiny runs, structure only.

No timing is asserted; the test checks that every contender that could run
(PyTorch in its own process) produced a positive, finite steps/s and took the
same first step as jaxbn, that the compiled-step memory figures are filled in
and that the convolution diagnostic ran.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest


@pytest.fixture(scope="module")
def bench_cnn(import_benchmark):
    """``benchmarks/bench_cnn.py``."""
    return import_benchmark("bench_cnn")


@pytest.fixture(scope="module")
def quick_results(bench_cnn, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "cnn.json"
    argv = ["--quick", "--conv-diagnostic", "--json", str(path)]
    return bench_cnn.main(argv), path


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_cnn_results_structure(quick_results):
    results, _ = quick_results
    res = results["results"]
    assert res["case"] == "cnn_2x4_6x6x3_b8_float32"
    entries = res["contenders"]
    assert sorted(entries) == sorted(["jaxbn-scan", "jaxbn-jit", "flax-jit", "torch-eager"])
    for name, entry in entries.items():
        module = {"flax-jit": "flax", "torch-eager": "torch"}.get(name)
        if module is not None and not _installed(module):
            assert entry["steps_per_s"] is None and "not installed" in entry["note"]
            continue
        assert math.isfinite(entry["steps_per_s"]) and entry["steps_per_s"] > 0, name
        assert entry["reps"] == 2, name
        assert math.isfinite(entry["speed_ratio"]), name
        if "rel_err" in entry:  # the same first step from the same start as jaxbn-jit
            assert entry["rel_err"] < 1e-3, name
    assert "rel_err" in entries["jaxbn-jit"]
    if _installed("torch"):
        assert "own process" in entries["torch-eager"]["note"]
        assert "rel_err" in entries["torch-eager"]


def test_cnn_memory_and_json(quick_results):
    results, path = quick_results
    entries = results["results"]["contenders"]
    mem = entries["jaxbn-jit"]["memory"]
    assert mem["temp_bytes"] > 0 and mem["argument_bytes"] > 0
    if _installed("flax"):
        assert mem["temp_vs_flax"] > 0 and entries["flax-jit"]["memory"]["temp_vs_flax"] == 1
    written = json.loads(path.read_text())
    assert written["results"]["case"] == results["results"]["case"]


def test_conv_diagnostic(quick_results):
    """The diagnostic ran both convolutions; only jaxbn's is canonical inside the scan."""
    results, _ = quick_results
    diag = results["conv_diagnostic"]
    for name in ("autodiff", "jaxbn"):
        assert diag[name]["per_call_ms"] > 0 and diag[name]["scan_ms"] > 0
    assert diag["jaxbn"]["scan_conv_forms"] == ["b01f_01io->b01f"]
    assert set(diag["autodiff"]["scan_conv_forms"]) != {"b01f_01io->b01f"}

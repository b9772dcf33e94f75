"""Smoke test of ``benchmarks/bench_train.py``: the paper MLP, tiny runs, structure only.

No timing is asserted; the test checks that every contender that could run
produced a positive, finite steps/s and agrees with jaxbn after one step,
that the compiled-step memory numbers are positive, and that a peer that is
not installed is reported with a note instead of failing the run.
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

PEERS = {"flax-jit": "flax", "torch-eager": "torch"}
CONTENDERS = [
    "jaxbn-scan",
    "jaxbn-jit",
    "jaxbn-remat-jit",
    "reference-jit",
    *PEERS,
]


@pytest.fixture(scope="module")
def bench_train(import_benchmark):
    """``benchmarks/bench_train.py``."""
    return import_benchmark("bench_train")


@pytest.fixture(scope="module")
def quick_results(bench_train, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "train.json"
    argv = ["--quick", "--models", "paper", "--reps", "2", "--json", str(path)]
    return bench_train.main(argv), path


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_train_results_structure(quick_results):
    results, _ = quick_results
    assert results["machine"]["cores"] >= 1
    assert [m["name"] for m in results["models"]] == ["paper"]
    (model,) = results["models"]
    assert model["case"] == "mlp_64-100-100-100-10_sigmoid_b60_float32"
    entries = model["contenders"]
    assert sorted(entries) == sorted(CONTENDERS)
    assert entries["jaxbn-scan"]["speed_ratio"] == 1.0
    for name, entry in entries.items():
        module = PEERS.get(name)
        if module is not None and not _installed(module):
            assert entry["steps_per_s"] is None and "not installed" in entry["note"]
            continue
        assert math.isfinite(entry["steps_per_s"]) and entry["steps_per_s"] > 0, name
        assert entry["reps"] == 2, name
        assert math.isfinite(entry["speed_ratio"]), name
        if "rel_err" in entry:  # the same step from the same start as jaxbn-jit
            assert entry["rel_err"] < 1e-3, name
    for name in ("reference-jit", "flax-jit", "torch-eager"):  # each checked after one step
        if name == "reference-jit" or _installed(PEERS[name]):
            assert "rel_err" in entries[name], name
    if _installed("torch"):  # timed apart: its OpenMP threads spin after a call
        assert "own process" in entries["torch-eager"]["note"]


def test_train_memory(quick_results):
    results, _ = quick_results
    entries = results["models"][0]["contenders"]
    for name in ("jaxbn-jit", "jaxbn-remat-jit", "reference-jit", "flax-jit"):
        if name == "flax-jit" and not _installed("flax"):
            continue
        mem = entries[name]["memory"]
        for key in ("temp_bytes", "argument_bytes", "output_bytes"):
            assert mem[key] > 0, (name, key)
        if _installed("flax"):
            assert math.isfinite(mem["temp_vs_flax"]) and mem["temp_vs_flax"] > 0


def test_train_json(quick_results):
    results, path = quick_results
    written = json.loads(path.read_text())
    assert written["models"][0]["case"] == results["models"][0]["case"]


def test_unknown_model_is_rejected(bench_train):
    with pytest.raises(SystemExit):
        bench_train.main(["--quick", "--models", "huge"])

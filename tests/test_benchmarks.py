"""Smoke tests of the benchmark scripts: tiny shapes, few repetitions, structure only.

No timing is asserted (timed unit tests are flaky by nature); the tests check
that every contender ran, produced a positive finite time and agrees with
jaxbn, and that the ratios and the floor were filled in. A peer that is not
installed is skipped by the script itself and must show up with a note.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench_op(import_benchmark):
    """``benchmarks/bench_op.py``."""
    return import_benchmark("bench_op")


@pytest.fixture(scope="module")
def quick_results(bench_op, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "op.json"
    argv = ["--quick", "--shapes", "32x8", "2x3x3x4:bfloat16", "--json", str(path)]
    return bench_op.main(argv), path


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_op_results_structure(quick_results):
    results, _ = quick_results
    assert results["copy_bandwidth_Bps"] > 0
    assert results["machine"]["cores"] >= 1
    names = [c["name"] for c in results["cases"]]
    assert names == ["batch_norm_32x8_float32", "batch_norm_2x3x3x4_bfloat16"]
    for case in results["cases"]:
        assert 0 < case["floor_s"] <= case["floor_fresh_s"]
        assert math.isfinite(case["jaxbn_over_floor"]) and case["jaxbn_over_floor"] > 0
        entries = case["contenders"]
        assert entries["jaxbn"]["ratio_to_jaxbn"] == 1.0
        for name, entry in entries.items():
            if entry["median_s"] is None:  # a peer that cannot run this case
                assert entry["note"], name
                continue
            assert math.isfinite(entry["median_s"]) and entry["median_s"] > 0, name
            assert entry["reps"] == 3
            assert math.isfinite(entry["ratio_to_jaxbn"]) and entry["ratio_to_jaxbn"] > 0
            tol = 1e-4 if case["dtype"] == "float32" else 3e-2
            assert entry["max_rel_err"] < tol, (name, entry["max_rel_err"])


@pytest.mark.parametrize("peer", ["reference", "flax", "torch"])
def test_op_peer_present_or_noted(quick_results, peer):
    results, _ = quick_results
    if peer != "reference" and not _installed(peer):
        pytest.skip(f"{peer} is not installed")
    case = results["cases"][0]  # float32: every installed peer supports it
    assert case["contenders"][peer]["median_s"] is not None


def test_op_absent_peers_are_skipped_with_a_note(quick_results):
    results, _ = quick_results
    for module in ("equinox", "haiku"):
        assert (module in results["skipped"]) == (not _installed(module))


def test_op_json_written(quick_results):
    results, path = quick_results
    on_disk = json.loads(path.read_text())
    assert [c["name"] for c in on_disk["cases"]] == [c["name"] for c in results["cases"]]


def test_op_parse_case(bench_op):
    assert bench_op.parse_case("128x32x32x64:bfloat16").shape == (128, 32, 32, 64)
    assert bench_op.parse_case("16x4").dtype == "float32"


def test_op_torch_timed_in_its_own_process(bench_op, monkeypatch):
    # PyTorch's OpenMP threads keep spinning after a call: timed in the same
    # process, they would slow whatever JAX contender runs next.
    if not _installed("torch"):
        pytest.skip("torch is not installed")
    calls = []
    real_run = subprocess.run

    def spy(cmd, *args, **kwargs):
        calls.append(list(cmd))
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(bench_op.subprocess, "run", spy)
    res = bench_op.run_case(bench_op.parse_case("16x4"), ["jaxbn", "torch"], reps=3, warmup=1)
    assert any("--torch-worker" in c for c in calls), calls
    entry = res["contenders"]["torch"]
    assert entry["median_s"] is not None and entry["median_s"] > 0, entry
    assert entry["max_rel_err"] < 1e-4


def test_op_runs_on_a_named_platform_with_its_bandwidth(bench_op):
    import jax

    results = bench_op.main(
        ["--quick", "--platform", "cpu", "--shapes", "16x4", "--contenders", "jaxbn"]
    )
    assert results["device"].startswith("cpu")
    # The floor's bandwidth on an accelerator: exercised here on the CPU device.
    bandwidth = bench_op.device_copy_bandwidth(jax.devices("cpu")[0], 1 << 20, reps=3)
    assert math.isfinite(bandwidth) and bandwidth > 0


ACCEL = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_accelerator.sh"


def test_accelerator_script_passes_flags_each_benchmark_accepts(import_benchmark):
    subprocess.run(["bash", "-n", str(ACCEL)], check=True)
    text = ACCEL.read_text()
    assert "NOT YET RUN ON A GPU" in text
    modules = {"op": "bench_op", "train": "bench_train", "fused": "bench_fused", "cnn": "bench_cnn"}
    seen = []
    for name, flags in re.findall(r"^\s*(op|train|fused|cnn)=\((.*)\)\s*$", text, re.M):
        parser = import_benchmark(modules[name])._parser()
        parser.parse_args([*shlex.split(flags), "--json", "out.json"])  # exits on a bad flag
        seen.append(name)
    assert sorted(seen) == sorted(2 * list(modules))  # the GPU run and --cpu-smoke


def test_accelerator_script_refuses_to_run_without_a_gpu(tmp_path):
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present: the script would run the full benchmarks")
    out = tmp_path / "accelerator-out"
    proc = subprocess.run(
        ["bash", str(ACCEL)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT_DIR=str(out)),
        timeout=120,
    )
    assert proc.returncode == 1
    assert "no GPU visible" in proc.stderr
    assert not out.exists()  # a refused run leaves no empty results folder behind


def test_waiting_for_idle_cpus_does_not_wait_for_this_process(import_benchmark, monkeypatch):
    # Every busy jiffy in the window is this process's own (spinning pool threads):
    # the machine counts as idle. The same busy time from another process does not.
    common = import_benchmark("_common")
    clock = {"busy": 0, "total": 0, "own": 0}

    def ticks():
        return clock["busy"], clock["total"]

    def sleep(_):
        clock["busy"] += 10
        clock["total"] += 10
        clock["own"] += 10 if own_work else 0

    monkeypatch.setattr(common, "_cpu_ticks", ticks)
    monkeypatch.setattr(common, "_own_ticks", lambda: clock["own"])
    monkeypatch.setattr(common.time, "sleep", sleep)
    own_work = True
    assert common.wait_for_idle(timeout=0.0)
    own_work = False
    assert not common.wait_for_idle(timeout=0.0)


def test_quiet_timing_runs_an_untimed_call_right_before_each_timed_one(
    import_benchmark, monkeypatch
):
    common = import_benchmark("_common")
    log = []

    def wait(**_):
        log.append("wait")
        return True

    monkeypatch.setattr(common, "wait_for_idle", wait)
    clock = iter(range(1000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))

    def fn():
        log.append("call")

    timing = common.time_calls(fn, reps=3, warmup=2, quiet=True)
    assert len(timing.times) == 3
    # Warm-up calls, then per repetition: wait, an untimed call, the timed call.
    assert log == ["call"] * 2 + ["wait", "call", "call"] * 3
    # The timed call is the one between the clock's two reads: one call per window.
    assert timing.times == [1, 1, 1]
    log.clear()
    common.time_calls(fn, reps=3, warmup=2, quiet=True, warm=lambda: log.append("warm"))
    assert log == ["call"] * 2 + ["wait", "warm", "call"] * 3
    log.clear()
    common.time_calls(fn, reps=3, warmup=2, quiet=False)
    assert log == ["call"] * 5

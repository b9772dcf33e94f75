"""Smoke tests of the benchmark harness, the op benchmark and run_all.py: structure only.

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
import subprocess
import sys
from pathlib import Path

import pytest

RUN_ALL = Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def bench_op(import_benchmark):
    """``benchmarks/bench_op.py``."""
    return import_benchmark("bench_op")


@pytest.fixture(scope="module")
def quick_results(bench_op, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "op.json"
    argv = ["--quick", "--shapes", "32x8", "2x3x3x4:bfloat16", "--json", str(path)]
    return bench_op.main(argv), path


def test_op_results_structure(quick_results):
    results, path = quick_results
    assert results["copy_bandwidth_Bps"] > 0
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["command"].startswith("python benchmarks/bench_op.py --quick")
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
    # Every installed peer runs float32.
    float32 = results["cases"][0]["contenders"]
    for peer in ("reference", "flax", "torch"):
        if peer == "reference" or _installed(peer):
            assert float32[peer]["median_s"] is not None, peer
    if _installed("torch"):  # timed apart: its OpenMP threads spin after a call
        assert "own process" in float32["torch"]["note"]
    for module in ("equinox", "haiku"):
        assert (module in results["skipped"]) == (not _installed(module))
    on_disk = json.loads(path.read_text())
    assert [c["name"] for c in on_disk["cases"]] == names


def test_op_parse_case(bench_op):
    assert bench_op.parse_case("128x32x32x64:bfloat16") == ((128, 32, 32, 64), "bfloat16")
    assert bench_op.parse_case("16x4")[1] == "float32"


def test_op_runs_on_a_named_platform_with_its_bandwidth(bench_op):
    import jax

    results = bench_op.main(
        ["--quick", "--platform", "cpu", "--shapes", "16x4", "--contenders", "jaxbn"]
    )
    assert results["machine"]["device"].startswith("cpu")
    # The floor's bandwidth: np.copyto on the CPU, the same call on every device.
    bandwidth = bench_op.bandwidth(jax.devices("cpu")[0], 1 << 20, reps=3, quiet=False)
    assert math.isfinite(bandwidth) and bandwidth > 0


def test_in_own_process_runs_the_worker_in_a_new_process(import_benchmark):
    common = import_benchmark("_common")
    result, arrays = common.in_own_process(_worker, {"scale": 2.0}, {"a": _ones()})
    assert result["pid"] != os.getpid()
    assert arrays["a"].tolist() == [2.0, 2.0]
    with pytest.raises(common.Unavailable, match="failed: ZeroDivisionError"):
        common.in_own_process(_worker, {"scale": 0.0}, {"a": _ones()})


def _ones():
    import numpy as np

    return np.ones(2)


def _worker(spec, arrays):
    """A worker for :func:`_common.in_own_process` (run in the child)."""
    1 / spec["scale"]
    return {"pid": os.getpid()}, {"a": arrays["a"] * spec["scale"]}


def test_run_all_runs_every_benchmark_with_its_json(import_benchmark, tmp_path):
    run_all = import_benchmark("run_all")
    cpu = run_all.commands(gpu=False, quick=True, out=str(tmp_path))
    assert sorted(cpu) == sorted(run_all.RUNS)
    gpu = run_all.commands(gpu=True, quick=False, out=str(tmp_path))
    assert "parallel" not in gpu and "--platform" in gpu["op"]
    assert not any(c.startswith("torch") for c in gpu["train"])
    for cmd in [*cpu.values(), *gpu.values()]:  # each script accepts its flags
        module = import_benchmark(os.path.basename(cmd[1])[:-3])
        module._parser().parse_args(cmd[2:])


def test_run_all_refuses_to_run_without_a_gpu(tmp_path):
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present: the script would run the full benchmarks")
    out = tmp_path / "gpu-out"
    proc = subprocess.run(
        [sys.executable, str(RUN_ALL), "--gpu", "--out", str(out)],
        capture_output=True,
        text=True,
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

    def sleep(_):
        clock["busy"] += 10
        clock["total"] += 10
        clock["own"] += 10 if own_work else 0

    monkeypatch.setattr(common, "_cpu_ticks", lambda: (clock["busy"], clock["total"]))
    monkeypatch.setattr(common, "_own_ticks", lambda: clock["own"])
    monkeypatch.setattr(common.time, "sleep", sleep)
    own_work = True
    assert common.wait_for_idle(timeout=0.0)
    own_work = False
    assert not common.wait_for_idle(timeout=0.0)


def test_interleaved_timing(import_benchmark, monkeypatch):
    common = import_benchmark("_common")
    log = []

    def wait(**_):
        log.append("wait")
        return True

    monkeypatch.setattr(common, "wait_for_idle", wait)
    clock = iter(range(1000))
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    runs = {name: lambda n, name=name: log.append(f"{name}{n}") for name in "ab"}
    out = common.interleave(runs, reps=3, warmup=2, quiet=True, granularity={"b": 2})
    # Warm-up runs, then per round and contender: wait, an untimed run, the timed run.
    rounds = ["wait", "a1", "a1", "wait", "b2", "b2"]
    assert log == ["a1", "a1", "b2", "b2", *rounds * 3]
    # The timed run is the one between the clock's two reads: one tick per run.
    assert out["a"]["times_s"] == [1, 1, 1] and out["b"]["steps_per_run"] == 2
    assert out["b"]["median_s"] == 0.5 and out["b"]["steps_per_s"] == 2
    log.clear()
    common.interleave({"a": runs["a"]}, reps=2, warmup=0, quiet=False)
    assert log == ["a1", "a1"]


def test_frameworks_benchmark_times_each_module_against_its_framework(import_benchmark, tmp_path):
    """Structure only (no timing asserted): every framework ran, both contenders agree."""
    bench = import_benchmark("bench_frameworks")
    results = bench.main(["--quick", "--json", str(tmp_path / "frameworks.json")])
    names = [case["name"] for case in results["cases"]]
    assert [n.split("_")[2] for n in names] == ["nnx", "linen", "equinox"], names
    for case in results["cases"]:
        assert set(case["contenders"]) == {"jaxbn", case["peer"]}
        assert all(c["median_s"] > 0 for c in case["contenders"].values())
        assert case["jaxbn_over_peer"] > 0
        assert case["max_param_difference_after_one_step"] < 1e-5


def test_multiprocess_benchmark_runs_both_configurations(import_benchmark):
    bench = import_benchmark("bench_multiprocess")
    results = bench.main(["--steps-per-chunk", "2", "--repeats", "1"])
    for name in ("1x4", "2x2"):
        assert results[name]["median_s"] > 0
        # One all-reduce set per batch-norm layer and one for the loss: the same
        # program whether or not the devices belong to one process.
        assert results[name]["all_reduces"] == results["1x4"]["all_reduces"] > 0

"""Smoke test of benchmarks/bench_parallel.py on the forced CPU devices: structure only.

No timing is asserted; the test checks that every device count ran, produced
positive finite times and all-reduce counts, and that the JSON file is written.
"""

import json
import math

import jax
import pytest

if jax.device_count() < 2:  # pragma: no cover - conftest.py sets eight
    pytest.skip("needs several devices (XLA_FLAGS)", allow_module_level=True)


@pytest.fixture(scope="module")
def bench_parallel(import_benchmark):
    """``benchmarks/bench_parallel.py``."""
    return import_benchmark("bench_parallel")


def test_quick_run_structure(bench_parallel, tmp_path):
    path = tmp_path / "parallel.json"
    results = bench_parallel.main(["--quick", "--devices", "1", "2", "--json", str(path)])
    assert results["device_count"] == jax.device_count()
    assert "not scaling" in results["note"]
    (case,) = results["cases"]
    assert [r["devices"] for r in case["rows"]] == [1, 2]
    one, two = case["rows"]
    for row in (one, two):
        for key in ("scan_s_per_step", "step_s"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    assert one["all_reduces_step"] == 0  # one device, no shard_map
    assert math.isfinite(two["local_s"]) and two["local_s"] > 0
    # Synchronized batch norm adds all-reduces to the per-device-statistics step.
    assert two["all_reduces_step"] > two["all_reduces_local"] >= 1
    assert math.isfinite(two["sync_cost_s"])
    assert json.loads(path.read_text())["cases"][0]["name"] == case["name"]


def test_count_all_reduces(import_benchmark):
    text = (
        "%a = f32[4] all-reduce(%x), to_apply=%add\n"
        "%all-reduce.1 = (f32[2], f32[]) all-reduce(%y, %z), to_apply=%add\n"
        "%s = f32[4] all-reduce-start(%w)\n"
        "%d = f32[4] all-reduce-done(%s)\n"
    )
    assert import_benchmark("_common").count_all_reduces(text) == 3

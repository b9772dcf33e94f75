"""Runs the multi-device tests in a subprocess with 8 forced CPU devices.

``XLA_FLAGS`` must be set before JAX is imported, which this process has already
done; the tests themselves are in ``tests/multidevice/md_*.py``.
"""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_multidevice_suite():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    files = sorted(str(p) for p in (HERE / "multidevice").glob("md_*.py"))
    assert files, "no multi-device test files found"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert " passed" in proc.stdout

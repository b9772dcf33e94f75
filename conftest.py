"""Test collection settings shared by every test run."""

import glob
import importlib
import os
import sys

import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

ROOT = os.path.dirname(os.path.abspath(__file__))
collect_ignore = []
try:
    import flax  # noqa: F401
except ImportError:
    # jaxbn/interop.py needs flax, an optional extra: no doctests from it without flax.
    collect_ignore.append("jaxbn/interop.py")

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # These need several devices, set up before JAX is imported: tests/test_multidevice.py
    # runs them in a subprocess of their own.
    collect_ignore.append("tests/multidevice")
# Scripts run as separate processes by tests/test_multiprocess.py, not imported here;
# the docs' build scripts and hooks are not modules with doctests either.
collect_ignore += ["tests/multiprocess", *glob.glob("docs/*.py", root_dir=ROOT)]

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")


@pytest.fixture(scope="session")
def import_benchmark():
    """Returns ``load(name)``, which imports ``benchmarks/<name>.py``.

    ``benchmarks/`` is a folder of scripts, not a package: its folder is put on
    ``sys.path`` for the test session (the scripts import their shared helpers).
    """
    sys.path.insert(0, BENCH_DIR)
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(BENCH_DIR)


# Every ```python block of the README (and of docs/*.md) runs as a test, in order, top
# to bottom, in one namespace per document: the code in the documentation runs as written.
readme_blocks = Sybil(
    parsers=[PythonCodeBlockParser()],
    patterns=["README.md", "docs/*.md"],
)
pytest_collect_file = readme_blocks.pytest()

"""Test collection settings shared by every test run."""

import glob
import importlib
import importlib.util
import os
import sys

import jax
import numpy as np
import pytest
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

ROOT = os.path.dirname(os.path.abspath(__file__))
collect_ignore = []
# The framework adapters need optional extras (both are in the `test` extra, so CI
# collects everything); a user without one still runs the rest of the suite: the
# adapter's doctests are not collected and its tests skip (pytest.importorskip).
_ADAPTERS = {
    "flax": [
        "jaxbn/nnx.py",
        "jaxbn/linen.py",
        "jaxbn/interop.py",
    ],
    "equinox": ["jaxbn/equinox.py"],
}
for _framework, _paths in _ADAPTERS.items():
    if importlib.util.find_spec(_framework) is None:
        collect_ignore.extend(_paths)

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Eight CPU devices for the multi-device tests (tests/multidevice), set before JAX
    # creates its backend; computations without a mesh still run on the first device.
    # A config option rather than XLA_FLAGS: the scripts the tests start as processes
    # see the machine as it is.
    jax.config.update("jax_num_cpu_devices", 8)

# LLVM's optimization of the compiled CPU code costs a fifth of the suite's CPU time (half
# of the CNN tests'). Level 0 changes neither the HLO nor the compiled memory that tests
# check, and results only to rounding, within the tests' tolerances. It is set in the
# environment, before JAX creates its backend, so the scripts the tests start compile the
# same way. A level given in XLA_FLAGS is kept:
# `XLA_FLAGS=--xla_backend_optimization_level=2 pytest ...` runs the suite at the default.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# Compiled programs are kept on disk, shared by the test workers and by the scripts the
# tests start (through the environment): many tests compile the same program. JAX keys
# each entry by the program, the backend and its own version.
_CACHE = {
    "jax_compilation_cache_dir": os.path.join(ROOT, ".jax_cache"),
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _CACHE.items():
    jax.config.update(_name, _value)
    os.environ.setdefault(_name.upper(), str(_value))
# Scripts run as separate processes by tests/test_multiprocess.py, not imported here;
# the docs' build scripts and hooks are not modules with doctests either.
collect_ignore += ["tests/multiprocess", *glob.glob("docs/*.py", root_dir=ROOT)]

BENCH_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmarks")
EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples")


@pytest.fixture(scope="session")
def load_example():
    """Returns ``load(name)``, which imports ``examples/<name>.py`` as a fresh module."""

    def load(name):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(EXAMPLES_DIR, f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


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


def _assert_trees_close(actual, expected, *, tol, err_msg=""):
    """Compares two pytrees leaf by leaf, each within ``tol`` of its largest entry.

    ``|actual - expected| <= tol * max(|expected|, 1)``, computed in float64:
    outputs, gradients and statistics of a normalization are compared on their
    own scale (a gradient summed over a batch is large, a zero entry is not).
    """
    assert jax.tree.structure(actual) == jax.tree.structure(expected), err_msg

    def leaf(path, a, e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        assert a.shape == e.shape, (jax.tree_util.keystr(path), a.shape, e.shape)
        bound = tol * max(float(np.max(np.abs(e), initial=0.0)), 1.0)
        np.testing.assert_allclose(
            a, e, rtol=0, atol=bound, err_msg=f"{err_msg} {jax.tree_util.keystr(path)}"
        )

    jax.tree_util.tree_map_with_path(leaf, actual, expected)


@pytest.fixture(scope="session")
def assert_trees_close():
    """``assert_trees_close(actual, expected, *, tol, err_msg="")`` (see above)."""
    return _assert_trees_close

"""Test collection settings shared by every test run."""

import os

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

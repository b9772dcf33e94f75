"""Test collection settings shared by every test run."""

try:
    import flax  # noqa: F401
except ImportError:
    # jaxbn/interop.py needs flax, an optional extra: no doctests from it without flax.
    collect_ignore = ["jaxbn/interop.py"]

"""The API reference site builds in strict mode and documents every public module.

``mkdocs build --strict`` fails on a broken cross-reference (``:func:`name``` in a
docstring naming nothing: see ``docs/griffe_sphinx_roles.py``), a missing page or
file, and on a docstring griffe cannot parse. Skipped when the ``docs`` extra is not
installed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import jaxbn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NEEDED = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def _missing() -> list[str]:
    missing = []
    for name in NEEDED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(name)
    return missing


needs_docs = pytest.mark.skipif(
    bool(_missing()), reason=f"the docs extra is not installed ({', '.join(_missing())})"
)


def public_modules() -> list[str]:
    """Every public module under ``jaxbn`` (no name component starting with ``_``)."""
    return sorted(
        info.name
        for info in pkgutil.walk_packages(jaxbn.__path__, "jaxbn.")
        if not any(part.startswith("_") for part in info.name.split("."))
    )


def test_every_public_module_has_an_api_page():
    documented = set()
    for page in (DOCS / "api").glob("*.md"):
        documented |= set(re.findall(r"^::: *([\w.]+)", page.read_text(), re.MULTILINE))
    missing = sorted(set(public_modules()) - documented)
    assert not missing, (
        f"public modules without an API page: {missing}; add `::: module` to a page in "
        f"docs/api/ and the page to mkdocs.yml's nav"
    )


def test_every_api_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in (DOCS / "api").glob("*.md"):
        assert f"api/{page.name}" in nav, f"docs/api/{page.name} is not in mkdocs.yml's nav"


@needs_docs
def test_site_builds_strict(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ops = (site / "api" / "ops" / "index.html").read_text()
    assert 'id="jaxbn.ops.batch_norm"' in ops
    assert 'class="arithmatex"' in ops  # the module's ``.. math::`` block, as math
    assert ":func:" not in ops and ".. math::" not in ops
    train = (site / "api" / "train" / "index.html").read_text()
    assert 'href="#jaxbn.train.fit"' in train  # :func:`fit` became a link
    assert 'id="jaxbn.train.Batch"' not in train  # only the names in __all__
    notebook = (site / "batch_norm_from_scratch" / "index.html").read_text()
    assert "check_grads FAILED" in notebook  # rendered with its saved outputs
    assert (site / "benchmarks" / "RESULTS" / "index.html").exists()
    assert (site / "benchmarks" / "results.png").exists()
    assert not any(site.rglob("*.py")), "build scripts were published"


@needs_docs
def test_roles_and_math_are_rewritten(caplog):
    griffe = pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("roles", DOCS / "griffe_sphinx_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    extension = roles.SphinxRoles()
    loader = griffe.GriffeLoader(
        extensions=griffe.load_extensions(extension), search_paths=[str(ROOT)]
    )
    pkg = loader.load("jaxbn")
    loader.resolve_aliases(implicit=False, external=False)
    doc = pkg["ops"].docstring.value
    assert "$$\n\\mu = " in doc and ".. math::" not in doc
    fold = pkg["fold.fold_into_dense"]
    collection = loader.modules_collection
    text = extension.rewrite(fold, "See :func:`batch_norm` and :class:`~jax.Array`.", collection)
    assert text == "See [`batch_norm`][jaxbn.ops.batch_norm] and `Array`."
    with caplog.at_level(logging.WARNING):
        text = extension.rewrite(fold, "A :func:`no_such_name`.", collection)
    assert text == "A `no_such_name`."
    assert "no_such_name" in caplog.text

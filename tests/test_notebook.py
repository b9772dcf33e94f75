"""The from-scratch notebook runs top to bottom, and its saved outputs are current.

The notebook is executed once per test session with ``nbclient`` in a fresh
``python3`` kernel whose ``PYTHONPATH`` starts with this checkout, so it imports the
``jaxbn`` under test. A failing cell (an exception, or one of the notebook's own
``assert``s) fails the test; so does a printed number that differs from the one
saved in the notebook beyond a tolerance, or printed text that differs from the
saved text (the saved outputs must come from the current code: rebuild with
``python docs/build_notebook.py``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "batch_norm_from_scratch.ipynb"
BUILDER = ROOT / "docs" / "build_notebook.py"
TIMEOUT_PER_CELL_S = 300

# (rtol, atol) for the numbers a cell prints. Most are deterministic up to float32
# rounding (which may differ between CPUs); cells tagged "loose-numbers" print the
# test accuracy of a whole training run, where one test image is 0.0028.
TOLERANCES = {"default": (2e-3, 5e-5), "loose-numbers": (0.0, 0.03)}
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def printed_text(cell) -> str:
    """What a code cell printed (stdout, stderr) and the text of its result."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif out["output_type"] == "execute_result":
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def printed_numbers(cell) -> list[float]:
    return [float(m) for m in NUMBER.findall(printed_text(cell))]


def skeleton(text: str) -> str:
    """The text without its numbers and whitespace, and with ``exact: True/False``
    (bitwise equality of float32 results, which may differ between CPUs) masked."""
    text = re.sub(r"exact: (True|False)", "exact: ?", text)
    return re.sub(r"\s+", "", NUMBER.sub("#", text))


def tolerance(cell) -> tuple[float, float]:
    tags = cell.get("metadata", {}).get("tags", [])
    return TOLERANCES["loose-numbers" if "loose-numbers" in tags else "default"]


@pytest.fixture(scope="module")
def notebooks():
    """``(saved, executed)``: the notebook as saved, and a fresh execution of it."""
    saved = nbformat.read(NOTEBOOK, as_version=4)
    fresh = nbformat.read(NOTEBOOK, as_version=4)
    for cell in fresh.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", pythonpath)  # the kernel imports this checkout's jaxbn
        client = nbclient.NotebookClient(
            fresh,
            timeout=TIMEOUT_PER_CELL_S,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOK.parent)}},
        )
        client.execute()  # raises CellExecutionError on the first failing cell
    return saved, fresh


def test_notebook_executes_cleanly(notebooks):
    _, fresh = notebooks
    code = [c for c in fresh.cells if c.cell_type == "code"]
    assert len(code) >= 15
    for i, cell in enumerate(code):
        kinds = {(o["output_type"], o.get("name")) for o in cell.outputs}
        assert ("error", None) not in kinds, (i, cell.source)
        # No warnings or other noise on stderr.
        assert ("stream", "stderr") not in kinds, (i, printed_text(cell))
    # The training cell drew its figure.
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs), (
        "no figure in the notebook"
    )


def test_saved_outputs_are_current(notebooks):
    saved, fresh = notebooks
    assert len(saved.cells) == len(fresh.cells)
    checked = 0
    for i, (old, new) in enumerate(zip(saved.cells, fresh.cells, strict=True)):
        if old.cell_type != "code":
            continue
        assert skeleton(printed_text(new)) == skeleton(printed_text(old)), (
            f"cell {i} printed other text than the saved notebook: rebuild with "
            f"`python docs/build_notebook.py`\nnow:\n{printed_text(new)}"
            f"\nsaved:\n{printed_text(old)}"
        )
        want, got = printed_numbers(old), printed_numbers(new)
        assert len(want) == len(got), (
            f"cell {i} printed {len(got)} numbers, the saved notebook has {len(want)}: "
            f"rebuild with `python docs/build_notebook.py`\nnow:\n{printed_text(new)}"
            f"\nsaved:\n{printed_text(old)}"
        )
        rtol, atol = tolerance(old)
        for a, b in zip(got, want, strict=True):
            assert math.isclose(a, b, rel_tol=rtol, abs_tol=atol), (
                f"cell {i}: printed {a}, the saved notebook has {b}: rebuild with "
                f"`python docs/build_notebook.py`\nnow:\n{printed_text(new)}"
                f"\nsaved:\n{printed_text(old)}"
            )
        checked += len(want)
    assert checked > 100  # the comparison saw the notebook's numbers


def test_the_saved_outputs_print_no_rounding_noise():
    """A difference of float32 rounding varies in its last bits between CPUs (Intel and
    AMD differ): the notebook prints its bound ("< 1e-05"), never its digits."""
    saved = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in saved.cells if c.cell_type == "code"]
    noise = [v for c in code for v in printed_numbers(c) if 0 < abs(v) < 1e-5]
    assert not noise, noise


def test_the_notebook_refers_to_nothing_its_reader_has_not_seen():
    saved = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in saved.cells)
    for phrase in ("seed notebook", "started from", "the seed's", "seed_"):
        assert phrase not in text, phrase


def test_saved_notebook_matches_its_builder():
    """The saved cells are those of docs/build_notebook.py (edit there, then rebuild)."""
    spec = importlib.util.spec_from_file_location("build_notebook", BUILDER)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = builder.build()
    saved = nbformat.read(NOTEBOOK, as_version=4)
    assert [(c.cell_type, c.source) for c in saved.cells] == [
        (c.cell_type, c.source) for c in built.cells
    ]
    # Every code cell that runs was saved with its outputs (readable without Jupyter).
    assert all(c.outputs for c in saved.cells if c.cell_type == "code" and "print(" in c.source)

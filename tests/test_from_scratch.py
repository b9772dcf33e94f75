"""The from-scratch walk-through runs, prints every section, and its gradients agree."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "from_scratch.py"


def _section(out: str, start: str, end: str) -> str:
    assert start in out and end in out, out
    return out[out.index(start) : out.index(end)]


def test_from_scratch_example_runs_and_agrees(capsys):
    spec = importlib.util.spec_from_file_location("from_scratch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    diffs = module.main(["--batch", "6", "--features", "3"])
    assert diffs["float32"] < 1e-4
    assert diffs["float64"] < 1e-12
    # batch_norm_bwd (float32) against the collected formula evaluated in float64.
    assert diffs["formula"] < 1e-4
    out = capsys.readouterr().out
    assert "largest |hand-written - jax.grad|" in out
    # Section 2 shows the backward itself, not only its heading.
    backward = _section(out, "2. Backward", "3. Compare")
    for label in ("dbias  =", "dscale =", "A = ", "B = ", "C = ", "dx[0] ="):
        assert label in backward, backward
    assert "largest |batch_norm_bwd - formula in float64|" in backward
    # Three feature values printed for each per-feature gradient.
    dbias_line = next(line for line in backward.splitlines() if "dbias  =" in line)
    assert len(dbias_line.split("[", 1)[1].split()) == 3, dbias_line

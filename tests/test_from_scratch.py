"""The from-scratch walk-through runs and its gradients agree with jax.grad."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).parents[1] / "examples" / "from_scratch.py"


def test_from_scratch_example_runs_and_agrees(capsys):
    spec = importlib.util.spec_from_file_location("from_scratch", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    diffs = module.main(["--batch", "6", "--features", "3"])
    assert diffs["float32"] < 1e-4
    assert diffs["float64"] < 1e-12
    assert "largest |hand-written - jax.grad|" in capsys.readouterr().out

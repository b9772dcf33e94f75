"""The framework demos (train_nnx.py, train_equinox.py) refuse bad flags in one line.

A NaN learning rate trained to a NaN loss without a word; a batch of one ended in a
traceback from batch norm. Each is now an argparse error naming the flag, before
anything is built.
"""

import pytest

BAD = [
    (["--lr", "nan"], "--lr: expected a finite number > 0"),
    (["--lr", "-0.1"], "--lr: expected a finite number > 0"),
    (["--batch-size", "1"], "--batch-size: expected an int >= 2"),
    (["--batch-size", "100000"], "--batch-size: expected at most the"),
    (["--steps", "0"], "--steps: expected an int >= 1"),
    (["--hidden", "0"], "--hidden: expected an int >= 1"),
    (["--seed", "-1"], "--seed"),
]


@pytest.mark.parametrize("script, framework", [("train_nnx", "flax"), ("train_equinox", "equinox")])
@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_framework_demos_refuse_bad_flags(script, framework, argv, message, capsys, load_example):
    pytest.importorskip(framework)
    module = load_example(script)
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1  # one line: no usage block

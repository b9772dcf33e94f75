"""Several JAX processes on one machine: the real multi-process code path.

Each test starts two processes (two CPU devices each, four in all) that join through
``jaxbn.distributed.initialize`` with a coordinator on localhost and ``gloo``
collectives. Every run is bounded in time and its processes are killed at the end.
"""

import functools
import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxbn import distributed

HERE = pathlib.Path(__file__).parent
WORKER = HERE / "multiprocess" / "worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(scenario, out_dir, *, num_processes=2, timeout=180, extra_args=()):
    """Runs ``worker.py`` in ``num_processes`` processes; returns ``[(rc, output)]``.

    Every process is killed once ``timeout`` seconds have passed, so a hang fails
    the test instead of blocking the suite.
    """
    address = f"127.0.0.1:{_free_port()}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                scenario,
                address,
                str(num_processes),
                str(pid),
                str(out_dir),
                *extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        for pid in range(num_processes)
    ]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                out = None
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(o is not None for o in outputs), f"a process ran past {timeout} s"
    return [(p.returncode, o) for p, o in zip(procs, outputs, strict=True)]


def _result(output):
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, output[-3000:]
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.fixture(scope="module")
def trained_12(tmp_path_factory):
    """``(out_dir, runs)``: two processes trained 12 steps (checkpoint at step 12), then
    resumed from that checkpoint to step 24.

    Shared by the tests that need such a run (joining, training as one process,
    resuming), so the two processes start and compile once for all of them.
    """
    out_dir = tmp_path_factory.mktemp("trained_12")
    return out_dir, run_processes("train", out_dir, extra_args=("12",))


def test_processes_join_and_see_every_device(trained_12):
    # The training scenario first checks that every process has the same
    # configuration (distributed.check_same_config), then trains.
    _, runs = trained_12
    for rc, out in runs:
        assert rc == 0, out[-3000:]
        result = _result(out)
        assert result == {"process_count": 2, "device_count": 4, "step": 12, "resumed_step": 24}


def test_processes_started_with_different_configurations_are_refused(tmp_path):
    runs = run_processes("config", tmp_path)
    for rc, out in runs:
        assert rc != 0
        assert "started with a configuration different from process 0's" in out, out[-3000:]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"process_id": 2}, ValueError, r"process_id must be in \[0, 2\), got 2"),
        ({"process_id": -1}, ValueError, r"process_id must be in \[0, 2\), got -1"),
        ({"num_processes": 0}, ValueError, "num_processes must be a positive int, got 0"),
        ({"process_id": 1.0}, TypeError, "process_id must be an int"),
        ({"coordinator_address": "localhost"}, ValueError, "'host:port'"),
        ({"coordinator_address": "localhost:99999"}, ValueError, "'host:port'"),
        ({"timeout_s": 0}, ValueError, "timeout_s must be a positive"),
        ({"timeout_s": True}, TypeError, "timeout_s must be a number of seconds, got True"),
        ({"timeout_s": "10"}, TypeError, "timeout_s must be a number of seconds, got '10'"),
        ({"timeout_s": None}, TypeError, "timeout_s must be a number of seconds, got None"),
        ({"timeout_s": float("nan")}, ValueError, "timeout_s must be a positive"),
        ({"coordinator_address": "::1:1234"}, ValueError, r"IPv6 host in brackets"),
        ({"coordinator_address": "[]:1234"}, ValueError, "'host:port'"),
        ({"local_device_count": 0}, ValueError, "local_device_count must be a positive int, got 0"),
    ],
    ids=lambda v: str(v)[:40],
)
def test_bad_arguments_are_refused_before_anything_starts(kwargs, error, match):
    args = {"coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 0}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        distributed.initialize(**args)


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"], ids=["ipv4", "ipv6"])
def test_unreachable_coordinator_is_a_clear_error_after_the_timeout(host):
    port = _free_port()  # nothing listens there
    code = (
        "from jaxbn import distributed\n"
        f"distributed.initialize('{host}:{port}', 2, 1, timeout_s=2)\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert f"ConnectionError: no coordinator answered at {host}:{port} within 2 s" in proc.stderr
    assert time.monotonic() - start < 30


@functools.cache
def _single_process_run(steps):
    """The same run as the workers', in this process on one device."""
    import jax
    import optax

    import jaxbn
    from jaxbn.data import make_blobs
    from jaxbn.train import fit

    sys.path.insert(0, str(WORKER.parent))
    try:
        from worker import RUN
    finally:
        sys.path.remove(str(WORKER.parent))
    data = make_blobs(num_examples=400, num_features=8, num_classes=3)
    ts = fit(
        jaxbn.MLP(RUN["layer_sizes"]),
        optax.sgd(RUN["lr"], momentum=0.9),
        data.x_train,
        data.y_train,
        steps=steps,
        batch_size=RUN["batch_size"],
        key=jax.random.key(RUN["seed"]),
    )
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves((ts.params, ts.state))]


def _worker_leaves(out_dir, process, tag="result"):
    with np.load(out_dir / f"{tag}_{process}.npz") as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _max_difference(a, b):
    assert len(a) == len(b)
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b, strict=True))


def test_two_processes_train_as_one_process_on_the_same_global_batches(trained_12):
    out_dir, runs = trained_12
    for rc, out in runs:
        assert rc == 0, out[-3000:]
        assert _result(out)["step"] == 12
    # Two chunks of 6 steps, each ending with a checkpoint.
    expected = _single_process_run(12)
    for process in (0, 1):
        assert _max_difference(_worker_leaves(out_dir, process), expected) < 2e-5
    # Only process 0 wrote the checkpoint (one file, no stray temporaries).
    assert sorted(p.name for p in out_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint.npz"]


def test_two_processes_resume_their_checkpoint(trained_12):
    out_dir, runs = trained_12
    assert all(rc == 0 for rc, _ in runs), runs[0][1][-3000:]
    expected = _single_process_run(24)
    assert _max_difference(_worker_leaves(out_dir, 0, "resumed"), expected) < 2e-5


def test_a_dying_process_stops_the_others_within_a_bounded_time(tmp_path):
    start = time.monotonic()
    runs = run_processes("die", tmp_path, extra_args=("600",), timeout=120)
    elapsed = time.monotonic() - start
    (rc0, out0), (rc1, out1) = runs
    assert rc1 == 3 and "process 1 dies" in out1
    assert rc0 != 0
    assert "another task died" in out0 or "unhealthy" in out0, out0[-3000:]
    assert elapsed < 120


EXAMPLE = HERE.parent / "examples" / "train_mlp.py"


def _readme_commands():
    """The README's two-process commands, as written there."""
    readme = (HERE.parent / "README.md").read_text()
    lines = [
        line.rstrip(" &")
        for line in readme.splitlines()
        if line.startswith("python examples/train_mlp.py --coordinator")
    ]
    assert len(lines) == 2, lines
    return [shlex.split(line) for line in lines]


def test_the_readme_commands_train_across_two_processes_and_process_0_writes(tmp_path):
    out = tmp_path / "run"
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = []
    for argv in _readme_commands():
        argv = [sys.executable if a == "python" else a for a in argv]
        argv = [str(HERE.parent / a) if a.startswith("examples/") else a for a in argv]
        argv = [str(out) if a == "runs/two_processes" else a for a in argv]
        argv = [a.replace("12355", port) for a in argv]  # a free port for the test
        # The README's run, shortened: later flags win.
        argv += ["--steps", "20", "--log-every", "10", "--hidden", "16,16", "--no-progress"]
        procs.append(
            subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
                start_new_session=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "final test accuracy" in outputs[0]
    assert "final test accuracy" not in outputs[1]  # process 0 alone reports and writes
    # Gloo's line per connection is dropped; one line says why the run is slow.
    assert not any("[Gloo]" in out for out in outputs), outputs
    assert "demonstration of correctness" in outputs[0].splitlines()[0], outputs[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["devices"] == 4 and metrics["processes"] == 2 and metrics["steps"] == 20
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint.npz", "metrics.json", "training_curve.png"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--process-id", "1"], "argument --process-id: only with --coordinator"),
        (
            ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
            r"argument --process-id: expected a number in \[0, 2\)",
        ),
        (["--coordinator", "nowhere", "--num-processes", "2"], "argument --coordinator"),
        (["--coordinator", "127.0.0.1:1", "--devices", "2"], "argument --devices: not with"),
    ],
    ids=["no-coordinator", "process-id-range", "bad-address", "devices"],
)
def test_the_example_refuses_bad_process_flags_in_one_line(
    argv, match, tmp_path, load_example, capsys
):
    # In this process: every flag is checked before jax.distributed is touched.
    with pytest.raises(SystemExit) as info:
        load_example("train_mlp").main([*argv, "--out", str(tmp_path / "o"), "--steps", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "error: " in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()

"""One process of a multi-process test run (started by tests/test_multiprocess.py).

Usage: ``python worker.py SCENARIO COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR [STEPS]``.
Each process has two CPU devices. A scenario that succeeds prints ``RESULT <json>``;
errors propagate (non-zero exit).
"""

import json
import os
import sys

from jaxbn import distributed

#: The run every training scenario shares (the test recomputes it in one process).
RUN = {"layer_sizes": (8, 16, 16, 3), "lr": 0.1, "batch_size": 40, "seed": 0}


def train(out_dir, steps, *, resume=False, die_at=None, tag="result"):
    """Data-parallel training over every process's devices; process 0 checkpoints."""
    import jax
    import numpy as np
    import optax

    import jaxbn
    from jaxbn.data import make_blobs
    from jaxbn.train import data_mesh, fit

    data = make_blobs(num_examples=400, num_features=8, num_classes=3)
    model = jaxbn.MLP(RUN["layer_sizes"])
    optimizer = optax.sgd(RUN["lr"], momentum=0.9)

    def callback(ts, chunk):
        if die_at is not None and int(ts.step) >= die_at and jax.process_index() == 1:
            print("process 1 dies", flush=True)
            os._exit(3)

    ts = fit(
        model,
        optimizer,
        data.x_train,
        data.y_train,
        steps=steps,
        batch_size=RUN["batch_size"],
        key=jax.random.key(RUN["seed"]),
        chunk_size=6,
        checkpoint_path=os.path.join(out_dir, "checkpoint.npz"),
        checkpoint_every=6,
        resume=resume,
        mesh=data_mesh(),
        callback=callback,
    )
    leaves = jax.tree_util.tree_leaves((ts.params, ts.state))
    np.savez(
        os.path.join(out_dir, f"{tag}_{jax.process_index()}.npz"),
        *[np.asarray(leaf) for leaf in leaves],
    )
    return {"step": int(ts.step)}


def main(argv):
    scenario, coordinator, num_processes, process_id, out_dir, *rest = argv
    steps = int(rest[0]) if rest else 0
    distributed.initialize(
        coordinator,
        int(num_processes),
        int(process_id),
        local_device_count=2,
        timeout_s=30,
        heartbeat_timeout_s=5,
    )
    import jax

    result = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    if scenario == "config":
        # Process 1 was started with another learning rate.
        distributed.check_same_config({"lr": 0.1 if int(process_id) == 0 else 0.2})
    elif scenario == "train":
        # Every process started with the same configuration: the check passes.
        distributed.check_same_config({"lr": 0.1, "hidden": [16, 16]})
        result.update(train(out_dir, steps))
        # The checkpoint of that run (a file, read back into fresh host arrays as by
        # a restarted process) continues for as many steps again.
        result["resumed_step"] = train(out_dir, 2 * steps, resume=True, tag="resumed")["step"]
    elif scenario == "die":
        result.update(train(out_dir, steps, die_at=12))
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

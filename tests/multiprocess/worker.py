"""One process of a multi-process test run (started by tests/test_multiprocess.py).

Usage: ``python worker.py SCENARIO COORDINATOR NUM_PROCESSES PROCESS_ID OUT_DIR``.
Each scenario prints ``RESULT <json>`` on success; errors propagate (non-zero exit).
"""

import json
import sys

from jaxbn import distributed


def main(argv):
    scenario, coordinator, num_processes, process_id, out_dir = argv
    num_processes, process_id = int(num_processes), int(process_id)
    distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        local_device_count=2,
        timeout_s=30,
        heartbeat_timeout_s=5,
    )
    import jax

    result = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    if scenario == "config":
        # Process 1 was started with another learning rate.
        distributed.check_same_config({"lr": 0.1 if process_id == 0 else 0.2})
    elif scenario == "same_config":
        distributed.check_same_config({"lr": 0.1, "hidden": [16, 16]})
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Several processes, one training run: JAX's multi-process runtime, set up and checked.

Data-parallel training over devices that belong to several processes (several hosts, or
several processes on one host) runs the same program in every process. Each process
calls :func:`initialize` first; then a mesh over ``jax.devices()`` (all processes'
devices, e.g. :func:`jaxbn.train.data_mesh`) spans them, and :func:`jaxbn.train.fit`
with that mesh trains on global batches of which each process feeds only its own rows
(:func:`process_rows`, :func:`global_batches`): no process ever puts the whole data set
on a device. Batch norm's statistics and the gradients are all-reduced over every
device of every process; only process 0 writes checkpoints and metrics.

On the CPU the processes' collectives run over ``gloo``; a process that dies makes the
others stop within ``heartbeat_timeout_s`` seconds (JAX's runtime ends them with a
message that another task died) instead of waiting forever.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import socket
import time
import urllib.parse
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import _checks

__all__ = [
    "check_same_config",
    "global_batches",
    "initialize",
    "is_main_process",
    "process_rows",
]


def _check_seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds (not a bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _parse_address(address: Any) -> tuple[str, int]:
    """``(host, port)`` of ``"host:port"``, or ``"[ipv6]:port"`` (the host without brackets)."""
    try:  # a URL's authority: an IPv6 host needs brackets to be told from its port
        parts = urllib.parse.urlsplit(f"//{address}")
        host, port = parts.hostname, parts.port
    except ValueError:  # a port out of range or not a number, a malformed IPv6 host
        host = port = None
    if not isinstance(address, str) or not host or not port:
        raise ValueError(
            f"coordinator_address must be 'host:port' (an IPv6 host in brackets: "
            f"'[::1]:port'), got {address!r}"
        )
    return host, port


def _wait_for_coordinator(address: str, host: str, port: int, timeout_s: float) -> None:
    """Returns once ``address`` accepts a connection; ``ConnectionError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise ConnectionError(
                    f"no coordinator answered at {address} within {timeout_s:g} s: start "
                    f"process 0 (which runs the coordinator) with the same "
                    f"coordinator_address, or check the address ({err})"
                ) from None
            time.sleep(0.2)


def initialize(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    local_device_count: int | None = None,
    timeout_s: float = 60.0,
    heartbeat_timeout_s: int = 30,
) -> None:
    """Joins this process to a multi-process JAX run (``jax.distributed.initialize``).

    Call it at the start of the program, before anything else uses JAX, in every
    process, with the same ``coordinator_address`` and ``num_processes`` and a distinct
    ``process_id``. Process 0 runs the coordinator at that address; the others wait
    for it for at most ``timeout_s`` seconds. On the CPU it selects ``gloo`` for the
    collectives between processes and, if ``local_device_count`` is given, splits
    this process's CPU into that many devices.

    Args:
        coordinator_address: ``"host:port"`` of process 0, reachable from every
            process (``"127.0.0.1:PORT"`` for processes on one machine; an IPv6
            host in brackets, ``"[::1]:PORT"``).
        num_processes: the number of processes, ``>= 1``.
        process_id: this process's number, in ``[0, num_processes)``.
        local_device_count: CPU only: the number of devices to split this process's
            CPU into (``None``: leave the platform's default).
        timeout_s: how long to wait for the coordinator and for every process to
            join, a positive number of seconds.
        heartbeat_timeout_s: how long a process may stay silent before the others
            are stopped (so a dead process ends the run instead of hanging it).

    Raises:
        TypeError, ValueError: for a malformed address, a ``process_id`` outside
            ``[0, num_processes)`` or other bad arguments.
        ConnectionError: if no coordinator answers within ``timeout_s``.
        RuntimeError: if JAX's backend was already started in this process.
    """
    host, port = _parse_address(coordinator_address)
    _checks.check_positive_int("num_processes", num_processes)
    if not _checks.is_int(process_id):
        raise TypeError(f"process_id must be an int, got {process_id!r}")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if local_device_count is not None:
        _checks.check_positive_int("local_device_count", local_device_count)
    timeout_s = _check_seconds("timeout_s", timeout_s)
    _checks.check_positive_int("heartbeat_timeout_s", heartbeat_timeout_s)
    if jax.distributed.is_initialized():
        raise RuntimeError("jax.distributed is already initialized in this process")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if local_device_count is not None:
            jax.config.update("jax_num_cpu_devices", int(local_device_count))
    except RuntimeError as err:
        raise RuntimeError(
            f"jaxbn.distributed.initialize must run before JAX's backend starts (before any "
            f"array is created or jax.devices() is called): {err}"
        ) from None
    if process_id != 0:
        _wait_for_coordinator(coordinator_address, host, port, timeout_s)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=int(num_processes),
        process_id=int(process_id),
        initialization_timeout=max(1, int(np.ceil(timeout_s))),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
    )


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes checkpoints, metrics and plots.

    Returns:
        ``True`` in process 0 (and in a program that runs as one process).
    """
    return jax.process_index() == 0


def check_same_config(config: Mapping[str, Any]) -> None:
    """Refuses a run whose processes were started with different configurations.

    Every process passes its own configuration (e.g. the command line's settings);
    their fingerprints (SHA-256 of the sorted JSON) are gathered from all processes
    and compared. In a single process it only checks that ``config`` is JSON-able.

    Args:
        config: a mapping of JSON-able settings that every process must share.

    Raises:
        ValueError: naming the processes whose configuration differs from process 0's.
    """
    mine = json.dumps(config, sort_keys=True, default=repr)
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(mine.encode()).digest(), np.uint32)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    differ = [p for p in range(digests.shape[0]) if not np.array_equal(digests[p], digests[0])]
    if differ:
        raise ValueError(
            f"processes {differ} were started with a configuration different from process "
            f"0's (this process, {jax.process_index()}, has {mine}); start every process "
            f"with the same settings"
        )


def process_rows(mesh: Mesh, batch_size: int) -> slice:
    """The rows of every global batch that this process feeds to its devices.

    A global batch of ``batch_size`` rows is split over the mesh's devices along its
    first axis (``PartitionSpec(mesh.axis_names)``); this process's devices hold one
    contiguous block of those rows.

    Args:
        mesh: a mesh over the devices of every process.
        batch_size: the global batch size, divisible by ``mesh.size``.

    Returns:
        ``slice(start, stop)`` of the rows this process provides.

    Raises:
        ValueError: if ``batch_size`` is not divisible by ``mesh.size`` or this
            process's rows are not one contiguous block.
    """
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the {mesh.size} devices of the "
            f"mesh (over {jax.process_count()} process(es)); use a multiple of {mesh.size}"
        )
    sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    rows = sorted(
        (index[0].start or 0, index[0].stop or batch_size)
        for index in sharding.addressable_devices_indices_map((batch_size,)).values()
    )
    start, stop = rows[0][0], rows[-1][1]
    if any(a[1] != b[0] for a, b in itertools.pairwise(rows)):
        raise ValueError(
            "this process's devices do not hold one contiguous block of the batch; build the "
            "mesh over jax.devices() in their default order (jaxbn.train.data_mesh)"
        )
    return slice(start, stop)


def global_batches(mesh: Mesh, indices: np.ndarray, *arrays: np.ndarray) -> tuple[jax.Array, ...]:
    """Stacked global batches, of which this process provides only its own rows.

    Args:
        mesh: a mesh over the devices of every process.
        indices: ``[steps, batch_size]`` integer indices of the examples of each
            step's global batch (the same in every process).
        *arrays: host arrays of examples, e.g. ``x [n, ...]`` and ``labels [n]``
            (every process holds them on the host; only its rows go to its devices).

    Returns:
        One global ``jax.Array`` per input, ``[steps, batch_size, ...]``, split over
        the mesh along the batch axis.
    """
    indices = np.asarray(indices)
    steps, batch_size = indices.shape
    rows = process_rows(mesh, batch_size)
    sharding = NamedSharding(mesh, P(None, tuple(mesh.axis_names)))
    local = indices[:, rows]
    return tuple(
        jax.make_array_from_process_local_data(
            sharding, np.asarray(a)[local], (steps, batch_size, *np.shape(a)[1:])
        )
        for a in arrays
    )

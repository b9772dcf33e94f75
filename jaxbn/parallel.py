"""Data parallelism for the training code: the mesh and the helpers around it.

:func:`data_mesh` builds a one-axis mesh over the first ``n`` devices. The
training step and loop of :mod:`jaxbn.train` take such a mesh and run under
``jax.shard_map``: the global batch is split over every axis of the mesh along
its first dimension, everything else is replicated, and the model is used with
its ``axis_name`` set to the mesh's axes, so that batch norm's statistics are
those of the global batch.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from jaxbn import _checks
from jaxbn._checks import AxisName

__all__ = ["data_mesh", "mesh_axes"]


def data_mesh(num_devices: int | None = None, *, axis_name: str = "data") -> Mesh:
    """A one-axis mesh over the first ``num_devices`` devices, for data parallelism.

    Args:
        num_devices: how many of ``jax.devices()`` to use (``None``: all of them).
        axis_name: the name of the mesh's axis.

    Returns:
        A :class:`jax.sharding.Mesh` of shape ``(num_devices,)``.

    Raises:
        ValueError: if fewer than ``num_devices`` devices are available (on CPU,
            set ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before
            JAX is imported to get ``N`` devices).

    Examples:
        >>> from jaxbn.parallel import data_mesh
        >>> data_mesh(1).axis_names
        ('data',)
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    _checks.check_positive_int("num_devices", n)
    if n > len(devices):
        raise ValueError(
            f"num_devices={n} but only {len(devices)} {devices[0].platform} device(s) are "
            f"available; on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={n} "
            f"before JAX is imported"
        )
    return jax.make_mesh((n,), (axis_name,), devices=devices[:n])


def mesh_axes(mesh: Mesh) -> AxisName:
    """The named axis (or axes) a batch is split over: all of the mesh's.

    Args:
        mesh: the mesh.

    Returns:
        Its one axis name, or the tuple of its names when it has several.
    """
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names

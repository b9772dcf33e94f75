"""Data parallelism for the training code: the mesh and the helpers around it.

:func:`data_mesh` builds a one-axis mesh over the first ``n`` devices. The
training step and loop of :mod:`jaxbn.train` take such a mesh and run under
``jax.shard_map``: the global batch is split over every axis of the mesh along
its first dimension, everything else is replicated, and the model is used with
its ``axis_name`` set to the mesh's axes (:func:`synchronized`), so that batch
norm's statistics are those of the global batch.

The version-sensitive uses of JAX's sharding API (axis types, ``jax.reshard``)
sit in :func:`place` alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxbn import _checks
from jaxbn._checks import AxisName

__all__ = ["batch_spec", "check_mesh", "data_mesh", "mesh_axes", "place", "synchronized"]


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
    if not _checks.is_int(n) or n < 1:
        raise ValueError(f"num_devices must be a positive int or None, got {num_devices!r}")
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


def batch_spec(mesh: Mesh) -> P:
    """The partition of a global batch: its first dimension over every mesh axis.

    Args:
        mesh: the mesh.

    Returns:
        ``PartitionSpec(mesh.axis_names)``.
    """
    return P(tuple(mesh.axis_names))


def check_mesh(mesh: Any, batch_size: int) -> None:
    """Raises unless ``mesh`` is a mesh whose size divides ``batch_size``.

    Args:
        mesh: the value given as a mesh.
        batch_size: the global batch size.

    Raises:
        TypeError: if ``mesh`` is not a :class:`jax.sharding.Mesh`.
        ValueError: if ``batch_size`` is not a multiple of ``mesh.size``.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(mesh).__name__}")
    if batch_size % mesh.size:
        raise ValueError(
            f"batch_size {batch_size} is not divisible by the number of devices {mesh.size} "
            f"of the mesh; use a multiple of {mesh.size}"
        )


def synchronized(model: Any, axis_name: AxisName) -> Any:
    """``model`` with its ``axis_name`` field replaced (``dataclasses.replace``).

    Args:
        model: a dataclass model with an ``axis_name`` field.
        axis_name: the named axis (or axes) its batch norm synchronizes over.

    Returns:
        The replaced model.

    Raises:
        TypeError: if ``model`` is not a dataclass with an ``axis_name`` field
            (what the data-parallel path needs of a model, beyond ``init`` and
            ``apply``).
    """
    if not dataclasses.is_dataclass(model) or "axis_name" not in {
        f.name for f in dataclasses.fields(model)
    }:
        raise TypeError(
            f"training on a mesh needs a dataclass model with an axis_name field (it is "
            f"set to the mesh's axes to synchronize batch norm), got {type(model).__name__}"
        )
    return dataclasses.replace(model, axis_name=axis_name)


def place(tree: Any, mesh: Mesh, spec: P) -> Any:
    """``tree`` resharded to ``NamedSharding(mesh, spec)``, inside or outside ``jit``.

    Needed on a mesh with explicit axes (``jax.make_mesh``'s default), where
    ``shard_map`` requires its inputs' types to match its ``in_specs``; on a mesh
    of automatic axes ``shard_map`` lays its inputs out itself.

    Args:
        tree: a pytree of arrays.
        mesh: the mesh.
        spec: the partition to lay the arrays out with.

    Returns:
        ``tree``, resharded where the mesh's axes are explicit (else as given).
    """
    if jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return tree
    return jax.reshard(tree, NamedSharding(mesh, spec))

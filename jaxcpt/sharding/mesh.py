"""Device mesh from config, for one CPU, one GPU node, or many hosts.

``mesh: {data: -1, fsdp: 1, tensor: 1}`` names the axes in order (major to minor) and
their sizes; -1 takes the devices left over. Devices are global (``jax.devices()``),
so the same config builds the same mesh on every host of a TPU pod slice or a
multi-node GPU job. On multi-slice TPU (devices carrying ``slice_index``) the
``data`` axis spans slices (slow DCN links carry only the data-parallel gradient
reduction) and the other axes stay inside a slice.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxcpt.errors import UserError

DEFAULT_MESH = {"data": -1, "fsdp": 1, "tensor": 1}


def resolve_mesh_shape(axes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Replace a single -1 with the devices left over; check the product equals ``num_devices``."""
    if not axes:
        raise UserError("mesh must name at least one axis, e.g. mesh: {data: -1}")
    sizes = dict(axes)
    free = [name for name, size in sizes.items() if size == -1]
    bad = [name for name, size in sizes.items() if size != -1 and size < 1]
    if bad:
        raise UserError(f"mesh axis '{bad[0]}' has size {sizes[bad[0]]}; sizes are positive integers or -1")
    if len(free) > 1:
        raise UserError(f"mesh axes {free} are all -1; at most one axis may take the remaining devices")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    shown = ", ".join(f"{k}: {v}" for k, v in axes.items())
    if free:
        if num_devices % fixed:
            raise UserError(
                f"mesh {{{shown}}}: the fixed axes need a multiple of {fixed} devices, but there are "
                f"{num_devices}; choose sizes whose product divides {num_devices}"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise UserError(
            f"mesh {{{shown}}} uses {fixed} devices, but {num_devices} are available; make the sizes "
            f"multiply to {num_devices}, or set one axis to -1 to take the rest"
        )
    return sizes


def build_mesh(axes: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with the named axes (GSPMD ``Auto`` axis types: XLA propagates shardings)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = resolve_mesh_shape(axes or DEFAULT_MESH, len(devices))
    names = tuple(sizes)
    shape = tuple(sizes.values())
    axis_types = (AxisType.Auto,) * len(names)
    num_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if num_slices > 1:
        from jax.experimental import mesh_utils

        if "data" not in sizes or sizes["data"] % num_slices:
            raise UserError(
                f"{num_slices} TPU slices: the mesh needs a 'data' axis whose size is a multiple of "
                f"{num_slices} (the data axis spans slices); got {dict(sizes)}"
            )
        ici = tuple(s // num_slices if n == "data" else s for n, s in sizes.items())
        dcn = tuple(num_slices if n == "data" else 1 for n in names)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
        return Mesh(grid, names, axis_types=axis_types)
    try:
        return jax.make_mesh(shape, names, axis_types=axis_types, devices=devices)
    except (ValueError, NotImplementedError):
        # make_mesh wants topology-aware shapes on some platforms; fall back to device order.
        return Mesh(np.asarray(devices).reshape(shape), names, axis_types=axis_types)


def describe_mesh(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items()) + f" ({mesh.devices.size} devices)"

"""TPU slices by name (``v5p-64``, ``v5litepod-16``, ``2xv6e-256``, ``v5p:4x4x12``) and their devices.

GPU nodes (``h100-8``, ``4xh100-8``) are in jaxcpt.aot.gpu; ``parse_topology`` reads both. A
topology, TPU or GPU, gives the compiler what it needs: ``platform``, ``devices()``,
``hbm_bytes``, ``lowering_checks()``, the custom call of its attention kernel and ``describe()``.

``libtpu`` describes any TPU topology on a CPU-only host (``jax.experimental.topologies``);
jit can lower and compile for those devices, it just cannot run on them. Names follow
Cloud TPU's accelerator types: v4 and v5p count TensorCores (two per chip, one JAX device
per chip), v5e and v6e count chips. A count maps to the slice shape Cloud TPU builds for
it (powers of two, each doubling the shortest side, e.g. v5p-64 = 32 chips = 2x4x4); any
other shape is given explicitly as ``GEN:AxBxC``.

HBM per chip, from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/
v4, v5e, v5p, v6e): v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB. The runtime keeps a
little of it for itself, so a program within a few percent of the limit is flagged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import math
import re

from jaxcpt.errors import UserError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
    name: str  # canonical, as in the accelerator type: v4, v5p, v5e, v6e
    topology_prefix: str  # what libtpu's topology names start with
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
    name_counts_cores: bool  # v4-8 / v5p-8 count 2 TensorCores per chip; v5e-8 / v6e-8 count chips
    chip_config: str  # 'megacore': one JAX device per chip, as JAX runs them
    hbm_bytes: int
    chips_per_host: int


GENERATIONS = {
    "v4": Generation("v4", "v4", 3, True, "megacore", 32 * GiB, 4),
    "v5p": Generation("v5p", "v5p", 3, True, "megacore", 95 * GiB, 4),
    "v5e": Generation("v5e", "v5e", 2, False, "default", 16 * GiB, 4),
    "v6e": Generation("v6e", "v6e", 2, False, "default", 32 * GiB, 4),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}
_NAME = re.compile(r"^(?:(\d+)x)?(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))$")


@dataclasses.dataclass(frozen=True)
class Topology:
    """One or more identical TPU slices."""

    generation: Generation
    shape: tuple[int, ...]  # chips along each torus axis of one slice
    num_slices: int = 1

    platform = "tpu"
    kernel_call = "tpu_custom_call"  # how a Pallas (Mosaic) kernel appears in the lowered module
    kernel_label = "Pallas TPU kernel"

    @property
    def hbm_bytes(self) -> int:
        return self.generation.hbm_bytes

    def devices(self) -> list:
        return tpu_devices(self)

    def lowering_checks(self):
        """Nothing to answer for the target: splash's checks read the mesh's TPU devices."""
        return contextlib.nullcontext()

    def describe(self, hosts: int) -> str:
        return (f"{self.name} ({self.topology_name}, {self.num_slices} slice(s), {self.num_chips} chips, "
                f"{hosts} hosts)")

    @property
    def chips_per_slice(self) -> int:
        return math.prod(self.shape)

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def name(self) -> str:
        g = self.generation
        count = self.chips_per_slice * (2 if g.name_counts_cores else 1)
        slices = f"{self.num_slices}x" if self.num_slices > 1 else ""
        return f"{slices}{g.name}-{count}"

    @property
    def topology_name(self) -> str:
        return f"{self.generation.topology_prefix}:" + "x".join(map(str, self.shape))

    @property
    def chips_per_host_bounds(self) -> tuple[int, int, int]:
        """One host's block of chips: 2x2x1 on multi-host slices; a small v5e/v6e slice is one host."""
        if self.chips_per_slice <= self.generation.chips_per_host or (
                self.generation.dims == 2 and self.chips_per_slice <= 8):
            return tuple(self.shape) + (1,) * (3 - len(self.shape))
        return (2, 2, 1)


def _shape_for(generation: Generation, chips: int, name: str) -> tuple[int, ...]:
    """The slice shape Cloud TPU builds for ``chips`` chips: start at one host, double the shortest side."""
    if chips == 1 and generation.dims == 2:
        return (1, 1)
    base = [2, 2, 1] if generation.dims == 3 else [2, 2]
    if chips < 4 or chips & (chips - 1):
        example = "v5p:4x4x12" if generation.dims == 3 else "v5e:4x8"
        raise UserError(f"TPU topology '{name}' is {chips} chips, which has no standard slice shape here; "
                        f"give the shape explicitly, e.g. {example}")
    shape = sorted(base)
    while math.prod(shape) < chips:
        shape[0] *= 2
        shape.sort()
    return tuple(sorted(shape, key=lambda side: (side == 1, side)))  # 2x2x1, 2x2x4, 2x4x4, as Cloud TPU writes them


def parse_topology(text: str, num_slices: int | None = None):
    """``v5p-64``, ``v5litepod-16``, ``2xv5p-64``, ``v5p:2x4x4``; ``num_slices`` overrides an ``Nx`` prefix.

    GPU nodes (``h100-8``, ``2xh100-8``: ``num_slices`` counts nodes) give a jaxcpt.aot.gpu.GpuTopology.
    """
    from jaxcpt.aot import gpu

    if gpu.is_gpu_name(text):
        return gpu.parse_gpu_topology(text, num_slices)
    match = _NAME.match(text.strip().lower())
    if not match:
        raise UserError(f"cannot read TPU topology '{text}'; write it like v5p-64, v5litepod-16, v6e-8, "
                        "2xv5p-64 (two slices) or v5p:2x4x4 (an explicit chip shape); or a GPU node: h100-8, "
                        "h200-8, b200-8, 2xh100-8 (two nodes)")
    slices, gen_name, count, shape_text = match.groups()
    gen_name = ALIASES.get(gen_name, gen_name)
    if gen_name not in GENERATIONS:
        raise UserError(f"unknown TPU generation '{gen_name}' in '{text}'; known: {', '.join(GENERATIONS)} "
                        "(v5litepod is v5e)")
    generation = GENERATIONS[gen_name]
    if shape_text:
        shape = tuple(int(s) for s in shape_text.split("x"))
        if len(shape) != generation.dims or min(shape) < 1:
            raise UserError(f"TPU {generation.name} slices have {generation.dims} torus axes, '{text}' gives "
                            f"{len(shape)}")
    else:
        count = int(count)
        if generation.name_counts_cores and count % 2:
            raise UserError(f"'{text}': {generation.name} accelerator types count TensorCores, two per chip, so "
                            "the number is even (v5p-8 is 4 chips)")
        shape = _shape_for(generation, count // 2 if generation.name_counts_cores else count, text)
    slices = num_slices if num_slices is not None else int(slices or 1)
    if slices < 1:
        raise UserError(f"the number of slices must be at least 1, got {slices}")
    return Topology(generation, shape, slices)


def parse_topologies(text: str, num_slices: int | None = None) -> list:
    """A comma-separated list of topologies."""
    names = [t for t in text.split(",") if t.strip()]
    if not names:
        raise UserError("--topology needs at least one topology, e.g. v5p-64 or h100-8")
    return [parse_topology(name, num_slices) for name in names]


def compiler_versions(topologies: list) -> dict[str, str]:
    """The compilers these topologies need, checked installed, as {package: version} for reports."""
    from jaxcpt.aot import gpu

    versions = {}
    if any(t.platform == "tpu" for t in topologies):
        versions["libtpu"] = check_libtpu()
    if any(t.platform == "gpu" for t in topologies):
        versions.update(gpu.plugin_versions())
    return versions


def check_libtpu() -> str:
    """The installed libtpu version, or a UserError saying how to install the one this jax needs."""
    wanted = _libtpu_pin()
    install = "pip install 'jaxcpt[tpu-compile]'" + (f" (libtpu {wanted} for jax {_jax_version()})" if wanted else "")
    if importlib.util.find_spec("libtpu") is None:
        raise UserError(f"compiling for TPU on this host needs libtpu, which is not installed: {install}")
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
    if wanted and not re.fullmatch(wanted.replace(".", r"\.").replace("*", ".*"), version):
        raise UserError(f"libtpu {version} is installed but jax {_jax_version()} is built for libtpu {wanted}; "
                        f"{install}")
    return version


def _jax_version() -> str:
    return importlib.metadata.version("jax")


def _libtpu_pin() -> str | None:
    """The libtpu version jax's own ``tpu`` extra pins (e.g. '0.0.42.*' for jax 0.10.2)."""
    for requirement in importlib.metadata.requires("jax") or []:
        match = re.match(r'libtpu\s*==\s*([\w.*]+)\s*;.*extra\s*==\s*"tpu"', requirement)
        if match:
            return match.group(1)
    return None


def tpu_chips_attached() -> bool:
    """Whether this host has TPU chips (the device files a TPU VM exposes), whatever is installed."""
    import glob

    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _allow_concurrent_compiles() -> None:
    """Let several compile-only processes load libtpu at once on a host without TPU chips.

    libtpu takes /tmp/libtpu_lockfile so that two processes never drive the same chips; a
    second process aborts ("Internal error when accessing libtpu multi-process lockfile").
    Off a TPU host there are no chips to share, so two ``jaxcpt compile`` runs (or a compile
    beside the tests) may both load it. On a TPU host the lock stays, guarding the chips.
    """
    import os

    if not tpu_chips_attached():
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(topology: Topology) -> list:
    """The JAX devices of ``topology`` (compile-only: nothing can run on them from this host)."""
    check_libtpu()
    _allow_concurrent_compiles()
    # libtpu prints warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES when it starts
    # off a TPU VM; they do not matter for compiling.
    from jax.experimental import topologies

    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name, chip_config_name=topology.generation.chip_config,
        chips_per_host_bounds=topology.chips_per_host_bounds, num_slices=topology.num_slices)
    return list(description.devices)

"""NVIDIA GPU nodes by name (``h100-8``, ``h200-8``, ``b200-8``, ``4xh100-8``) and their devices, without a GPU.

JAX compiles for a GPU it does not have through the CUDA PJRT plugin's compile-only
topology (openxla/xla PR 16913; jax's ``tests/aot_test.py::test_deviceless_aot_compile``):
``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=TEXT,
topology="NODESx1xGPUS")`` returns devices that jit can lower and compile for, on a host
with no GPU and no CUDA driver. ``TEXT`` is a ``stream_executor.GpuTargetConfigProto`` in
protobuf text format: what the CUDA driver would report for the GPU (compute capability,
SMs, memory, caches) plus the cuDNN and CUDA versions the run will have. XLA's own specs
(xla/backends/gpu/target_config/specs/*.txtpb) list these; the fields below are a subset that
the plugins of jax 0.10.2 and 0.11.2 parse.

Measured here (December 2026): jax/jaxlib 0.10.2 with jax-cuda13-plugin + jax-cuda13-pjrt
0.10.2, plus CUDA's ptxas and libdevice (``pip install 'jaxcpt[gpu-compile]'``: the plugin
and nvidia-cuda-nvcc; no CUDA runtime libraries, no driver) compiles the train step for
sm_90a and sm_100a; jax 0.11.2 on Python 3.12 does the same. What the compiler cannot do
without the GPU: autotune (it picks GEMM and fusion configs by heuristics, as
``--xla_gpu_autotune_level=0`` does) and build cuDNN's attention graphs (XLA builds them
where a GPU is attached; their scratch workspace is not in the plan).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import os
import re
from unittest import mock

from jaxcpt.errors import UserError

GiB = 2**30
PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin")  # the module names of jax's CUDA plugins, newest first
INSTALL = "pip install 'jaxcpt[gpu-compile]'"
# launch/gpu.sh and launch/slurm.sbatch run training with these XLA flags (GPU_XLA_FLAGS there);
# the latency-hiding scheduler changes which buffers are live at once, so the compile uses them too.
LAUNCH_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",)
# ... and give JAX this share of each GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's own default is 0.75).
LAUNCH_MEM_FRACTION = 0.90


@dataclasses.dataclass(frozen=True)
class GpuModel:
    """One GPU as its CUDA driver describes it (cudaGetDeviceProperties, cudaMemGetInfo)."""

    name: str  # as in topology names: h100
    device_kind: str  # the driver's name, which is jax's device_kind
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int  # total device memory the driver reports (a little under the marketing GB)
    memory_bandwidth: int  # bytes/s
    l2_cache_bytes: int
    clock_ghz: float
    gpus_per_node: int  # of the usual node (HGX / DGX boards)

    def target_config(self, cudnn: tuple[int, int, int], cuda: tuple[int, int, int]) -> str:
        """The GpuTargetConfigProto text XLA compiles against, with the cuDNN and CUDA versions of the run."""
        major, minor = self.compute_capability
        # Per-SM limits that Hopper and Blackwell (datacenter) share: 228 KiB shared memory per SM,
        # 227 KiB of it to one block when opted in, 64 Ki registers, 2048 threads.
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024  threads_per_warp: 32  threads_per_core_limit: 2048",
            "  shared_memory_per_block: 49152  shared_memory_per_block_optin: 232448  shared_memory_per_core: 233472",
            f"  core_count: {self.sm_count}  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {self.memory_bandwidth}  l2_cache_size: {self.l2_cache_bytes}",
            f"  clock_rate_ghz: {self.clock_ghz}  device_memory_size: {self.memory_bytes}",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
            "  registers_per_core_limit: 65536  registers_per_block_limit: 65536",
            "}",
            'platform_name: "CUDA"',
            f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
            f"runtime_version {{ major: {cuda[0]} minor: {cuda[1]} patch: {cuda[2]} }}",
            f'device_description_str: "{self.device_kind}"',
        ]) + "\n"


# Driver-reported figures, as in XLA's target_config specs (h100_sxm, h200, b200) and NVIDIA's datasheets.
MODELS = {
    "h100": GpuModel("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 84_942_979_072, 3_352_320_000_000,
                     50 * 2**20, 1.98, 8),
    "h200": GpuModel("h200", "NVIDIA H200 141GB HBM3e", (9, 0), 132, 151_397_597_184, 4_800_000_000_000,
                     50 * 2**20, 1.98, 8),
    "b200": GpuModel("b200", "NVIDIA B200", (10, 0), 148, 191_514_411_008, 7_672_320_000_000,
                     132_644_864, 1.965, 8),
}
NAME = re.compile(r"^(?:(\d+)x)?(h100|h200|b200)-(\d+)$")


def is_gpu_name(text: str) -> bool:
    return bool(re.match(r"^(?:\d+x)?[hb]\d+", text.strip().lower()))


@dataclasses.dataclass(frozen=True)
class GpuTopology:
    """``nodes`` identical nodes of ``gpus_per_node`` GPUs each; one JAX process per node."""

    model: GpuModel
    gpus_per_node: int
    nodes: int = 1

    platform = "gpu"
    kernel_call = "__cudnn$fmha"  # cuDNN fused attention (forward and backward) in the lowered module
    kernel_label = "cuDNN attention"

    @property
    def num_chips(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def num_slices(self) -> int:
        return self.nodes

    @property
    def name(self) -> str:
        return f"{self.nodes}x" * (self.nodes > 1) + f"{self.model.name}-{self.gpus_per_node}"

    @property
    def topology_name(self) -> str:
        """XLA's ``<partitions>x<hosts per partition>x<devices per host>``: each node is its own NVLink domain."""
        return f"{self.nodes}x1x{self.gpus_per_node}"

    @property
    def hbm_bytes(self) -> int:
        return self.model.memory_bytes

    def describe(self, hosts: int) -> str:
        major, minor = self.model.compute_capability
        usable = LAUNCH_MEM_FRACTION * self.hbm_bytes / GiB
        return (f"{self.name} ({self.nodes} node(s) x {self.gpus_per_node} {self.model.device_kind}, sm_{major}{minor}, "
                f"{self.num_chips} GPUs, {hosts} processes; XLA topology {self.topology_name}); "
                f"{self.hbm_bytes / GiB:.1f} GiB per GPU, of which launch/gpu.sh gives JAX "
                f"{LAUNCH_MEM_FRACTION:.0%} = {usable:.1f} GiB (XLA_PYTHON_CLIENT_MEM_FRACTION)")

    def devices(self) -> list:
        """The compile-only JAX devices of this topology (nothing can run on them from this host)."""
        plugin = check_cuda_plugin()
        cuda_tools()
        _use_launch_xla_flags()
        from jax.experimental import topologies

        config = self.model.target_config(plugin["cudnn_version"], plugin["cuda_version"])
        try:
            description = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                       topology=self.topology_name)
        except (NotImplementedError, RuntimeError) as e:
            raise UserError(f"jax's CUDA plugin ({plugin['package']} {plugin['version']}) cannot describe "
                            f"{self.name} without a GPU: {e}. Checked to work: jax 0.10.2 and 0.11.2 with their "
                            f"plugins (docs/gpu.md): {INSTALL}") from e
        return list(description.devices)

    @contextlib.contextmanager
    def lowering_checks(self):
        """Answer jax's trace-time cuDNN checks for the target GPU instead of this host.

        ``jax._src.cudnn.fused_attention_stablehlo`` asks the installed libcudnn for its version
        (absent here: "cuDNN not found") and the local backend for its compute capability (the
        CPU here, so packed sequences would be refused as "pre-Hopper") while tracing. On the
        GPU node both come from the real device; here they come from the target: its compute
        capability and the cuDNN the plugin was built for (jax refuses an older one at run time).
        Only the GPU compile path enters this; TPU and CPU tracing are untouched.
        """
        try:
            from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
        except ImportError:  # a jax without the module lowers no cuDNN attention to check
            yield
            return
        major, minor, patch = check_cuda_plugin()["cudnn_version"]
        target = self.model.compute_capability

        def parse(capability: str) -> tuple[int, ...]:
            return tuple(int(part) for part in capability.split("."))

        with mock.patch.object(cudnn_attention, "check_cudnn_version", return_value=major * 10000 + minor * 100 + patch), \
                mock.patch.object(cudnn_attention, "check_compute_capability", lambda c: target >= parse(c)), \
                mock.patch.object(cudnn_attention, "is_cuda_compute_capability_equal", lambda c: target == parse(c)):
            yield


def parse_gpu_topology(text: str, num_nodes: int | None = None) -> GpuTopology:
    """``h100-8``, ``h200-8``, ``b200-8``, ``4xh100-8`` (four nodes), ``h100-1``; ``num_nodes`` overrides ``Nx``."""
    match = NAME.match(text.strip().lower())
    if not match:
        raise UserError(f"cannot read GPU topology '{text}'; write it like h100-8 (one node of 8 H100s), h200-8, "
                        f"b200-8, 4xh100-8 (four nodes) or h100-1; known GPUs: {', '.join(MODELS)}")
    nodes, model_name, gpus = match.groups()
    model = MODELS[model_name]
    gpus = int(gpus)
    if not 1 <= gpus <= model.gpus_per_node:
        raise UserError(f"'{text}': a {model.name} node has 1 to {model.gpus_per_node} GPUs, not {gpus}; "
                        f"for more, name several nodes, e.g. {max(2, gpus // model.gpus_per_node)}x{model.name}-"
                        f"{model.gpus_per_node}")
    nodes = num_nodes if num_nodes is not None else int(nodes or 1)
    if nodes < 1:
        raise UserError(f"the number of nodes must be at least 1, got {nodes}")
    return GpuTopology(model, gpus, nodes)


def check_cuda_plugin() -> dict:
    """The installed CUDA plugin and the CUDA/cuDNN versions it was built for, or how to install it."""
    for module in PLUGINS:
        if importlib.util.find_spec(module) is not None:
            break
    else:
        raise UserError(f"compiling for NVIDIA GPUs on this host needs jax's CUDA plugin, which is not installed: "
                        f"{INSTALL} (jax-cuda13-plugin and jax-cuda13-pjrt for jax {_version('jax')}; no GPU, "
                        "driver or CUDA libraries needed)")
    package = module.replace("_", "-")
    version, jax_version = _version(package), _version("jax")
    if version != "unknown" and version.split(".")[:3] != jax_version.split(".")[:3]:
        raise UserError(f"{package} {version} is installed but jax is {jax_version}; the plugin must match jax: "
                        f"{INSTALL}")
    versions = importlib.import_module(f"{module}._versions")  # build-time constants: need no CUDA library
    cudnn = versions.cudnn_build_version()  # e.g. 91200 = 9.12.0
    cuda = versions.cuda_runtime_build_version()  # e.g. 13000 = 13.0
    return {"package": package, "version": version, "pjrt": _version(package.replace("plugin", "pjrt")),
            "cudnn_version": (cudnn // 10000, cudnn // 100 % 100, cudnn % 100),
            "cuda_version": (cuda // 1000, cuda // 10 % 100, 0)}


def cuda_tools() -> str:
    """The CUDA directory holding ``bin/ptxas`` and ``nvvm/libdevice/libdevice.10.bc``, which XLA compiles GPU code with.

    Looked for where XLA looks: jax's ``cuda_path`` (CUDA_ROOT, else the nvidia-cuda-nvcc wheel), then the
    usual toolkit places. Without them XLA fails late with "libdevice not found at ./libdevice.10.bc".
    """
    import shutil

    from jax._src import lib

    candidates = [getattr(lib, "cuda_path", None), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    ptxas = shutil.which("ptxas")
    if ptxas:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(ptxas))))
    for directory in filter(None, candidates):
        if (os.path.isfile(os.path.join(directory, "bin", "ptxas"))
                and os.path.isfile(os.path.join(directory, "nvvm", "libdevice", "libdevice.10.bc"))):
            return directory
    raise UserError("compiling for NVIDIA GPUs needs CUDA's ptxas and libdevice, found neither in the "
                    f"nvidia-cuda-nvcc wheel nor in a CUDA toolkit (CUDA_ROOT, /usr/local/cuda): {INSTALL}")


def plugin_versions() -> dict[str, str]:
    """For reports: the plugin packages, the CUDA/cuDNN versions the compile targets and the CUDA tools used."""
    plugin = check_cuda_plugin()
    return {plugin["package"]: plugin["version"], plugin["package"].replace("plugin", "pjrt"): plugin["pjrt"],
            "cuda": ".".join(map(str, plugin["cuda_version"][:2])), "cudnn": ".".join(map(str, plugin["cudnn_version"])),
            "cuda_tools": cuda_tools()}


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _use_launch_xla_flags() -> None:
    """Add launch/gpu.sh's XLA flags to XLA_FLAGS (a flag already set there wins).

    The CUDA plugin is its own copy of XLA and reads XLA_FLAGS when it first compiles, so
    setting them before the first GPU compile reaches it even after jax has started on the CPU.
    """
    current = os.environ.get("XLA_FLAGS", "")
    missing = [flag for flag in LAUNCH_XLA_FLAGS if flag.split("=")[0] not in current]
    if missing:
        os.environ["XLA_FLAGS"] = " ".join([current, *missing]).strip()


def gpus_attached() -> bool:
    """Whether this host has a GPU (the device files the NVIDIA or AMD driver creates), whatever is installed."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/kfd"))

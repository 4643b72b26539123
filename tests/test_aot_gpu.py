"""`jaxcpt compile` for NVIDIA GPU nodes on this CPU host (jax's CUDA plugin as the compiler, no GPU).

Names, memory figures, errors and the launch scripts' agreement need nothing installed;
describing the GPUs needs jax's CUDA plugin (``jaxcpt[gpu-compile]``, in the test extra) and
is skipped with the install line where it is missing; compiling a train step takes ~20 s
and is in the slow suite.
"""

import importlib.util
import json
import re
from pathlib import Path

import jax
import pytest

from jaxcpt.aot import gpu
from jaxcpt.aot.topology import GiB, parse_topologies, parse_topology
from jaxcpt.cli import main
from jaxcpt.errors import UserError

ROOT = Path(__file__).parent.parent
HAS_PLUGIN = any(importlib.util.find_spec(name) for name in gpu.PLUGINS)
needs_plugin = pytest.mark.skipif(not HAS_PLUGIN, reason="jax's CUDA plugin is not installed: "
                                                         "pip install 'jaxcpt[gpu-compile]' (in the test extra)")


@pytest.mark.parametrize("name, gpus, nodes, xla_topology, kind", [
    ("h100-8", 8, 1, "1x1x8", "NVIDIA H100 80GB HBM3"),
    ("h200-8", 8, 1, "1x1x8", "NVIDIA H200 141GB HBM3e"),
    ("b200-8", 8, 1, "1x1x8", "NVIDIA B200"),
    ("4xh100-8", 32, 4, "4x1x8", "NVIDIA H100 80GB HBM3"),
    ("H100-1", 1, 1, "1x1x1", "NVIDIA H100 80GB HBM3"),
])
def test_gpu_node_names_map_to_nodes_and_xla_topologies(name, gpus, nodes, xla_topology, kind):
    topology = parse_topology(name)
    assert (topology.platform, topology.num_chips, topology.nodes, topology.topology_name,
            topology.model.device_kind) == ("gpu", gpus, nodes, xla_topology, kind)
    assert topology.name == name.lower()


def test_num_slices_counts_nodes_and_gpu_and_tpu_names_mix():
    assert parse_topology("h100-8", num_slices=2).num_chips == 16
    assert [t.platform for t in parse_topologies("v5p-8,h100-8")] == ["tpu", "gpu"]


def test_per_gpu_memory_is_what_the_driver_reports_for_the_80_141_180_gb_parts():
    # cudaMemGetInfo's total is a little under the marketing figure (GB vs GiB, and the driver's share)
    memory = {name: parse_topology(f"{name}-8").hbm_bytes / GiB for name in gpu.MODELS}
    assert memory == pytest.approx({"h100": 79.11, "h200": 141.0, "b200": 178.36}, abs=0.01)


@pytest.mark.parametrize("name, message", [
    ("h100-16", "1 to 8 GPUs, not 16; for more, name several nodes, e.g. 2xh100-8"),
    ("h300-8", "cannot read GPU topology 'h300-8'.*known GPUs: h100, h200, b200"),
    ("0xh100-8", "at least 1"),
])
def test_unreadable_gpu_topologies_are_errors_naming_the_fix(name, message):
    with pytest.raises(UserError, match=message):
        parse_topology(name)


def test_the_compile_uses_the_xla_flags_and_memory_share_the_launch_scripts_give_training():
    for script in ("launch/gpu.sh", "launch/slurm.sbatch"):
        text = (ROOT / script).read_text()
        flags = re.search(r'^GPU_XLA_FLAGS="([^"]*)"', text, re.M).group(1).split()
        assert flags == list(gpu.LAUNCH_XLA_FLAGS), script
        assert float(re.search(r"MEM_FRACTION=([\d.]+)", text).group(1)) == gpu.LAUNCH_MEM_FRACTION, script


def test_without_the_cuda_plugin_compile_exits_2_naming_the_extra(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in gpu.PLUGINS else real(name, *a))
    assert main(["compile", "--config", "configs/tiny.yaml", "--topology", "h100-8"]) == 2
    assert "needs jax's CUDA plugin, which is not installed: pip install 'jaxcpt[gpu-compile]'" in capsys.readouterr().err


def test_without_ptxas_and_libdevice_the_error_names_the_extra_before_compiling(monkeypatch):
    """XLA itself would fail only at the first compile, with "libdevice not found at ./libdevice.10.bc"."""
    import os
    import shutil

    from jax._src import lib

    monkeypatch.setattr(lib, "cuda_path", "/nonexistent", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os.path, "isfile", lambda path: False)
    with pytest.raises(UserError, match=r"needs CUDA's ptxas and libdevice.*jaxcpt\[gpu-compile\]"):
        gpu.cuda_tools()


def test_a_cuda_plugin_without_a_gpu_runs_commands_on_the_cpu(monkeypatch):
    """The plugin's start-up checks fail without a GPU (a traceback per command); ask for the CPU instead."""
    from jaxcpt import cli

    real = importlib.util.find_spec
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "jax_cuda13_plugin" else
                        None if name in ("libtpu", "jax_cuda12_plugin") else real(name, *a))
    monkeypatch.setattr(gpu, "gpus_attached", lambda: False)
    cli._skip_tpu_runtime_off_tpu()
    assert __import__("os").environ.get("JAX_PLATFORMS") == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(gpu, "gpus_attached", lambda: True)  # on a GPU node jax picks the GPU itself
    cli._skip_tpu_runtime_off_tpu()
    assert "JAX_PLATFORMS" not in __import__("os").environ


@needs_plugin
@pytest.mark.parametrize("name", ["h100-8", "h200-8", "b200-8", "2xh100-8"])
def test_the_cuda_plugin_describes_each_gpu_node_from_its_target_config(name):
    topology = parse_topology(name)
    devices = topology.devices()
    assert len(devices) == topology.num_chips
    assert {d.device_kind for d in devices} == {topology.model.device_kind}
    assert {d.process_index for d in devices} == set(range(topology.nodes))  # one process per node
    assert devices[0].compute_capability == "{}.{}".format(*topology.model.compute_capability)
    assert devices[0].client.runtime_type == "compile_only_runtime"


@needs_plugin
@pytest.mark.slow
def test_tiny_config_compiles_for_two_h100s_with_cudnn_attention_and_memory_the_sharding_predicts(tmp_path, capsys):
    from jaxcpt.train.config import load_train_config

    overrides = ["model.dtype=bfloat16", "mesh={data: 1, fsdp: -1}"]
    code = main(["compile", "--config", "configs/tiny.yaml", "--topology", "h100-2", "--no-layout", "--json",
                 str(tmp_path / "r.json"), *overrides])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())
    plugin = next(key for key in report if key.startswith("jax-cuda") and key.endswith("-plugin"))
    assert report[plugin] == jax.__version__ and report["git_commit"]
    entry = report["reports"][0]
    assert (entry["chips"], entry["mesh"]["fsdp"]) == (2, 2)
    assert entry["pallas_kernel_calls"] >= 2  # cuDNN flash attention forward and backward, partitioned by GSPMD
    assert "cuDNN attention calls lowered" in out and "sm_90" in out
    memory = entry["memory"]
    cfg = load_train_config("configs/tiny.yaml", overrides).model
    # Every weight matrix is split over fsdp=2; only the RMSNorm scales are whole on each GPU. float32 master.
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert memory["params_bytes"] == 4 * ((cfg.num_params() - norms) // 2 + norms)
    assert memory["opt_state_bytes"] == pytest.approx(2 * memory["params_bytes"], rel=1e-3)  # Adam's two moments
    # XLA's arguments are exactly the state and batch the shardings predict; the state is donated
    assert memory["arguments_bytes"] == memory["state_bytes"] + memory["batch_bytes"]
    assert memory["aliased_bytes"] >= memory["state_bytes"]
    assert 0 < memory["temporaries_bytes"] and memory["fits"] and memory["hbm_bytes"] == gpu.MODELS["h100"].memory_bytes


# The shipped GPU configs, the node each is written for, and the compile recorded for it (docs/gpu.md).
from jaxcpt.aot.shipped import SHIPPED_GPU as SHIPPED_GPU_CONFIGS  # noqa: E402 - one list with the TPU rows'


@needs_plugin
@pytest.mark.slow
@pytest.mark.parametrize("config, topology, recorded", SHIPPED_GPU_CONFIGS)
def test_each_shipped_gpu_config_fits_its_node_within_10_percent_of_the_recorded_memory(config, topology, recorded):
    """~20-30 s each: the config as shipped, its architecture from jaxcpt.aot.architectures (init.path is not here)."""
    from jaxcpt.aot.command import resolve_model
    from jaxcpt.aot.compiler import compile_train_step
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(config, [])
    model_cfg, _ = resolve_model(cfg, None, None)
    result = compile_train_step(cfg, model_cfg, parse_topology(topology))
    before = json.loads((ROOT / recorded).read_text())
    entry = next(r for r in before["reports"] if r["topology"] == topology)
    assert result.memory.fits, result.memory.format()
    assert result.pallas_kernels >= 2  # bf16 on a GPU: auto is cuDNN attention
    assert result.memory.total == pytest.approx(entry["memory"]["total_bytes"], rel=0.10), (
        f"{config} on {topology} needs {result.memory.total / GiB:.2f} GiB per GPU, "
        f"{entry['memory']['total_bytes'] / GiB:.2f} GiB when {recorded} was recorded at {before['git_commit']}: "
        "re-measure with jaxcpt compile --json and say why it moved")

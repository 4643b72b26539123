"""`jaxcpt compile`'s parts that need no TPU compiler: topology names, the memory arithmetic, advice, errors.

The compiles themselves (libtpu) are in test_aot_tpu.py.
"""

import importlib.metadata
import importlib.util

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxcpt.aot import topology as topology_lib
from jaxcpt.aot.architectures import ARCHITECTURES, architecture, find_architecture
from jaxcpt.aot.memory import MemoryReport, levers, per_device_bytes, replicated_bytes
from jaxcpt.aot.topology import GiB, parse_topologies, parse_topology
from jaxcpt.cli import main
from jaxcpt.errors import UserError
from jaxcpt.sharding.mesh import build_mesh


# Slice shapes and chip counts as the Cloud TPU pages list them (docs.cloud.google.com/tpu/docs/v5p, v4,
# v5e, v6e): v4/v5p names count TensorCores, two per chip; v5e/v6e names count chips.
@pytest.mark.parametrize("name, topology_name, chips, hosts_bounds", [
    ("v5p-8", "v5p:2x2x1", 4, (2, 2, 1)),
    ("v5p-64", "v5p:2x4x4", 32, (2, 2, 1)),
    ("v5p-128", "v5p:4x4x4", 64, (2, 2, 1)),
    ("v4-32", "v4:2x2x4", 16, (2, 2, 1)),
    ("v5litepod-16", "v5e:4x4", 16, (2, 2, 1)),
    ("v5e-8", "v5e:2x4", 8, (2, 4, 1)),
    ("v6e-256", "v6e:16x16", 256, (2, 2, 1)),
    ("v6e-1", "v6e:1x1", 1, (1, 1, 1)),
    ("v5p:4x4x12", "v5p:4x4x12", 192, (2, 2, 1)),
])
def test_topology_names_map_to_cloud_tpu_slice_shapes(name, topology_name, chips, hosts_bounds):
    topology = parse_topology(name)
    assert (topology.topology_name, topology.num_chips, topology.chips_per_host_bounds) == (
        topology_name, chips, hosts_bounds)


def test_multi_slice_prefix_and_num_slices_multiply_the_chips():
    assert parse_topology("2xv5p-64").num_slices == 2
    assert parse_topology("2xv5p-64").num_chips == 64
    assert parse_topology("2xv5p-64").name == "2xv5p-64"
    assert parse_topology("v5p-64", num_slices=4).num_chips == 128  # --num-slices overrides
    assert [t.name for t in parse_topologies("v5p-8, v5e-16,v6e-8")] == ["v5p-8", "v5e-16", "v6e-8"]


def test_hbm_per_chip_is_the_documented_capacity():
    assert {name: g.hbm_bytes / GiB for name, g in topology_lib.GENERATIONS.items()} == {
        "v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}


@pytest.mark.parametrize("name, message", [
    ("v5p-63", "two per chip"),
    ("v5p-96", "give the shape explicitly, e.g. v5p:4x4x12"),
    ("v7x-8", "unknown TPU generation 'v7x'"),
    ("tpu-64", "write it like v5p-64"),
    ("v5p:4x4", "3 torus axes"),
])
def test_unreadable_topologies_are_errors_naming_the_fix(name, message):
    with pytest.raises(UserError, match=message):
        parse_topology(name)


def test_missing_libtpu_is_an_error_naming_the_extra_and_the_pin(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    pin = topology_lib._libtpu_pin()
    assert pin  # jax's own tpu extra names the libtpu it is built for
    with pytest.raises(UserError, match=rf"needs libtpu.*jaxcpt\[tpu-compile\].*libtpu {pin.replace('.', '[.]')}"):
        topology_lib.check_libtpu()


def test_a_libtpu_for_another_jax_is_an_error(monkeypatch):
    real_spec, real_version = importlib.util.find_spec, importlib.metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real_spec(name, *a))
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.1" if name == "libtpu" else real_version(name))
    with pytest.raises(UserError, match=r"libtpu 0\.0\.1 is installed but jax .* is built for libtpu"):
        topology_lib.check_libtpu()


def test_per_device_bytes_follow_each_leafs_sharding():
    mesh = build_mesh({"data": 2, "fsdp": 4}, jax.devices()[:8])
    split = jax.ShapeDtypeStruct((64, 32), np.float32, sharding=NamedSharding(mesh, PartitionSpec("fsdp", None)))
    both = jax.ShapeDtypeStruct((64, 32), jax.numpy.bfloat16, sharding=NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    whole = jax.ShapeDtypeStruct((10,), np.int32, sharding=NamedSharding(mesh, PartitionSpec()))
    tree = {"a": split, "b": [both, whole]}
    assert per_device_bytes(tree) == 16 * 32 * 4 + 8 * 32 * 2 + 10 * 4
    assert replicated_bytes(tree) == 10 * 4


def _report(**kw):
    values = dict(hbm=16 * GiB, params=1 * GiB, opt_state=2 * GiB, batch=GiB // 64, arguments=3 * GiB + GiB // 64,
                  outputs=3 * GiB, aliased=3 * GiB, temporaries=10 * GiB, code=GiB // 128)
    return MemoryReport(**{**values, **kw})


def test_total_counts_donated_outputs_once():
    report = _report()
    assert report.total == report.arguments + report.temporaries + report.code
    assert report.state == 3 * GiB
    assert report.fits and not report.near_limit
    assert _report(temporaries=12 * GiB + GiB // 2).near_limit
    assert _report(outputs=4 * GiB).total == report.total + GiB  # an output not aliased counts in full


def test_the_report_prints_each_part_and_the_verdict():
    text = _report(temporaries=14 * GiB).format()
    assert "parameters" in text and "1.00 GiB" in text and "temporaries (XLA)" in text
    assert "of 16.00 GiB HBM" in text and "DOES NOT FIT" in text


def test_a_compile_the_tpu_compiler_refuses_for_hbm_is_reported_as_not_fitting():
    mesh = build_mesh({"data": 8}, jax.devices()[:8])
    replicated = NamedSharding(mesh, PartitionSpec())
    state = {"params": jax.ShapeDtypeStruct((256, 256), np.float32, sharding=replicated),
             "opt_state": [jax.ShapeDtypeStruct((256, 256), np.float32, sharding=replicated)] * 2,
             "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated)}
    batch = {"inputs": jax.ShapeDtypeStruct((64, 128), np.int32, sharding=NamedSharding(mesh, PartitionSpec("data")))}
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (166.82G) "
               "exceeds available HBM (15.75G).")
    report = MemoryReport.from_refusal(message, state, batch, hbm=16 * GiB)
    assert report.refused and not report.fits
    assert report.temporaries == int(166.82 * GiB)
    assert (report.params, report.opt_state, report.batch) == (256 * 256 * 4, 2 * 256 * 256 * 4 + 4, 8 * 128 * 4)
    assert "compiler refused" in report.format() and "DOES NOT FIT" in report.format()
    assert MemoryReport.from_refusal("INTERNAL: something else", state, batch, hbm=16 * GiB) is None


def _levers(report, **kw):
    args = dict(remat="none", grad_accum_steps=1, micro_batch=64, batch_ways=8, loss_chunk_size=2048, seq_len=8192,
                logits_chunk_bytes=2 * GiB, mesh_shape={"data": 4, "fsdp": 8}, sharded_state_bytes=3 * GiB)
    return levers(report, **{**args, **kw})


def test_levers_for_activations_come_first_when_temporaries_dominate():
    found = _levers(_report(temporaries=30 * GiB))
    assert [lever.overrides for lever in found] == [
        ("optim.grad_accum_steps=2",), ("model.remat=minimal",), ("train.loss_chunk_size=1024",),
        ("mesh.data=2", "mesh.fsdp=16")]
    assert "64 -> 32 rows" in found[0].why and "29.00 GiB" in found[0].why  # temporaries minus the gradient buffer
    assert "saves ~1.50 GiB" in found[-1].why


def test_levers_for_the_state_come_first_when_it_dominates():
    found = _levers(_report(params=8 * GiB, opt_state=16 * GiB, temporaries=10 * GiB), remat="full",
                    micro_batch=8, mesh_shape={"data": 1, "fsdp": 32})
    assert found[0].overrides == () and "use a larger slice" in found[0].why
    assert all("remat" not in o for lever in found for o in lever.overrides)  # full is the strongest already
    assert all("grad_accum" not in o for lever in found for o in lever.overrides)  # 8 rows cannot split in 2 over 8


def test_architectures_have_the_published_parameter_counts():
    # The models' published sizes (Hugging Face model cards: 8.03B, 1.24B, 7.62B parameters); Qwen3.5-9B is its
    # text model alone (no vision tower), as transformers 5.25 counts Qwen3_5TextConfig()'s parameters.
    counts = {name: architecture(name).num_params() for name in ARCHITECTURES}
    assert counts == {"Llama-3.1-8B": 8_030_261_248, "Llama-3.2-1B": 1_235_814_400, "Qwen2.5-7B": 7_615_616_512,
                      "Qwen3.5-9B": 8_953_803_264}


def test_a_model_directory_is_matched_to_its_architecture_by_name():
    assert find_architecture("/mnt/models/Llama-3.1-8B") == "Llama-3.1-8B"
    assert find_architecture("/models/qwen2.5-7b/") == "Qwen2.5-7B"
    assert find_architecture("/models/my-own-model") is None


def test_compile_without_the_models_config_json_names_the_options(tmp_path, capsys):
    code = main(["compile", "--config", "configs/llama3.2-1b-1gpu.yaml", "--topology", "v5p-8",
                 f"init.path={tmp_path / 'my-model'}"])
    assert code == 2
    assert "--model-config" in capsys.readouterr().err


def test_compile_reads_a_model_config_json(tmp_path):
    import json

    from jaxcpt.aot.command import resolve_model
    from jaxcpt.train.config import load_train_config

    (tmp_path / "config.json").write_text(json.dumps(ARCHITECTURES["Llama-3.2-1B"]))
    cfg = load_train_config("configs/llama3.2-1b-1gpu.yaml", [])
    model, source = resolve_model(cfg, str(tmp_path / "config.json"), None)
    assert model.num_params() == 1_235_814_400 and model.remat == "minimal" and model.dtype == "bfloat16"
    assert source == str(tmp_path / "config.json")


def test_commands_off_a_tpu_host_do_not_start_the_tpu_runtime(tmp_path):
    """With libtpu installed (the test extra) and no TPU chips, a command's output is its own message,
    not a screen of libtpu's failed metadata lookups."""
    import os
    import subprocess
    import sys

    pytest.importorskip("libtpu")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "-m", "jaxcpt.cli", "evaluate", str(tmp_path / "missing"), "--tasks", "x"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown lm-eval task" in result.stderr  # names checked before any weights
    assert "TPU_WORKER_HOSTNAMES" not in result.stderr + result.stdout


def test_every_shipped_accelerator_config_has_a_compile_check():
    """A config added to configs/ for a TPU or GPU gets a row in jaxcpt.aot.shipped (the slow test compiles it)."""
    from pathlib import Path

    from jaxcpt.aot.shipped import NOT_FOR_ACCELERATORS, SHIPPED, SHIPPED_GPU

    configs = {f"configs/{p.name}" for p in Path("configs").glob("*.yaml")}
    checked = {row.config for row in SHIPPED if row.checked_in_ci} | {c for c, _, _ in SHIPPED_GPU} | NOT_FOR_ACCELERATORS
    assert configs <= checked, f"no compile check for {sorted(configs - checked)}: add a row to jaxcpt/aot/shipped.py"
    for row in SHIPPED:
        recorded = row.recorded()
        assert recorded is not None and recorded["memory"]["fits"], row.name
        assert recorded["git_commit"], f"{row.results_path.name} does not say which commit it was compiled at"


def test_the_accelerators_page_tables_are_generated_from_the_recorded_jsons():
    """docs/accelerators.md's tables are what benchmarks/compile_configs.py --docs-only writes from the JSONs."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("compile_configs", "benchmarks/compile_configs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = Path("docs/accelerators.md").read_text()
    for name, block in script.docs_tables().items():
        assert block and block in text, f"docs/accelerators.md's {name} table is stale: run python " \
                                        "benchmarks/compile_configs.py --docs-only"

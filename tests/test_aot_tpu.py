"""`jaxcpt compile` for real: the TPU compiler (libtpu) compiles the train step for a v5p slice on this CPU host.

Splash attention is lowered as a Pallas TPU (Mosaic) kernel here, not in interpret mode,
and XLA's memory plan is checked against what the shardings predict per chip. Needs libtpu
(in the `test` extra: README's test command installs it); skipped with the install line
where it is missing.
"""

import importlib.util
import math

import jax
import numpy as np
import pytest

from jaxcpt.aot.command import resolve_model
from jaxcpt.aot.compiler import compile_train_step
from jaxcpt.aot.shipped import MEMORY_TOLERANCE, SHIPPED, memory_moved
from jaxcpt.aot.topology import GiB, parse_topology
from jaxcpt.cli import main
from jaxcpt.train.config import load_train_config

# The tiny config compiles in seconds, so the default suite lowers splash for TPU too; the shipped configs are slow.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed: pip install 'jaxcpt[tpu-compile]' (in the test extra)")
TPU_MIN_BUFFER = 512  # the TPU allocator rounds each buffer up to 512 bytes (scalars, tiny vectors)


def _predicted_argument_bytes(program) -> int:
    """Per-chip bytes of the step's arguments from shapes, dtypes and shardings alone (no XLA)."""
    leaves = jax.tree.leaves((program.abstract_state(), program.abstract_batch()))
    total = 0
    for leaf in leaves:
        nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        total += -(-nbytes // TPU_MIN_BUFFER) * TPU_MIN_BUFFER
    return total


def _assert_consistent(result, params_per_chip: int):
    memory = result.memory
    assert result.pallas_kernels >= 3  # splash forward, dq and dkv: the real Mosaic kernel, not interpret mode
    assert memory.fits
    assert min(memory.params, memory.opt_state, memory.batch, memory.temporaries, memory.code) > 0
    assert memory.params == params_per_chip
    assert memory.opt_state == pytest.approx(2 * memory.params, rel=1e-3)  # Adam's two moments, float32
    assert memory.arguments == _predicted_argument_bytes(result.program)
    assert memory.aliased >= memory.params + memory.opt_state  # the state is donated and updated in place
    assert memory.total <= memory.hbm


@pytest.fixture(scope="module")
def tiny_on_v5p_8():
    cfg = load_train_config("configs/tiny.yaml", [])  # attention: auto, which is splash on TPU
    return cfg, compile_train_step(cfg, cfg.model, parse_topology("v5p-8"))


def test_tiny_config_compiles_for_v5p_8_with_splash_and_memory_the_sharding_predicts(tiny_on_v5p_8):
    cfg, result = tiny_on_v5p_8
    assert dict(result.mesh.shape) == {"data": 4}  # tiny's mesh {data: -1} on the 4 chips
    _assert_consistent(result, params_per_chip=4 * cfg.model.num_params())  # replicated float32


@pytest.mark.slow
@pytest.mark.parametrize("row", [r for r in SHIPPED if r.checked_in_ci], ids=lambda row: row.name)
def test_shipped_config_fits_its_topology_as_recorded(row):
    """Each shipped accelerator config, compiled for its topology with the remat policy it names, fits the
    chip's HBM and needs within 10% of the per-chip memory recorded in benchmarks/results/ (with its commit).

    The model's shapes come from the named architecture, as `jaxcpt compile` takes them when init.path is
    not on this host. At 0acb231 the 8B config's `minimal` needed 210.66 GiB of v5p's 95 GiB."""
    recorded = row.recorded()
    rerecord = f"python benchmarks/compile_configs.py --only {row.name}"
    assert recorded is not None, f"no recorded compile for {row.name}; run {rerecord}"
    cfg = load_train_config(row.config, list(row.overrides))
    model_cfg, _ = resolve_model(cfg, None, None)
    result = compile_train_step(cfg, model_cfg, parse_topology(row.topology))
    memory = result.memory
    assert memory.fits, (f"{row.config} with remat {model_cfg.remat} needs {memory.total / GiB:.2f} GiB per chip on "
                         f"{row.topology}, more than its {memory.hbm / GiB:.0f} GiB:\n{memory.format()}")
    assert recorded["remat"] == model_cfg.remat, f"{row.results_path.name} records another policy; run {rerecord}"
    moved = memory_moved(memory.total, recorded["memory"]["total_bytes"])
    assert moved <= MEMORY_TOLERANCE, (
        f"{row.config} on {row.topology}: {memory.total / GiB:.2f} GiB per chip, {moved:.0%} away from the "
        f"{recorded['memory']['total_bytes'] / GiB:.2f} GiB recorded at {recorded['git_commit']}; if the change is "
        f"meant, run {rerecord} (it also regenerates docs/accelerators.md)")
    if cfg.mesh.get("context", 1) > 1:  # ring attention (model/context_parallel.py) with splash blocks: three
        # kernels (the own causal block, the ring steps' [2c, c] and [c, 2c] blocks), each with its dq and dkv
        # kernels, and the three forwards once more where remat reruns attention
        assert result.pallas_kernels == 3 * 3 + (3 if model_cfg.remat != "none" else 0)
    else:
        assert result.pallas_kernels >= 3  # splash forward, dq and dkv: the real Mosaic kernel, not interpret mode
    assert memory.arguments == _predicted_argument_bytes(result.program)  # XLA's plan is the shardings' prediction
    assert memory.aliased >= memory.params + memory.opt_state  # the state is donated and updated in place


def test_a_batch_too_large_for_the_chip_exits_1_naming_what_to_change(capsys, tmp_path):
    code = main(["compile", "--config", "configs/tiny.yaml", "--topology", "v5e-4", "--no-layout",
                 "train.batch_size=65536", "--json", str(tmp_path / "report.json")])
    out = capsys.readouterr().out
    assert code == 1
    # 65536 rows need ~170 GiB of temporaries: XLA:TPU itself refuses the step (its HBM check), and we report it
    assert "the TPU compiler refused the step" in out
    assert "DOES NOT FIT" in out and "What would lower it" in out
    assert "optim.grad_accum_steps=2" in out and "micro-batches of 65536 -> 32768 rows" in out
    import json

    report = json.loads((tmp_path / "report.json").read_text())["reports"][0]
    assert not report["memory"]["fits"] and report["levers"]


def test_explore_compiles_each_remat_policy_and_full_reruns_attention_and_saves_memory():
    """`jaxcpt compile --explore`'s rows on the tiny config: remat full needs less memory than none, reruns
    the splash forward (4 Pallas calls against 3: its residuals carry no name) and the share of the step
    the model's FLOP count says."""
    from jaxcpt.aot.explore import explore_remat, format_table

    topology = parse_topology("v5p-8")
    rows = explore_remat(lambda extra: load_train_config("configs/tiny.yaml", list(extra)), lambda c: c.model,
                         topology, policies=("none", "full"))
    none, full = rows
    assert (none.policy, full.policy) == ("none", "full") and none.fits and full.fits
    assert full.total_bytes < none.total_bytes
    assert (none.pallas_kernel_calls, full.pallas_kernel_calls) == (3, 4)
    assert none.recompute_flops == 0 and 0.15 < full.recompute_fraction < 1 / 3
    assert "full" in format_table(rows, topology.generation.hbm_bytes)

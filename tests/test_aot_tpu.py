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

from jaxcpt.aot.compiler import compile_train_step
from jaxcpt.aot.topology import parse_topology
from jaxcpt.cli import main
from jaxcpt.train.config import load_train_config

# The tiny config compiles in seconds, so the default suite lowers splash for TPU too; the 1B shape is slow.
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
def test_llama_3_2_1b_compiles_for_v5p_8_with_fsdp_and_memory_the_sharding_predicts():
    from jaxcpt.aot.command import resolve_model

    cfg = load_train_config("configs/llama3.2-1b-1gpu.yaml", ["mesh={data: 1, fsdp: -1}", "data.seq_len=2048",
                                                               "train.batch_size=16"])
    model_cfg, _ = resolve_model(cfg, None, None)  # init.path .../Llama-3.2-1B: the named architecture
    result = compile_train_step(cfg, model_cfg, parse_topology("v5p-8"))
    assert dict(result.mesh.shape) == {"data": 1, "fsdp": 4}
    assert (model_cfg.dtype, model_cfg.remat) == ("bfloat16", "minimal")
    # Every weight has an embed dimension (2048), split over fsdp=4; only the RMSNorm scales
    # (2 per layer and the final one) are replicated. float32.
    norms = (2 * model_cfg.num_layers + 1) * model_cfg.hidden_size
    _assert_consistent(result, params_per_chip=4 * ((model_cfg.num_params() - norms) // 4 + norms))


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

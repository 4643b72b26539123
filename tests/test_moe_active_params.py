"""Every token/parameter figure jaxcpt prints for an MoE model says "total" and "active" (issue 22, item 7)."""

import dataclasses

from test_plan_sweep import spec, write_config
from train_helpers import make_corpora, tiny_overrides

from jaxcpt.cli import main
from jaxcpt.model import moe as moe_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.plan.sweep import run_sweep
from jaxcpt.train.routing import describe_moe

MOE = moe_lib.MoeConfig(num_experts=4, top_k=2, expert_intermediate_size=16)
CFG = ModelConfig(family="qwen3_moe", vocab_size=64, vocab_pad_multiple=1, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, qk_norm=True, moe=MOE)
MOE_OVERRIDES = ["model.family=qwen3_moe", "model.qk_norm=true", "model.moe.num_experts=4", "model.moe.top_k=2",
                 "model.moe.expert_intermediate_size=16"]


def test_parameter_phrase_names_total_and_active_for_an_moe_model():
    # embedding 64x32 + head 32x64 + final norm 32; per layer: attention 32*8*(4+4) + 4*8*32, norms 2*32 + 2*8,
    # router 32*4 and 4 experts of 3*32*16 (2 of them active)
    attention = 32 * 8 * (4 + 2 * 2) + 4 * 8 * 32 + 2 * 32 + 2 * 8
    expert = 3 * 32 * 16
    total = 2 * 64 * 32 + 32 + 2 * (attention + 32 * 4 + 4 * expert)
    active = total - 2 * 2 * expert
    assert (CFG.num_params(), CFG.num_active_params()) == (total, active)
    assert CFG.describe_params(1e3, "k", digits=3) == f"{total / 1e3:.3f}k parameters total, {active / 1e3:.3f}k active per token"
    assert dataclasses.replace(CFG, moe=None).describe_params() == f"{dataclasses.replace(CFG, moe=None).num_params() / 1e6:.1f}M parameters"


def test_check_line_gives_tokens_per_total_and_per_active_parameter():
    line = describe_moe(CFG, 1_000_000)
    assert f"{1e6 / CFG.num_params():.3g} per total parameter" in line
    assert f"{1e6 / CFG.num_active_params():.3g} per active parameter" in line
    assert "4 experts, top 2 per token" in line and "selection bias" not in line
    biased = dataclasses.replace(CFG, moe=dataclasses.replace(MOE, router_bias_update_rate=0.001))
    assert "selection bias, rate 0.001 per step (exports: drop it)" in describe_moe(biased, 10, "drop")


def test_train_check_of_an_moe_run_says_total_and_active(tmp_path, capsys):
    corpora = make_corpora(tmp_path / "data")
    assert main(["train", "--check", *tiny_overrides(tmp_path / "run", corpora), *MOE_OVERRIDES]) == 0
    out = capsys.readouterr().out
    assert "M parameters total" in out and "M active per token" in out
    assert "moe          4 experts, top 2 per token" in out and "per active parameter" in out


def test_sweep_manifest_records_total_and_active_parameters_of_an_moe_size(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    manifest = run_sweep(spec(config, sizes={"moe": MOE_OVERRIDES}), tmp_path / "sweep", dry_run=True)
    run = next(iter(manifest["runs"].values()))
    assert run["params"] > run["active_params"]  # the laws' N is the total; the active count is kept beside it
    assert "size moe is a mixture of experts" in capsys.readouterr().out

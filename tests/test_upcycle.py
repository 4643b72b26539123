"""jaxcpt upcycle: dense HF models become MoE models that transformers loads and that compute the dense function.

The oracle is transformers: the upcycled directory is loaded with AutoModelForCausalLM and its
float32 logits are compared with the dense model's on the same tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_models import make_hf_model
from jaxcpt.adapt.upcycle import plan_upcycle, upcycle
from jaxcpt.errors import UserError

TOKENS = torch.tensor([[3, 17, 42, 99, 5, 250, 7, 1, 64, 33, 128, 2, 11, 200, 9, 77]])


@pytest.fixture(scope="module")
def dense_dirs(tmp_path_factory):
    dirs = {}
    for name in ("llama_gqa", "mistral_window", "qwen2_tied", "qwen3_untied"):
        dirs[name] = tmp_path_factory.mktemp(name)
        make_hf_model(name, dirs[name])
    return dirs


def _logits(directory) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits.numpy()


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("name,model_type", [("llama_gqa", "mixtral"), ("mistral_window", "mixtral"),
                                             ("qwen2_tied", "qwen2_moe"), ("qwen3_untied", "qwen3_moe")])
def test_upcycled_model_has_the_dense_logits_in_transformers(dense_dirs, tmp_path, name, model_type):
    out, plan = upcycle(dense_dirs[name], tmp_path / "moe", experts=4, top_k=2)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    router = dict(model.named_parameters())[next(n for n, _ in model.named_parameters() if n.endswith("gate.weight")
                                                 and "layers.0" in n and "shared" not in n)]
    assert router.shape == (4, 64) and float(router.detach().abs().max()) > 0  # random router, still exact
    assert _rel(_logits(out), _logits(dense_dirs[name])) < 1e-5


@pytest.mark.parametrize("name,copies,top_k,split", [("llama_gqa", 3, 1, 4), ("qwen2_tied", 3, 1, 2),
                                                     ("qwen3_untied", 4, 2, 2)])
def test_granular_split_keeps_the_function_with_one_router_row_per_copy(dense_dirs, tmp_path, name, copies, top_k,
                                                                       split):
    # qwen2 3 x 2 top-1: over six tied logits torch.topk picks experts 3 and 5 (two halves of different copies),
    # so an exact start must not rest on tie-breaking: each copy's experts share one random router row.
    out, plan = upcycle(dense_dirs[name], tmp_path / "moe", experts=copies, top_k=top_k, split=split)
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == top_k * split
    assert config.get("num_local_experts", config.get("num_experts")) == copies * split
    assert plan.preservation()[0] and plan.router_std > 0
    assert _rel(_logits(out), _logits(dense_dirs[name])) < 1e-5


def test_split_with_a_zero_router_is_recorded_as_resting_on_tie_breaking(dense_dirs, tmp_path):
    out, _ = upcycle(dense_dirs["llama_gqa"], tmp_path / "moe", experts=2, top_k=1, split=2, router_std=0.0)
    record = json.loads((out / "jaxcpt_adaptation.json").read_text())["moe"]
    assert record["function_preserved"] is False and "ties" in record["why"]
    assert record["expert_slice"] == [0, 1, 0, 1]


def test_noise_is_seeded_recorded_and_changes_the_function(dense_dirs, tmp_path):
    a, _ = upcycle(dense_dirs["llama_gqa"], tmp_path / "a", experts=2, top_k=1, noise=0.05, seed=3)
    b, _ = upcycle(dense_dirs["llama_gqa"], tmp_path / "b", experts=2, top_k=1, noise=0.05, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    record = json.loads((a / "jaxcpt_adaptation.json").read_text())
    assert record["moe"]["function_preserved"] is False and record["history"][-1]["operation"] == "upcycle"
    assert record["moe"]["router_param"] == "layers.router" and record["moe"]["noise"] == 0.05
    assert _rel(_logits(a), _logits(dense_dirs["llama_gqa"])) > 1e-4


def test_upcycle_copies_the_tokenizer_and_untouched_tensors_bit_for_bit(dense_dirs, tmp_path):
    from safetensors.numpy import load_file

    source = dense_dirs["llama_gqa"]
    (source / "tokenizer.json").write_text('{"stand-in": true}')
    out, _ = upcycle(source, tmp_path / "moe", experts=2, top_k=2)
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'
    dense, moe = load_file(source / "model.safetensors"), load_file(out / "model.safetensors")
    for name, value in dense.items():
        if ".mlp." not in name:
            np.testing.assert_array_equal(moe[name], value)
    np.testing.assert_array_equal(moe["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                                  dense["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("options,message", [
    (dict(experts=1, top_k=1), "--experts must be >= 2"),
    (dict(experts=4, top_k=5), "--top-k must be between 1 and --experts (4)"),
    (dict(experts=4, top_k=2, split=5), "--split 5 does not divide"),
])
def test_bad_expert_counts_are_refused_with_the_fix(options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_upcycle({"model_type": "llama", "intermediate_size": 96, "num_hidden_layers": 2, "hidden_size": 64},
                     **options)


def test_family_without_moe_counterpart_is_refused_by_the_command(tmp_path):
    source = tmp_path / "gemma"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gemma2", "intermediate_size": 96}))
    result = subprocess.run([sys.executable, "-m", "jaxcpt.cli", "upcycle", str(source), "--experts", "4",
                             "--top-k", "2", "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode != 0
    assert "model_type 'gemma2' has no MoE counterpart" in result.stderr and "llama -> mixtral" in result.stderr
    assert not (tmp_path / "out").exists()


def test_llama_with_biases_is_refused(tmp_path):
    with pytest.raises(UserError, match="attention_bias/mlp_bias, which Mixtral lacks"):
        plan_upcycle({"model_type": "llama", "intermediate_size": 96, "num_hidden_layers": 2, "hidden_size": 64,
                      "mlp_bias": True}, experts=2, top_k=1)

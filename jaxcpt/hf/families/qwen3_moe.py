"""Qwen3-MoE (``Qwen3MoeForCausalLM``, Qwen3-30B-A3B, 235B-A22B): Qwen3's attention (q/k RMSNorm per head)
with a mixture-of-experts MLP on every layer: softmax top-k routing, ``norm_topk_prob`` renormalising.

transformers 5 holds the experts fused in memory (``mlp.experts.gate_up_proj`` [X, 2F, E]) but
``save_pretrained`` writes, and the released checkpoints hold, one Linear per expert
(``mlp.experts.{j}.gate_proj.weight`` [F, E]); those are the names here. Layers with a dense MLP
(``decoder_sparse_step`` > 1 or ``mlp_only_layers``) are refused: every released Qwen3-MoE has
experts on every layer, and the scanned layer stack holds one MLP kind.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.mapping import LLAMA_NORMS, ExpertNames
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.moe import MoeConfig


def num_experts(hf: dict) -> int:
    """HF writes num_experts in configs of its own, num_local_experts when it saves (an attribute_map alias)."""
    value = hf.get("num_experts", hf.get("num_local_experts"))
    if value is None:
        raise HFFormatError("config.json: an MoE checkpoint needs num_experts (or num_local_experts)")
    return int(value)


def refuse_dense_layers(hf: dict, where: str) -> None:
    step, dense = int(hf.get("decoder_sparse_step") or 1), list(hf.get("mlp_only_layers") or [])
    if step != 1 or dense:
        raise HFFormatError(f"{where}: decoder_sparse_step={step}, mlp_only_layers={dense} mix dense and MoE layers; "
                            "jaxcpt supports MoE on every layer (decoder_sparse_step 1, mlp_only_layers [])")


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    refuse_dense_layers(hf, where)
    attention_bias = bool(hf["attention_bias"])
    window = hf["sliding_window"] if hf["use_sliding_window"] else None  # transformers slides every layer then
    moe = MoeConfig(num_experts=num_experts(hf), top_k=int(hf["num_experts_per_tok"]),
                    expert_intermediate_size=int(hf["moe_intermediate_size"]),
                    norm_topk_prob=bool(hf["norm_topk_prob"]),
                    router_aux_loss_coef=float(hf["router_aux_loss_coef"]) if hf.get("output_router_logits") else 0.0)
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, sliding_window=int(window) if window else None,
                moe=moe, **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("qwen3_moe exports a single attention_bias; qkv_bias and o_bias must agree")
    moe = cfg.moe
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, decoder_sparse_step=1, mlp_only_layers=[],
                num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                moe_intermediate_size=moe.expert_intermediate_size, norm_topk_prob=moe.norm_topk_prob,
                output_router_logits=moe.router_aux_loss_coef > 0,
                router_aux_loss_coef=moe.router_aux_loss_coef or 0.001, **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="qwen3_moe", model_type="qwen3_moe", architecture="Qwen3MoeForCausalLM",
    declared=dict(qk_norm=True), expresses=("qkv_bias", "o_bias", "sliding_window"),
    # transformers' Qwen3MoeConfig defaults for keys a config.json may omit
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  use_sliding_window=False, sliding_window=None, num_key_value_heads=4, attention_bias=False,
                  # num_local_experts: the key save_pretrained writes (num_experts, its alias, wins when given)
                  num_local_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                  router_aux_loss_coef=0.001, output_router_logits=False, intermediate_size=6144),
    read=read, write=write, norms=LLAMA_NORMS, sliding="every layer (`use_sliding_window`)",
    experts=ExpertNames(router="mlp.gate.weight", gate="mlp.experts.{j}.gate_proj.weight",
                        up="mlp.experts.{j}.up_proj.weight", down="mlp.experts.{j}.down_proj.weight"),
)

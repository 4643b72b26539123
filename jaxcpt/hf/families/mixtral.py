"""Mixtral (``MixtralForCausalLM``): Mistral's attention with a mixture of experts on every layer,
softmax top-k routing renormalised (always), an optional sliding window on every layer.

``intermediate_size`` is each expert's width. Checkpoints hold one Linear per expert under
``block_sparse_moe.experts.{j}.w1`` (gate), ``w3`` (up), ``w2`` (down), the router under
``block_sparse_moe.gate``; transformers 5 fuses them in memory and writes these names back.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.families.qwen3_moe import num_experts
from jaxcpt.hf.mapping import LLAMA_NORMS, ExpertNames
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.moe import MoeConfig


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    if float(hf.get("router_jitter_noise") or 0.0):
        raise HFFormatError(f"{where}: router_jitter_noise={hf['router_jitter_noise']} (random noise on the router "
                            "logits in training) is not supported; set it to 0.0")
    window = hf.get("sliding_window")
    moe = MoeConfig(num_experts=num_experts(hf), top_k=int(hf["num_experts_per_tok"]),
                    expert_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                    router_aux_loss_coef=float(hf["router_aux_loss_coef"]) if hf.get("output_router_logits") else 0.0)
    return dict(sliding_window=int(window) if window else None, moe=moe, **flat_rope(hf, where, 1e6))


def write(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    if not moe.norm_topk_prob:
        raise HFFormatError("a mixtral export always renormalises its top-k weights; set model.moe.norm_topk_prob")
    if moe.expert_intermediate_size != cfg.intermediate_size:
        raise HFFormatError(f"mixtral's intermediate_size is each expert's width: model.intermediate_size "
                            f"({cfg.intermediate_size}) must equal model.moe.expert_intermediate_size "
                            f"({moe.expert_intermediate_size})")
    return dict(hidden_act="silu", sliding_window=cfg.sliding_window, num_local_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, output_router_logits=moe.router_aux_loss_coef > 0,
                router_aux_loss_coef=moe.router_aux_loss_coef or 0.001, router_jitter_noise=0.0,
                **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="mixtral", model_type="mixtral", architecture="MixtralForCausalLM",
    declared={}, expresses=("sliding_window",),
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  sliding_window=None, num_key_value_heads=8, num_experts_per_tok=2, num_local_experts=8,
                  router_aux_loss_coef=0.001, output_router_logits=False, bos_token_id=1, eos_token_id=2),
    read=read, write=write, norms=LLAMA_NORMS, sliding="every layer (`sliding_window`)",
    experts=ExpertNames(router="block_sparse_moe.gate.weight", gate="block_sparse_moe.experts.{j}.w1.weight",
                        up="block_sparse_moe.experts.{j}.w3.weight", down="block_sparse_moe.experts.{j}.w2.weight"),
)

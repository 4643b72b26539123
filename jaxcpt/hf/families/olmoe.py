"""OLMoE (``OlmoeForCausalLM``, allenai/OLMoE-1B-7B): Allen AI's fully open mixture of experts.

What its block does differently from Llama: RMSNorm on q and k over the whole projection (all heads'
channels at once: q_norm is ``[hidden_size]``, k_norm ``[(hidden_size // heads) * kv_heads]``, as OLMo 2/3),
and a mixture of experts on every layer whose top-k softmax probabilities are used as they are
(``norm_topk_prob`` false by default; a config.json may turn it on). ``intermediate_size`` is each
expert's width. The checkpoints hold one Linear per expert under ``mlp.experts.{j}.{gate,up,down}_proj``
and the router under ``mlp.gate`` (transformers 5 fuses them in memory and writes these names back).

``clip_qkv`` (q, k and v clamped after the norms; null in the released OLMoE) is refused, as is a
head_dim other than hidden_size / heads (transformers sizes the q norm by hidden_size, so such a
checkpoint does not load there either).
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
    if hf.get("clip_qkv") is not None:
        raise HFFormatError(f"{where}: clip_qkv={hf['clip_qkv']} (q, k and v clamped after the norms) is not "
                            "supported; the released OLMoE checkpoints have clip_qkv null")
    if hf.get("sliding_window"):
        raise HFFormatError(f"{where}: sliding_window={hf['sliding_window']} is set, but OLMoE attends to the full "
                            "causal context (transformers' eager attention ignores it); set it to null")
    heads, width = int(hf["num_attention_heads"]), int(hf["hidden_size"])
    if hf.get("head_dim") and int(hf["head_dim"]) * heads != width:
        raise HFFormatError(f"{where}: head_dim={hf['head_dim']} with {heads} heads is not hidden_size ({width}); "
                            "OLMoE's q/k norms span hidden_size, so head_dim must be hidden_size / num_attention_heads")
    attention_bias = bool(hf["attention_bias"])
    moe = MoeConfig(num_experts=num_experts(hf), top_k=int(hf["num_experts_per_tok"]),
                    expert_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=bool(hf["norm_topk_prob"]),
                    router_aux_loss_coef=float(hf["router_aux_loss_coef"]) if hf.get("output_router_logits") else 0.0)
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, moe=moe, **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    if moe is None:
        raise HFFormatError("an olmoe export needs experts: set model.moe (its checkpoints have no dense MLP)")
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("olmoe exports a single attention_bias; qkv_bias and o_bias must agree")
    if moe.expert_intermediate_size != cfg.intermediate_size:
        raise HFFormatError(f"olmoe's intermediate_size is each expert's width: model.intermediate_size "
                            f"({cfg.intermediate_size}) must equal model.moe.expert_intermediate_size "
                            f"({moe.expert_intermediate_size})")
    if cfg.head_size * cfg.num_heads != cfg.hidden_size:
        raise HFFormatError(f"an olmoe export needs head_dim x num_heads = hidden_size ({cfg.head_size} x "
                            f"{cfg.num_heads} != {cfg.hidden_size}): its q/k norms span hidden_size")
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, clip_qkv=None, num_experts=moe.num_experts,
                num_experts_per_tok=moe.top_k, norm_topk_prob=moe.norm_topk_prob,
                output_router_logits=moe.router_aux_loss_coef > 0,
                router_aux_loss_coef=moe.router_aux_loss_coef or 0.01, **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="olmoe", model_type="olmoe", architecture="OlmoeForCausalLM",
    declared=dict(qk_norm=True, qk_norm_scope="projection"), expresses=("qkv_bias", "o_bias"),
    # transformers' OlmoeConfig defaults for keys a config.json may omit
    defaults=dict(max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  # num_local_experts: the alias; num_experts, the key save_pretrained writes, wins when given
                  attention_bias=False, clip_qkv=None, num_local_experts=64, num_experts_per_tok=8,
                  norm_topk_prob=False, router_aux_loss_coef=0.01, output_router_logits=False, pad_token_id=1,
                  bos_token_id=None, eos_token_id=50279),
    read=read, write=write, norms=LLAMA_NORMS, sliding="no",
    experts=ExpertNames(router="mlp.gate.weight", gate="mlp.experts.{j}.gate_proj.weight",
                        up="mlp.experts.{j}.up_proj.weight", down="mlp.experts.{j}.down_proj.weight"),
)

"""Llama 2 / 3.x (``LlamaForCausalLM``): the plain pre-norm SwiGLU decoder every other family varies."""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.mapping import LLAMA_NORMS
from jaxcpt.model.config import ModelConfig


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    attention_bias = bool(hf["attention_bias"])  # one flag for q, k, v and o
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf["mlp_bias"]), **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("llama exports a single attention_bias; qkv_bias and o_bias must agree")
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1,
                **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="llama", model_type="llama", architecture="LlamaForCausalLM",
    declared={}, expresses=("qkv_bias", "o_bias", "mlp_bias"),
    defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2),
    read=read, write=write, norms=LLAMA_NORMS, sliding="no",
)

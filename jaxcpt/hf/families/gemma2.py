"""Gemma 2 (``Gemma2ForCausalLM``).

What its block does differently from Llama: RMSNorm scales by ``(1 + w)`` in float32; a
norm before *and after* both attention and MLP; GeGLU with the tanh GeLU; embeddings
times sqrt(hidden_size) in the compute dtype; attention scaled by
``query_pre_attn_scalar**-0.5``; attention logits and final logits soft-capped
(``cap * tanh(x / cap)``); sliding-window and global layers alternating (``layer_types``).
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import (Family, flat_rope, flat_rope_to_hf, layer_types_from_hf, refuse_bidirectional,
                                     require_activation, windows_from_hf)
from jaxcpt.model.config import ModelConfig

GEMMA_NORMS = (
    ("attn_norm", "input_layernorm"),
    ("post_attn_norm", "post_attention_layernorm"),  # in Llama this name is the pre-MLP norm
    ("mlp_norm", "pre_feedforward_layernorm"),
    ("post_mlp_norm", "post_feedforward_layernorm"),
)
GEMMA_BLOCK = dict(norm_plus_one=True, post_norms=True, activation="gelu_tanh", scale_embeddings=True)
GELU_TANH = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh"}  # one formula, two spellings
GEMMA_DEFAULTS = dict(head_dim=256, num_key_value_heads=4, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
                      attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096, bos_token_id=2,
                      eos_token_id=1, pad_token_id=0)


def gemma_block(hf: dict, where: str, default_types: list[str]) -> dict:
    """What Gemma 2 and 3 config.json files set alike."""
    refuse_bidirectional(hf, where)
    require_activation(hf, "hidden_activation", GELU_TANH, where)
    attention_bias = bool(hf["attention_bias"])
    types = layer_types_from_hf(hf, where, default_types)
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]),
                final_logit_softcap=_cap(hf.get("final_logit_softcapping")), **windows_from_hf(types, hf["sliding_window"]))


def gemma_block_to_hf(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError(f"{cfg.family} exports a single attention_bias; qkv_bias and o_bias must agree")
    return dict(hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias,
                query_pre_attn_scalar=_integral(cfg.query_pre_attn_scalar or cfg.head_size),  # transformers: an int
                final_logit_softcapping=cfg.final_logit_softcap, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_kinds()))


def _integral(value: float):
    return int(value) if float(value).is_integer() else value


def _cap(value):
    return float(value) if value else None


def read(hf: dict, where: str) -> dict:
    # sliding, full, sliding, ... unless layer_types says otherwise
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
    return dict(attn_logit_softcap=_cap(hf.get("attn_logit_softcapping")), **gemma_block(hf, where, default),
                **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    return dict(attn_logit_softcapping=cfg.attn_logit_softcap, **gemma_block_to_hf(cfg), **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="gemma2", model_type="gemma2", architecture="Gemma2ForCausalLM",
    declared=GEMMA_BLOCK,
    expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types", "query_pre_attn_scalar", "attn_logit_softcap",
               "final_logit_softcap"),
    defaults=dict(GEMMA_DEFAULTS, max_position_embeddings=8192, final_logit_softcapping=30.0,
                  attn_logit_softcapping=50.0),
    read=read, write=write, norms=GEMMA_NORMS, sliding="alternating with global layers (`layer_types`)",
)

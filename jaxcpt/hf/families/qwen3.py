"""Qwen3 dense (``Qwen3ForCausalLM``): Qwen2 without biases, with per-head RMSNorm on q and k before RoPE.

``head_dim`` is its own field (128 by default), not hidden_size / num_heads.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.families.qwen2 import DEFAULTS, qwen_windows, qwen_windows_to_hf
from jaxcpt.hf.mapping import LLAMA_NORMS
from jaxcpt.model.config import ModelConfig


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    attention_bias = bool(hf["attention_bias"])  # q, k, v and o alike
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, **qwen_windows(hf, where), **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("qwen3 exports a single attention_bias; qkv_bias and o_bias must agree")
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, **qwen_windows_to_hf(cfg), **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="qwen3", model_type="qwen3", architecture="Qwen3ForCausalLM",
    declared=dict(qk_norm=True), expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types"),
    defaults=dict(DEFAULTS, head_dim=128, attention_bias=False),
    read=read, write=write, norms=LLAMA_NORMS, sliding="per layer (`use_sliding_window`, `layer_types`)",
)

"""Mistral (``MistralForCausalLM``): Llama with one sliding window on every layer, no biases."""

from __future__ import annotations

from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.mapping import LLAMA_NORMS
from jaxcpt.model.config import ModelConfig


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    # transformers' Mistral applies sliding_window to every layer and ignores any layer_types
    window = hf.get("sliding_window")
    return dict(sliding_window=int(window) if window else None, **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    return dict(hidden_act="silu", sliding_window=cfg.sliding_window, **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="mistral", model_type="mistral", architecture="MistralForCausalLM",
    declared={}, expresses=("sliding_window",),
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                  sliding_window=4096, num_key_value_heads=8, bos_token_id=1, eos_token_id=2),
    read=read, write=write, norms=LLAMA_NORMS, sliding="every layer (`sliding_window`)",
)

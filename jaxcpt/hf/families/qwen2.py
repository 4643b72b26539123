"""Qwen2 / 2.5 (``Qwen2ForCausalLM``): Llama with q/k/v biases and optional per-layer sliding windows."""

from __future__ import annotations

from jaxcpt.hf.families.base import (Family, flat_rope, flat_rope_to_hf, layer_types_from_hf, require_activation,
                                     windows_from_hf)
from jaxcpt.hf.mapping import LLAMA_NORMS
from jaxcpt.model.config import ModelConfig

# transformers' Qwen2Config defaults; Qwen3 keeps them
DEFAULTS = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                use_sliding_window=False, sliding_window=4096, max_window_layers=28, num_key_value_heads=32)


def qwen_windows(hf: dict, where: str) -> dict:
    """Qwen's windows: ``layer_types`` when given, else layers from ``max_window_layers`` on slide
    (only with ``use_sliding_window``)."""
    window = hf["sliding_window"] if hf["use_sliding_window"] else None
    start = int(hf["max_window_layers"])
    default = ["sliding_attention" if window is not None and i >= start else "full_attention"
               for i in range(int(hf["num_hidden_layers"]))]
    return windows_from_hf(layer_types_from_hf(hf, where, default), window)


def qwen_windows_to_hf(cfg: ModelConfig) -> dict:
    kinds = cfg.layer_kinds()
    sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
    # layer_types is what transformers 5 reads; use_sliding_window + max_window_layers what older versions read
    return dict(use_sliding_window=bool(sliding), sliding_window=cfg.sliding_window, layer_types=list(kinds),
                max_window_layers=sliding[0] if sliding else cfg.num_layers)


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    return dict(**qwen_windows(hf, where), **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    return dict(hidden_act="silu", **qwen_windows_to_hf(cfg), **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="qwen2", model_type="qwen2", architecture="Qwen2ForCausalLM",
    declared=dict(qkv_bias=True), expresses=("sliding_window", "layer_types"),
    defaults=DEFAULTS, read=read, write=write, norms=LLAMA_NORMS,
    sliding="per layer (`use_sliding_window`, `layer_types`)",
)

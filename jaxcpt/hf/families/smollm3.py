"""SmolLM3 (``SmolLM3ForCausalLM``): Llama with some layers that use no position encoding (NoPE).

``no_rope_layers`` lists per layer 1 (rotates q and k by RoPE) or 0 (does not); by default
every fourth layer has no RoPE (``no_rope_layer_interval``). Windows are Qwen2-style
(``use_sliding_window`` with ``layer_types``); tied embeddings by default.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import (Family, flat_rope, flat_rope_to_hf, layer_types_from_hf, require_activation,
                                     windows_from_hf)
from jaxcpt.hf.mapping import LLAMA_NORMS
from jaxcpt.model.config import ModelConfig


def _rope_layers(hf: dict, where: str) -> tuple[bool, ...] | None:
    layers = int(hf["num_hidden_layers"])
    flags = hf.get("no_rope_layers")
    if flags is None:  # SmolLM3Config's default: every no_rope_layer_interval-th layer has none
        interval = int(hf.get("no_rope_layer_interval") or 4)
        flags = [int((i + 1) % interval != 0) for i in range(layers)]
    if len(flags) != layers or any(f not in (0, 1, True, False) for f in flags):
        raise HFFormatError(f"{where}: no_rope_layers must list 0 or 1 for each of the {layers} layers, got {flags}")
    uses = tuple(bool(f) for f in flags)
    return None if all(uses) else uses


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    uses_rope = _rope_layers(hf, where)
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    # SmolLM3Config's default pattern: NoPE layers slide when windows are on
    rotates = uses_rope or (True,) * int(hf["num_hidden_layers"])
    default = ["sliding_attention" if window and not rope else "full_attention" for rope in rotates]
    types = layer_types_from_hf(hf, where, default)
    if "sliding_attention" in types and not window:
        raise HFFormatError(f"{where}: layer_types has sliding_attention layers but use_sliding_window is false or "
                            "sliding_window is unset; transformers' SmolLM3 then slides in its mask but not in its "
                            "attention kernels. Set use_sliding_window: true with a sliding_window, or make every "
                            "layer full_attention")
    attention_bias = bool(hf["attention_bias"])  # q, k, v and o alike
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(hf["mlp_bias"]), rope_layers=uses_rope,
                **windows_from_hf(types, window), **flat_rope(hf, where, default_theta=2_000_000.0))


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("smollm3 exports a single attention_bias; qkv_bias and o_bias must agree")
    uses = cfg.rope_layers or (True,) * cfg.num_layers
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                no_rope_layers=[int(u) for u in uses], use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_kinds()), **flat_rope_to_hf(cfg))


FAMILY = Family(
    name="smollm3", model_type="smollm3", architecture="SmolLM3ForCausalLM",
    declared={}, expresses=("qkv_bias", "o_bias", "mlp_bias", "rope_layers", "sliding_window", "layer_types"),
    defaults=dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
                  attention_bias=False, mlp_bias=False, use_sliding_window=False, sliding_window=None,
                  num_key_value_heads=4, pad_token_id=128004, bos_token_id=128000, eos_token_id=128001),
    read=read, write=write, norms=LLAMA_NORMS, sliding="per layer (`use_sliding_window`, `layer_types`); "
    "NoPE layers (`no_rope_layers`)",
)

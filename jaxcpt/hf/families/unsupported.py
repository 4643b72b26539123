"""Model types transformers ships that jaxcpt does not import yet, and what in their config.json stands in the way.

An import of such a checkpoint stops with the features its own config.json sets, by name, rather than
dropping any of them; ``family_of_hf`` asks ``refusal`` before it looks a family up.
"""

from __future__ import annotations

# Gemma 4's text decoder (transformers 5.25 ``models/gemma4``), the features each config.json key turns on.
# The first two are why it is not a small step: they make layers differ in shape, and the shared decoder
# scans one stack of identically shaped layers (two stacks scanned in the layer pattern's order would hold them).
GEMMA4_TEXT = (
    ("global_head_dim", "full-attention layers with their own head_dim (global_head_dim, 512 by default) and "
                        "KV heads (num_global_key_value_heads): layers of two shapes"),
    ("use_double_wide_mlp", "a twice-as-wide MLP in the KV-sharing layers: layers of two shapes"),
    ("hidden_size_per_layer_input", "per-layer input embeddings (embed_tokens_per_layer, per_layer_model_projection, "
                                    "per_layer_input_gate / per_layer_projection in every layer)"),
    ("attention_k_eq_v", "attention_k_eq_v (global layers use their keys as values)"),
    ("num_kv_shared_layers", "KV sharing across the last num_kv_shared_layers layers"),
    ("enable_moe_block", "the MoE block beside the MLP (enable_moe_block; needs jaxcpt's MoE layer)"),
)
ALWAYS = ("the 'proportional' RoPE on part of each head (partial_rotary_factor) of the full-attention layers, "
          "attention scaled by 1 instead of query_pre_attn_scalar**-0.5, the unscaled v_norm and a per-layer "
          "layer_scalar")


def _set(hf: dict, key: str) -> bool:
    if key == "global_head_dim":  # on unless the full layers' shape equals the sliding layers'
        return hf.get("global_head_dim", 512) != hf.get("head_dim", 256) or bool(hf.get("num_global_key_value_heads"))
    return bool(hf.get(key, 256 if key == "hidden_size_per_layer_input" else None))


def refusal(hf: dict, where: str) -> str | None:
    """Why a config.json of a model type transformers has but jaxcpt does not import cannot load; None if not such."""
    model_type = hf.get("model_type")
    if model_type == "gemma4":  # Gemma4ForConditionalGeneration: the text decoder plus vision/audio towers
        towers = [name for name in ("vision_config", "audio_config") if hf.get(name)]
        text = hf.get("text_config") or {}
        return (f"{where}: model_type 'gemma4' (Gemma4ForConditionalGeneration, with {', '.join(towers) or 'no'} "
                "towers) is not supported. A text-only import would keep the language model "
                "(model.language_model.*, its text_config) and drop the vision and audio towers and their embedders; "
                "it waits on the text model: " + refusal(dict(text, model_type="gemma4_text"), "text_config"))
    if model_type == "gemma4_text":
        features = [what for key, what in GEMMA4_TEXT if _set(hf, key)]
        return (f"{where}: model_type 'gemma4_text' (Gemma4ForCausalLM) is not supported yet; this checkpoint uses "
                f"{'; '.join(features + [ALWAYS])}. Continue a Gemma 3 checkpoint (gemma3_text) instead, or import "
                "with transformers")
    return None

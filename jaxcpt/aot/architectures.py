"""The public architectures the shipped configs start from, as their Hugging Face config.json.

``jaxcpt compile`` needs a model's shapes but not its weights; a run reads them from
``init.path``'s config.json, which a CI machine or a laptop does not have. These are the
fields of the config.json files published with each model on the Hugging Face Hub
(meta-llama/Llama-3.1-8B, meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-7B), read through the same
``config_from_hf`` as a real checkpoint. Keys are the model names, which are also the last
component of the configs' ``init.path``.
"""

from __future__ import annotations

from jaxcpt.errors import UserError

_LLAMA3_COMMON = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 128256,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072, "attention_bias": False,
    "mlp_bias": False, "initializer_range": 0.02, "bos_token_id": 128000, "eos_token_id": 128001,
}

ARCHITECTURES: dict[str, dict] = {
    "Llama-3.1-8B": {
        **_LLAMA3_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "Llama-3.2-1B": {
        **_LLAMA3_COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    },
    "Qwen2.5-7B": {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "vocab_size": 152064,
        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": 28, "initializer_range": 0.02,
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    # Qwen/Qwen3.5-9B's text_config (the hub checkpoint is Qwen3_5ForConditionalGeneration; its language model
    # alone is Qwen3_5ForCausalLM). transformers' Qwen3_5TextConfig defaults are these shapes ("Qwen3.5-9B style").
    "Qwen3.5-9B": {
        "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"], "hidden_act": "silu",
        "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "attention_bias": False, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128, "eos_token_id": 248044,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_interleaved": True, "mrope_section": [11, 11, 10]},
    },
}


def architecture(name: str):
    """``ModelConfig`` of a named public architecture (case-insensitive)."""
    from jaxcpt.hf.families import config_from_hf

    by_lower = {key.lower(): key for key in ARCHITECTURES}
    key = by_lower.get(name.lower())
    if key is None:
        raise UserError(f"unknown architecture '{name}'; known: {', '.join(ARCHITECTURES)}. For another model, "
                        "pass its config.json with --model-config")
    return config_from_hf(ARCHITECTURES[key], where=f"architecture {key}")


def find_architecture(path: str | None) -> str | None:
    """The known architecture a model directory is named after (``/mnt/models/Llama-3.1-8B``), if any."""
    if not path:
        return None
    last = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((key for key in ARCHITECTURES if key.lower() == last), None)

"""Tiny random Hugging Face models of each supported family, saved to disk for tests."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=512, rms_norm_eps=1e-5)

FAMILY_CONFIGS = {
    "llama_gqa": lambda: LlamaConfig(**TINY, num_key_value_heads=2),
    "llama3_rope": lambda: LlamaConfig(**TINY, num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama_bias": lambda: LlamaConfig(**TINY, num_key_value_heads=4, attention_bias=True, mlp_bias=True),
    "mistral_window": lambda: MistralConfig(**TINY, num_key_value_heads=2, sliding_window=7),
    "qwen2_tied": lambda: Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=True),
}


def make_hf_model(name: str, directory, dtype=torch.float32, seed: int = 0):
    """Random-weight model ``name`` saved to ``directory``; returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norm scales start at 0/1; randomise so the test sees them
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.save_pretrained(directory)
    return model


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.float().numpy()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error the tests bound."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())

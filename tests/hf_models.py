"""Tiny random Hugging Face models of each supported family, saved to disk for tests."""

from __future__ import annotations

import functools

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Olmo3Config,
                          Qwen2Config, Qwen3Config, SmolLM3Config)

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

# The newer families and options. A vocabulary of 300 is stored padded to 384 rows, so these
# cases cover the padding too. Soft-caps are small enough to bite on random weights, the
# rope scalings' original lengths shorter than the test documents, and windows shorter still.
SMALL = dict(TINY, vocab_size=300)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
LONG = dict(max_position_embeddings=64)  # = factor x original length, as transformers expects for yarn
OPTION_CONFIGS = {
    "qwen3_untied": lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32),  # head_dim != 64 / 4
    "qwen3_tied": lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True),
    "qwen3_sliding_layers": lambda: Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                                                sliding_window=6, max_window_layers=1),
    # larger weights, so attention scores and logits reach the caps
    "gemma2_softcap_window": lambda: Gemma2Config(**dict(SMALL, num_hidden_layers=3), num_key_value_heads=2, head_dim=16,
                                                  initializer_range=0.2,
                                                  query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=1.5,
                                                  final_logit_softcapping=3.0),
    "gemma3_pattern_two_bases": lambda: Gemma3TextConfig(
        **dict(SMALL, num_hidden_layers=3), num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=6, sliding_window_pattern=3, final_logit_softcapping=None, rope_parameters={
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}),
    "gemma3_yarn_global": lambda: Gemma3TextConfig(
        **dict(SMALL, **LONG, num_hidden_layers=3), num_key_value_heads=1, head_dim=16, layer_types=[
            "full_attention", "sliding_attention", "full_attention"], sliding_window=5, rope_parameters={
            "full_attention": dict(YARN, rope_theta=1000000.0), "sliding_attention": {"rope_type": "default",
                                                                                      "rope_theta": 10000.0}}),
    "llama_yarn": lambda: LlamaConfig(**dict(SMALL, **LONG), num_key_value_heads=2, rope_parameters=YARN),
    "qwen2_yarn": lambda: Qwen2Config(**dict(SMALL, max_position_embeddings=32), num_key_value_heads=2,
                                      rope_parameters=dict(YARN, factor=2.0, beta_fast=16.0, attention_factor=1.2)),
    "llama_dynamic": lambda: LlamaConfig(**dict(SMALL, max_position_embeddings=16), num_key_value_heads=2,
                                         rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "llama_longrope": lambda: LlamaConfig(**dict(SMALL, **LONG), num_key_value_heads=2, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [1.0 + 0.7 * i for i in range(8)]}),
    # post-norms, q/k norms over the whole projection, 3 sliding : 1 full, the full layers' RoPE scaled (YaRN, as
    # the released checkpoints) and the sliding layers' not
    "olmo3_post_norm_pattern": lambda: Olmo3Config(
        **dict(SMALL, **LONG, num_hidden_layers=4), num_key_value_heads=2, sliding_window=6, attention_bias=True,
        rope_parameters={"full_attention": dict(YARN, rope_theta=500000.0),
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # layers 2 and 4 without RoPE, the NoPE layers sliding
    "smollm3_nope": lambda: SmolLM3Config(**dict(SMALL, num_hidden_layers=4), num_key_value_heads=2,
                                          no_rope_layer_interval=2, use_sliding_window=True, sliding_window=6,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def make_hf_model(name: str, directory, dtype=torch.float32, seed: int = 0):
    """Random-weight model ``name`` saved to ``directory``; returns the torch model (eval mode)."""
    torch.manual_seed(seed)
    config = {**FAMILY_CONFIGS, **OPTION_CONFIGS}[name]()
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # biases and norm scales start at 0/1; randomise so the test sees them
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.save_pretrained(directory)
    return model


# For each case, ModelConfig overrides that each switch one of its options off: the parity tests
# check that the logits then disagree with transformers, so they would catch an option going missing.
OPTION_OFF = {
    "qwen3_untied": [dict(qk_norm=False)],
    "qwen3_tied": [dict(qk_norm=False)],
    "qwen3_sliding_layers": [dict(layer_types=None, sliding_window=None)],
    "gemma2_softcap_window": [dict(attn_logit_softcap=None), dict(final_logit_softcap=None),
                              dict(query_pre_attn_scalar=None), dict(layer_types=None)],
    "gemma3_pattern_two_bases": [dict(rope_local_theta=None), dict(rope_scaling=None), dict(qk_norm=False),
                                 dict(scale_embeddings=False)],
    "gemma3_yarn_global": [dict(rope_scaling=None)],
    "llama_yarn": [dict(rope_scaling=None)],
    "qwen2_yarn": [dict(rope_scaling=None)],
    "llama_dynamic": [dict(rope_scaling=None)],
    "llama_longrope": [dict(rope_scaling=None)],
    # (its post-norm placement and projection-wide q/k norms change the parameters' layout: tests/test_families_2026.py)
    "olmo3_post_norm_pattern": [dict(layer_types=None), dict(rope_local_theta=None)],
    "smollm3_nope": [dict(rope_layers=None), dict(layer_types=None, sliding_window=None)],
}


@functools.cache
def _jitted_forward():
    from flax import nnx

    return nnx.jit(lambda model, ids, segment_ids, positions: model(ids, segment_ids, positions))


def model_logits(model, ids, segment_ids=None, positions=None) -> np.ndarray:
    """A jaxcpt model's float32 logits as one compiled program (op-by-op dispatch is slow for the
    scanned groups and on 8 CPU devices); rows of one document at positions 0.. unless given."""
    import jax.numpy as jnp

    ids = jnp.asarray(ids)
    segment_ids = jnp.ones(ids.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape) if positions is None else jnp.asarray(positions)
    return np.asarray(_jitted_forward()(model, ids, segment_ids, positions))


def hf_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(input_ids)).logits.float().numpy()


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: the relative error the tests bound."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def random_moe_model(config, directory, seed: int = 0):
    """A mixture-of-experts model of ``config`` with every parameter drawn anew, saved to ``directory`` (float32);
    returns the torch model (eval mode). Routers and sinks at a scale that makes them matter (transformers starts
    routers at zero, where every expert ties), biases large enough that dropping them shows, and DeepSeek-V3's
    selection bias (a buffer, zero at the start) drawn too."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "router" in name or name.endswith("mlp.gate.weight") or name.endswith("sinks"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_((0.1 if name.endswith("bias") else 0.05) * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn_like(b))
    model.save_pretrained(directory)
    return model

"""Tiny random Hugging Face mixture-of-experts models (Qwen3-MoE, Mixtral), saved to disk for tests."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, MixtralConfig, Qwen3MoeConfig

TINY_MOE = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-5)
MOE_CONFIGS = {
    # 8 experts, top 2 renormalised; head_dim != hidden / heads
    "qwen3_moe": lambda: Qwen3MoeConfig(**TINY_MOE, head_dim=16, intermediate_size=48, moe_intermediate_size=24,
                                        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                                        router_aux_loss_coef=0.02, output_router_logits=True),
    # top 3 of 6 without renormalisation
    "qwen3_moe_unnormalised": lambda: Qwen3MoeConfig(**TINY_MOE, head_dim=8, intermediate_size=48,
                                                     moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3,
                                                     norm_topk_prob=False),
    "mixtral_window": lambda: MixtralConfig(**TINY_MOE, intermediate_size=24, num_local_experts=4,
                                            num_experts_per_tok=2, sliding_window=7, router_aux_loss_coef=0.02,
                                            output_router_logits=True),
}


def make_moe_model(name: str, directory, seed: int = 0):
    """Random-weight MoE model ``name`` saved to ``directory`` (float32); returns the torch model (eval mode).

    Every parameter is drawn anew, routers at a scale that gives each token a clear top-k (transformers
    starts routers at zero, where every expert ties).
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(MOE_CONFIGS[name]()).float().eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.5 if pname.endswith("gate.weight") else 0.05) * torch.randn_like(p))
    model.save_pretrained(directory)
    return model

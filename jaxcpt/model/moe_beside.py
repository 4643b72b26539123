"""Experts beside the dense MLP: Gemma 4's MoE block (``enable_moe_block``, Gemma 4 26B-A4B).

Every MoE family before it (Qwen3-MoE, Mixtral, OLMoE, gpt-oss) replaces the dense MLP with the experts
(``jaxcpt.model.moe``). Gemma 4 keeps the dense MLP and adds the experts beside it, each branch with norms
of its own, as transformers 5.25's ``Gemma4TextDecoderLayer`` computes it (x: the residual stream after
attention):

    dense   = post_dense_norm(mlp(mlp_norm(x)))                              post_feedforward_layernorm_1
    experts = post_expert_norm(moe(pre_expert_norm(x)))                      pre/post_feedforward_layernorm_2
    x       = x + post_mlp_norm(dense + experts)                             post_feedforward_layernorm

and its router reads the residual stream x itself (not either branch's normed input): RMS-normed without
a weight, times a learned scale [E] and E**-0.5 (``router_norm``), then the usual softmax, top-k and
renormalisation, each chosen weight then times a learned per-expert scale (``per_expert_scale``). The
experts are the shared grouped experts (``moe.moe_mlp``: ragged_dot, expert parallelism), so nothing about
them is Gemma's; their gate and up sit fused in the checkpoint (``gate_up_proj`` [X, 2F, E]) and apart
here, as for every MoE family.

Parameters of the block, beside the dense MLP's (each [L, ...]; ``moe.expert_param_shapes`` for the
router and experts):

    layers.router            [L, E, X]      router.proj
    layers.router_scale      [L, E]         router.scale                        (router_norm)
    layers.per_expert_scale  [L, X]         router.per_expert_scale             (per_expert_scale)
    layers.expert_gate/_up   [L, X, E, F]   experts.gate_up_proj (halves)
    layers.expert_down       [L, X, F, E]   experts.down_proj
    layers.pre_expert_norm, post_dense_norm, post_expert_norm  [L, E]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcpt.model import moe as moe_lib
from jaxcpt.model.layers import gated_mlp, rms_norm

NORMS = ("pre_expert_norm", "post_dense_norm", "post_expert_norm")
# What each router / expert parameter starts at in a model made from scratch (the rest: normal)
ONES = ("router_scale", "per_expert_scale")


def stack_rows(cfg) -> list[tuple[str, tuple, tuple, str]]:
    """(name, shape after [L], logical axes after 'layers', init) of the block's weights (``layer_groups``)."""
    norm_init = "zeros" if cfg.norm_plus_one else "ones"
    rows = [(name, shape[1:], axes[1:], "ones" if name in ONES else "zeros" if name.endswith("_bias") else "normal")
            for name, (shape, axes) in moe_lib.expert_param_shapes(cfg.moe, cfg.hidden_size, 1).items()]
    return rows + [(name, (cfg.hidden_size,), ("norm",), norm_init) for name in NORMS]


def router_input(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Gemma 4's router input from the residual stream x [B, T, E]: RMS-normed without a weight, times ``scale`` [E]
    and E**-0.5, in float32 (the router's logits are float32 whatever the compute dtype)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # [B, T, E]
    return normed * scale.astype(jnp.float32) * x.shape[-1] ** -0.5


def mlp_and_experts(x: jax.Array, h: jax.Array, p: dict, project, cfg, valid, rules, selection_bias=None):
    """The dense MLP and the experts beside it, each normed, summed: -> (out [B, T, E], ``moe.RouterStats``).

    x [B, T, E]: the residual stream (what the router and the experts' own pre-norm read); h [B, T, E]: the
    dense MLP's normed input (``mlp_norm``); ``project``: the block's projection (LoRA included), for the dense
    MLP. The caller applies ``post_mlp_norm`` to the sum, as to a dense MLP's output.
    """
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    dense = norm(gated_mlp(h, project, activation=cfg.activation), p["post_dense_norm"])  # [B, T, E]
    routed = router_input(x, p["router_scale"], cfg.rms_norm_eps) if cfg.moe.router_norm else x  # [B, T, E]
    experts, stats = moe_lib.moe_mlp(norm(x, p["pre_expert_norm"]), p, cfg.moe, cfg.activation, valid, rules,
                                     selection_bias, router_input=routed)  # [B, T, E]
    return dense + norm(experts, p["post_expert_norm"]), stats

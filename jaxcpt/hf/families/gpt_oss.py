"""gpt-oss (``GptOssForCausalLM``, openai/gpt-oss-20b and 120b): a mixture of experts with attention sinks.

What its block does differently from Llama, each a shared-decoder option this module declares:

- attention sinks: a learned logit per query head in every softmax's denominator
  (``attention_sinks``; ``self_attn.sinks`` [H]);
- sliding (128 tokens) and full layers alternating, sliding first (``layer_types``);
- q, k, v and o projections with biases (``attention_bias``);
- YaRN RoPE (factor 32 over 4096 positions, ``truncate`` false) on every layer;
- experts on every layer: a router with a bias whose top-k logits are softmaxed (= the renormalised
  top-k softmax, ``norm_topk_prob``), experts with biases, and the clamped SwiGLU
  ``(clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g)``, g = min(gate, 7) (``model.moe.swiglu_limit``).

The checkpoints fuse all experts of a layer: ``mlp.experts.gate_up_proj`` [X, E, 2F] holds gate and up
*interleaved* on its last axis (gate at even, up at odd columns), ``gate_up_proj_bias`` [X, 2F] likewise,
``down_proj`` [X, F, E] and ``down_proj_bias`` [X, E] (input-major, unlike torch Linear), and the router is
``mlp.router.weight`` [X, E] / ``mlp.router.bias`` [X]. jaxcpt keeps gate and up as separate parameters
(the layout every MoE family shares); import splits the interleaved tensors, export interleaves them back.

The released checkpoints store the expert weights in MXFP4 (``quantization_config.quant_method: mxfp4``,
``gate_up_proj_blocks`` / ``_scales`` ...): import dequantizes them exactly as it reads them
(``jaxcpt.hf.mxfp4``), and export writes the full-precision layout above, without a quantization_config.
Other quantization methods are refused with the conversion that dequantizes them in transformers.
"""

from __future__ import annotations

import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, layer_types_from_hf, windows_from_hf
from jaxcpt.hf.families.qwen3_moe import num_experts
from jaxcpt.hf.mapping import LLAMA_NORMS, Tensor
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.moe import MoeConfig

# GptOssConfig.__post_init__'s RoPE when config.json gives none (with its default_theta)
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}
DEQUANTIZE = ("load it with transformers and save it in full precision first: AutoModelForCausalLM.from_pretrained("
              "DIR, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16)"
              ".save_pretrained(OUT), then import OUT")


def read(hf: dict, where: str) -> dict:
    quantization = hf.get("quantization_config")
    method = (quantization.get("quant_method") if isinstance(quantization, dict) else quantization) or None
    if quantization and method != "mxfp4":  # MXFP4 experts are dequantized as they are read (jaxcpt.hf.mxfp4)
        raise HFFormatError(f"{where}: the weights are quantized (quantization_config: {method}), and jaxcpt reads "
                            f"only MXFP4 (the released gpt-oss) or full precision. To continue this model, "
                            f"{DEQUANTIZE}")
    attention_bias = bool(hf["attention_bias"])
    default = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
    rope = flat_rope(hf if hf.get("rope_parameters") or hf.get("rope_scaling") else
                     dict(hf, rope_parameters=dict(DEFAULT_ROPE, rope_theta=hf.get("rope_theta", 150000.0))),
                     where, 150000.0)
    moe = MoeConfig(num_experts=num_experts(hf), top_k=int(hf["num_experts_per_tok"]),
                    expert_intermediate_size=int(hf["intermediate_size"]), norm_topk_prob=True,
                    router_aux_loss_coef=float(hf["router_aux_loss_coef"]) if hf.get("output_router_logits") else 0.0,
                    router_bias=True, expert_bias=True, swiglu_limit=float(hf["swiglu_limit"]),
                    swiglu_alpha=float(hf["swiglu_alpha"]))
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, moe=moe, **rope,
                **windows_from_hf(layer_types_from_hf(hf, where, default), hf["sliding_window"]))


def write(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    if moe is None:
        raise HFFormatError("a gpt_oss export needs experts: set model.moe (its checkpoints have no dense MLP)")
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("gpt_oss exports a single attention_bias; qkv_bias and o_bias must agree")
    fixed = dict(norm_topk_prob=True, router_bias=True, expert_bias=True)
    wrong = [f"model.moe.{k}={getattr(moe, k)!r}" for k, v in fixed.items() if getattr(moe, k) != v]
    if moe.swiglu_limit is None:
        wrong.append("model.moe.swiglu_limit=None")
    if wrong:
        raise HFFormatError(f"a gpt_oss export always has a router bias, expert biases, the softmax over the top-k "
                            f"logits and the clamped SwiGLU; this model has {', '.join(wrong)}")
    if moe.expert_intermediate_size != cfg.intermediate_size:
        raise HFFormatError(f"gpt_oss's intermediate_size is each expert's width: model.intermediate_size "
                            f"({cfg.intermediate_size}) must equal model.moe.expert_intermediate_size "
                            f"({moe.expert_intermediate_size})")
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_kinds()), num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                swiglu_limit=moe.swiglu_limit, swiglu_alpha=moe.swiglu_alpha,
                output_router_logits=moe.router_aux_loss_coef > 0,
                router_aux_loss_coef=moe.router_aux_loss_coef or 0.001, **flat_rope_to_hf(cfg))


def _same(x):
    return x


def _transpose(x):
    return np.ascontiguousarray(x.T)


def _half(k: int):
    """The gate (k=0: even columns) or up (k=1: odd columns) share of an interleaved [..., 2F] tensor."""
    return lambda w: np.ascontiguousarray(w[..., k::2])


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate, up [..., F] -> [..., 2F] with gate at even and up at odd columns (gpt-oss's gate_up_proj)."""
    return np.ascontiguousarray(np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1]))


def _joined_only(_):
    raise HFFormatError("gpt-oss's gate_up_proj holds two jaxcpt parameters (expert_gate and expert_up); only "
                        "jaxcpt's HF export (save_hf) writes it, from both")


def expert_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The router and the fused expert tensors of each layer: HF [X, ...] per layer <-> jaxcpt [L, X, ...]."""
    E, X, F = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.expert_intermediate_size
    pre = "model.layers.{i}.mlp."
    rows = [Tensor(("layers", "router"), pre + "router.weight", _transpose, _transpose, (X, E)),
            Tensor(("layers", "router_bias"), pre + "router.bias", _same, _same, (X,))]
    for hf_name, leaves, shape in (("experts.gate_up_proj", ("expert_gate", "expert_up"), (X, E, 2 * F)),
                                   ("experts.gate_up_proj_bias", ("expert_gate_bias", "expert_up_bias"), (X, 2 * F))):
        parts = tuple(("layers", leaf) for leaf in leaves)
        rows += [Tensor(path, pre + hf_name, _half(k), _joined_only, shape, parts=parts, join=_interleave)
                 for k, path in enumerate(parts)]
    rows += [Tensor(("layers", "expert_down"), pre + "experts.down_proj", _same, _same, (X, F, E)),
             Tensor(("layers", "expert_down_bias"), pre + "experts.down_proj_bias", _same, _same, (X, E))]
    return rows


FAMILY = Family(
    name="gpt_oss", model_type="gpt_oss", architecture="GptOssForCausalLM",
    declared=dict(attention_sinks=True), expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types"),
    # transformers' GptOssConfig defaults for keys a config.json may omit
    defaults=dict(max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  head_dim=64, num_key_value_heads=8, sliding_window=128, attention_bias=True,
                  # num_local_experts: the key save_pretrained writes (num_experts, its alias, wins when given)
                  num_local_experts=128, num_experts_per_tok=4, swiglu_alpha=1.702, swiglu_limit=7.0,
                  router_aux_loss_coef=0.001, output_router_logits=False, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None),
    read=read, write=write, norms=LLAMA_NORMS, sliding="alternating sliding / full (`layer_types`)",
    experts=expert_tensors,
)

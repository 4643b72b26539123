"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; also Kimi K2, Moonlight, DeepSeek-V3.1, which share its architecture).

What its block does differently from the shared decoder, each an option this module sets:

- multi-head latent attention (``model.mla``, jaxcpt/model/mla.py): q through a low-rank bottleneck
  (``q_lora_rank``; null: one q_proj), keys and values from a normed latent (``kv_lora_rank``), RoPE on
  ``qk_rope_head_dim`` dims per head with one rotated key for all heads, interleaved pairs
  (``rope_interleave``), scale (nope + rope)**-0.5 times YaRN's mscale**2 with ``mscale_all_dim``;
- the first ``first_k_dense_replace`` layers have a dense MLP of ``intermediate_size``, the others
  experts of ``moe_intermediate_size`` (``model.moe.first_dense_layers``);
- the router: sigmoid scores (``scoring``), ``e_score_correction_bias`` added for the choice only (the
  model's own ``layers.selection_bias``, which ``router_bias_update_rate`` moves: auxiliary-loss-free
  balancing), the top ``topk_group`` of ``n_group`` groups by the sum of each group's two best biased
  scores, renormalised (``norm_topk_prob``) and scaled by ``routed_scaling_factor``;
- ``n_shared_experts`` x ``moe_intermediate_size`` shared experts, a dense MLP every token passes through.

Tensor names are those transformers 5 ``save_pretrained`` writes (one Linear per expert,
``mlp.experts.{j}.gate_proj.weight``, as the released checkpoints hold them).

Refused: ``attention_bias`` (no released checkpoint has it), FP8 or other quantized weights (dequantize
first), softmax scoring (DeepSeek-V2's ``scoring_func``, another family in transformers). The
multi-token-prediction layers (``num_nextn_predict_layers``, stored as ``model.layers.{L}...``) are not
read, as transformers does not read them: a note says so, and an export writes ``num_nextn_predict_layers: 0``.
"""

from __future__ import annotations

import logging

import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, flat_rope, flat_rope_to_hf, require_activation
from jaxcpt.hf.mapping import ExpertNames, Tensor, decoder_tensors
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.mla import MlaConfig, dense_layers
from jaxcpt.model.moe import MoeConfig

log = logging.getLogger("jaxcpt.hf")
EXPERTS = ExpertNames(router="mlp.gate.weight", gate="mlp.experts.{j}.gate_proj.weight",
                      up="mlp.experts.{j}.up_proj.weight", down="mlp.experts.{j}.down_proj.weight")
DEQUANTIZE = ("load it with transformers and save it in bfloat16 first: AutoModelForCausalLM.from_pretrained(DIR, "
              "quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=torch.bfloat16)"
              ".save_pretrained(OUT), then import OUT")


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else "?"
        raise HFFormatError(f"{where}: the weights are quantized (quantization_config: {method}); jaxcpt reads "
                            f"full-precision DeepSeek-V3 weights only. To continue this model, {DEQUANTIZE}")
    if hf.get("attention_bias"):
        raise HFFormatError(f"{where}: attention_bias=true is not supported for deepseek_v3 (no released "
                            "checkpoint has it)")
    if hf.get("scoring_func", "sigmoid") != "sigmoid":
        raise HFFormatError(f"{where}: scoring_func={hf['scoring_func']!r}: transformers' deepseek_v3 always "
                            "scores experts with a sigmoid (softmax routers are DeepSeek-V2's, another family)")
    heads, layers = int(hf["num_attention_heads"]), int(hf["num_hidden_layers"])
    # MLA expands its latent into every head: transformers repeats the keys heads // num_key_value_heads times,
    # which must be 1 (its own default, 128 with fewer heads, gives 0 and the same model; 2 or more fails there)
    if heads // int(hf.get("num_key_value_heads") or heads) > 1:
        raise HFFormatError(f"{where}: num_key_value_heads ({hf['num_key_value_heads']}) divides "
                            f"num_attention_heads ({heads}) into groups, which MLA does not have (transformers "
                            f"fails on it too); set num_key_value_heads = num_attention_heads")
    mtp = int(hf.get("num_nextn_predict_layers") or 0)
    if mtp:
        log.warning("%s: num_nextn_predict_layers=%d: the multi-token-prediction layers (model.layers.%d and on) are "
                    "not read, as transformers does not read them; the export writes num_nextn_predict_layers 0",
                    where, mtp, layers)
    mla = MlaConfig(q_lora_rank=None if hf["q_lora_rank"] is None else int(hf["q_lora_rank"]),
                    kv_lora_rank=int(hf["kv_lora_rank"]), qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
                    qk_rope_head_dim=int(hf["qk_rope_head_dim"]), v_head_dim=int(hf["v_head_dim"]),
                    rope_interleave=bool(hf["rope_interleave"]))
    dense = int(hf["first_k_dense_replace"] or 0)
    moe = None
    if dense < layers:  # first_k_dense_replace >= num_hidden_layers: a dense MLA model
        moe = MoeConfig(num_experts=int(hf["n_routed_experts"]), top_k=int(hf["num_experts_per_tok"]),
                        expert_intermediate_size=int(hf["moe_intermediate_size"]),
                        norm_topk_prob=bool(hf["norm_topk_prob"]), scoring="sigmoid",
                        num_groups=int(hf["n_group"] or 1), top_groups=int(hf["topk_group"] or 1),
                        routed_scaling_factor=float(hf["routed_scaling_factor"]),
                        shared_experts=int(hf["n_shared_experts"] or 0), first_dense_layers=dense,
                        score_correction_bias=True)
    return dict(mla=mla, moe=moe, head_dim=mla.qk_rope_head_dim, num_kv_heads=heads, **flat_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    mla, moe = cfg.mla, cfg.moe
    if mla is None:
        raise HFFormatError("a deepseek_v3 export needs multi-head latent attention: set model.mla")
    out = dict(hidden_act="silu", attention_bias=False, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
               qk_nope_head_dim=mla.qk_nope_head_dim, qk_rope_head_dim=mla.qk_rope_head_dim,
               v_head_dim=mla.v_head_dim, rope_interleave=mla.rope_interleave, num_nextn_predict_layers=0,
               first_k_dense_replace=dense_layers(cfg), **flat_rope_to_hf(cfg))
    if moe is None:
        return out
    fixed = dict(scoring="sigmoid", score_correction_bias=True, router_bias=False, expert_bias=False,
                 swiglu_limit=None)
    wrong = [f"model.moe.{k}={getattr(moe, k)!r}" for k, v in fixed.items() if getattr(moe, k) != v]
    if wrong:
        raise HFFormatError(f"a deepseek_v3 export routes by sigmoid scores with e_score_correction_bias and has "
                            f"no router or expert biases; this model has {', '.join(wrong)}")
    return dict(out, n_routed_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                moe_intermediate_size=moe.expert_intermediate_size, n_shared_experts=moe.shared_experts,
                routed_scaling_factor=moe.routed_scaling_factor, n_group=moe.num_groups, topk_group=moe.top_groups,
                norm_topk_prob=moe.norm_topk_prob)


def _t(x):
    return np.ascontiguousarray(x.T)


def _same(x):
    return x


def _heads_in(heads: int, width: int):
    """HF [heads * width, in] <-> jax [in, heads, width]."""
    return (lambda w: np.ascontiguousarray(w.T.reshape(w.shape[1], heads, width)),
            lambda w: np.ascontiguousarray(w.reshape(w.shape[0], heads * width).T))


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """Every parameter of a DeepSeek-V3 model, with its HF name and layout."""
    mla, moe = cfg.mla, cfg.moe
    E, H, L, F = cfg.hidden_size, cfg.num_heads, cfg.num_layers, cfg.intermediate_size
    dn, dr, dv, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    pre, att = "model.layers.{i}.", "model.layers.{i}.self_attn."
    vocab = [row for row in decoder_tensors(cfg, norms=(), experts=EXPERTS if moe else None) if row.path[0] != "layers"]
    rows = vocab[:1] + [Tensor(("layers", "attn_norm"), pre + "input_layernorm.weight", _same, _same, (E,)),
                        Tensor(("layers", "mlp_norm"), pre + "post_attention_layernorm.weight", _same, _same, (E,))]
    if mla.q_lora_rank is None:
        rows.append(Tensor(("layers", "q"), att + "q_proj.weight", *_heads_in(H, dn + dr), (H * (dn + dr), E)))
    else:
        rq = mla.q_lora_rank
        rows += [Tensor(("layers", "q_a"), att + "q_a_proj.weight", _t, _t, (rq, E)),
                 Tensor(("layers", "q_a_norm"), att + "q_a_layernorm.weight", _same, _same, (rq,)),
                 Tensor(("layers", "q_b"), att + "q_b_proj.weight", *_heads_in(H, dn + dr), (H * (dn + dr), rq))]
    rows += [Tensor(("layers", "kv_a"), att + "kv_a_proj_with_mqa.weight", _t, _t, (r + dr, E)),
             Tensor(("layers", "kv_a_norm"), att + "kv_a_layernorm.weight", _same, _same, (r,)),
             Tensor(("layers", "kv_b"), att + "kv_b_proj.weight", *_heads_in(H, dn + dv), (H * (dn + dv), r)),
             # o_proj: HF [E, H*Dv] <-> jax [H, Dv, E]
             Tensor(("layers", "o"), att + "o_proj.weight", lambda w: np.ascontiguousarray(w.T.reshape(H, dv, E)),
                    lambda w: np.ascontiguousarray(w.reshape(H * dv, E).T), (E, H * dv))]
    ld = dense_layers(cfg)
    dense = tuple(range(ld))
    for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))) if ld else ():
        rows.append(Tensor(("layers", name), pre + f"mlp.{name}_proj.weight", _t, _t, shape, layers=dense))
    if moe is not None:
        sparse, X, Fe = tuple(range(ld, L)), moe.num_experts, moe.expert_intermediate_size
        rows += [Tensor(("layers", "router"), pre + EXPERTS.router, _t, _t, (X, E), layers=sparse),
                 Tensor(("layers", "selection_bias"), pre + "mlp.gate.e_score_correction_bias", _same, _same, (X,),
                        layers=sparse)]
        for leaf, hf, shape in (("expert_gate", EXPERTS.gate, (Fe, E)), ("expert_up", EXPERTS.up, (Fe, E)),
                                ("expert_down", EXPERTS.down, (E, Fe))):
            rows.append(Tensor(("layers", leaf), pre + hf, _t, _t, shape, experts=X, layers=sparse))
        fs = moe.shared_experts * Fe
        for name, shape in (("gate", (fs, E)), ("up", (fs, E)), ("down", (E, fs))) if fs else ():
            rows.append(Tensor(("layers", f"shared_{name}"), pre + f"mlp.shared_experts.{name}_proj.weight", _t, _t,
                               shape, layers=sparse))
    return rows + vocab[1:]


FAMILY = Family(
    name="deepseek_v3", model_type="deepseek_v3", architecture="DeepseekV3ForCausalLM",
    declared={}, expresses=("mla",),
    # transformers' DeepseekV3Config defaults for keys a config.json may omit
    defaults=dict(vocab_size=129280, max_position_embeddings=4096, num_key_value_heads=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  hidden_act="silu", attention_bias=False, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                  qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True, n_routed_experts=256,
                  num_experts_per_tok=8, moe_intermediate_size=2048, n_shared_experts=1, routed_scaling_factor=2.5,
                  n_group=8, topk_group=4, norm_topk_prob=True, first_k_dense_replace=3, bos_token_id=0,
                  eos_token_id=1, pad_token_id=None, num_nextn_predict_layers=1),
    read=read, write=write, norms=(), sliding="no", tensors=tensors,
)

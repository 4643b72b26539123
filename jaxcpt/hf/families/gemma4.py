"""Gemma 4 text (``Gemma4ForCausalLM``, model_type ``gemma4_text``): the dense text decoder.

Gemma 2/3's block (four norms per layer, GeGLU, sqrt(E)-scaled embeddings, q/k norms), with plain
``w`` (not ``1 + w``) RMSNorm scales and attention scaled by 1, plus what transformers 5.25's
``models/gemma4`` adds (each a ``ModelConfig`` option; ``jaxcpt/model/layer_groups.py`` scans the
layers whose shapes differ):

* full-attention layers with their own head_dim and KV heads (``global_head_dim``,
  ``num_global_key_value_heads`` when ``attention_k_eq_v``), and with ``attention_k_eq_v`` no v projection;
* an unscaled RMSNorm on the values (``v_norm``) and a per-layer ``layer_scalar``;
* KV sharing: the last ``num_kv_shared_layers`` layers reuse the keys and values of the last earlier layer
  of their kind, and with ``use_double_wide_mlp`` have an MLP twice as wide;
* per-layer input embeddings (``hidden_size_per_layer_input``): ``embed_tokens_per_layer``,
  ``per_layer_model_projection``, ``per_layer_projection_norm``, and a gated branch in every layer;
* the sliding layers' default RoPE and the full layers' 'proportional' RoPE (``partial_rotary_factor``);
* the MoE block beside every layer's MLP (``enable_moe_block``, Gemma 4 26B-A4B): ``model.moe`` with
  ``beside_mlp``, ``router_norm`` and ``per_expert_scale`` (``jaxcpt/model/moe_beside.py``). The checkpoint
  fuses each layer's experts: ``experts.gate_up_proj`` [X, 2F, E] (gate rows, then up rows) and
  ``experts.down_proj`` [X, E, F]; jaxcpt keeps gate and up apart, [X, E, F] each, as every MoE family.

Not supported, refused by name: bidirectional attention (``use_bidirectional_attention: all``).
"""

from __future__ import annotations

import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, layer_types_from_hf, require_activation, rope_from_params, rope_to_hf, \
    windows_from_hf
from jaxcpt.hf.families.gemma2 import GELU_TANH, _cap
from jaxcpt.hf.mapping import Tensor
from jaxcpt.model import layer_groups, per_layer_input
from jaxcpt.model.config import ModelConfig, RopeScaling
from jaxcpt.model.moe import MoeConfig

FULL, SLIDING = "full_attention", "sliding_attention"
# transformers' Gemma4TextConfig defaults (global_head_dim and num_global_key_value_heads are constructor arguments)
DEFAULTS = dict(head_dim=256, num_key_value_heads=4, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False, sliding_window=512,
                final_logit_softcapping=None, vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256,
                attention_k_eq_v=False, num_kv_shared_layers=0, enable_moe_block=False, use_double_wide_mlp=False,
                global_head_dim=512, num_global_key_value_heads=None, pad_token_id=0, eos_token_id=1, bos_token_id=2)
DEFAULT_ROPE = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
BLOCK = dict(post_norms=True, activation="gelu_tanh", scale_embeddings=True, qk_norm=True, value_norm=True,
             query_pre_attn_scalar=1.0, layer_scalar=True)  # query_pre_attn_scalar 1: scores scaled by 1


def _layer_types(hf: dict, where: str) -> tuple[str, ...]:
    layers = int(hf["num_hidden_layers"])
    types = list(layer_types_from_hf(hf, where, [SLIDING if (i + 1) % 6 else FULL for i in range(layers)]))
    types[-1] = FULL  # transformers forces the last layer to full attention
    return tuple(types)


def _full_rope(params: dict, hf: dict, where: str) -> dict:
    """theta, scaling and proportion of the full-attention layers' RoPE."""
    params = dict(params)
    if params.get("rope_type") == "proportional":  # the lowest pairs turn, the others stand still; factor divides
        factor = float(params.get("factor", 1.0))
        scaling = RopeScaling(type="linear", factor=factor) if factor != 1.0 else None
        return dict(rope_theta=float(params["rope_theta"]), rope_scaling=scaling,
                    rope_proportion=float(params.get("partial_rotary_factor", 1.0)))
    theta, scaling = rope_from_params(params, {k: v for k, v in hf.items() if k != "partial_rotary_factor"}, where,
                                      1_000_000.0, top_level_original=False)
    return dict(rope_theta=theta, rope_scaling=scaling, rope_proportion=1.0)


def _global_shape(hf: dict, types: tuple[str, ...], where: str) -> tuple[int, int | None]:
    """(head_dim, KV heads or None) of the full-attention layers, from ``global_head_dim`` /
    ``num_global_key_value_heads`` or from a ``per_layer_config`` (what transformers 5.25 writes)."""
    overrides = hf.get("per_layer_config")
    if not overrides:
        kv = hf.get("num_global_key_value_heads") if hf["attention_k_eq_v"] else None
        return int(hf["global_head_dim"]), (int(kv) if kv else None)
    by_layer = {int(i): dict(v or {}) for i, v in overrides.items()}
    full = {tuple(sorted(by_layer.get(i, {}).items())) for i, kind in enumerate(types) if kind == FULL}
    sliding = {tuple(sorted(by_layer.get(i, {}).items())) for i, kind in enumerate(types) if kind == SLIDING}
    allowed = {"head_dim", "num_key_value_heads"}
    if len(full) > 1 or sliding - {()} or any(set(dict(f)) - allowed for f in full):
        raise HFFormatError(f"{where}: per_layer_config overrides other than head_dim / num_key_value_heads of every "
                            "full_attention layer alike are not supported")
    one = dict(next(iter(full), ()))
    kv = one.get("num_key_value_heads")
    return int(one.get("head_dim", hf["head_dim"])), (int(kv) if kv else None)


def read(hf: dict, where: str) -> dict:
    if hf.get("use_bidirectional_attention") == "all":
        raise HFFormatError(f"{where}: use_bidirectional_attention='all' (an encoder) is not supported; jaxcpt trains "
                            "causal language models")
    require_activation(hf, "hidden_activation", GELU_TANH, where)
    types = _layer_types(hf, where)
    params = hf.get("rope_parameters") or DEFAULT_ROPE
    sliding = dict(params.get(SLIDING) or DEFAULT_ROPE[SLIDING])
    if sliding.get("rope_type", "default") != "default":
        raise HFFormatError(f"{where}: rope type '{sliding['rope_type']}' on sliding_attention layers is not supported "
                            "(default only); the full_attention layers may use proportional or any scaled type")
    local_theta, _ = rope_from_params(sliding, {}, where, 10_000.0)
    head_dim, kv = int(hf["head_dim"]), int(hf.get("num_key_value_heads") or hf["num_attention_heads"])
    global_head_dim, global_kv = _global_shape(hf, types, where)
    per_layer = int(hf.get("hidden_size_per_layer_input") or 0) or None
    ple_vocab = int(hf["vocab_size_per_layer_input"]) if per_layer else None
    attention_bias = bool(hf["attention_bias"])
    return dict(
        qkv_bias=attention_bias, o_bias=attention_bias, final_logit_softcap=_cap(hf.get("final_logit_softcapping")),
        **windows_from_hf(types, hf["sliding_window"]), **_full_rope(params.get(FULL) or DEFAULT_ROPE[FULL], hf, where),
        rope_local_theta=local_theta,
        global_head_dim=None if global_head_dim == head_dim else global_head_dim,
        global_kv_heads=None if global_kv in (None, kv) else global_kv,
        attention_k_eq_v=bool(hf["attention_k_eq_v"]), kv_shared_layers=int(hf["num_kv_shared_layers"] or 0),
        double_wide_mlp=bool(hf["use_double_wide_mlp"]), per_layer_input=per_layer,
        per_layer_vocab_size=None if ple_vocab in (None, int(hf["vocab_size"])) else ple_vocab, moe=_moe(hf, where))


MOE_KEYS = ("num_experts", "top_k_experts", "moe_intermediate_size")
# What Gemma 4's router and block always are (Gemma4TextRouter, Gemma4TextDecoderLayer); the rest of MoeConfig is
# either the run's balancing (aux loss, z-loss, selection bias: Gemma4ForCausalLM computes no aux loss itself) or
# another family's (gpt-oss's biases and clamped SwiGLU)
GEMMA4_ROUTER = dict(norm_topk_prob=True, beside_mlp=True, router_norm=True, per_expert_scale=True, router_bias=False,
                     expert_bias=False, swiglu_limit=None)


def _moe(hf: dict, where: str) -> MoeConfig | None:
    """The experts beside every layer's MLP (``enable_moe_block``), or None."""
    if not hf.get("enable_moe_block"):
        return None
    missing = [key for key in MOE_KEYS if not hf.get(key)]
    if missing:
        raise HFFormatError(f"{where}: enable_moe_block is true but {', '.join(missing)} is missing or 0; a Gemma 4 "
                            "MoE config.json gives the experts' count, top-k and width")
    return MoeConfig(num_experts=int(hf["num_experts"]), top_k=int(hf["top_k_experts"]),
                     expert_intermediate_size=int(hf["moe_intermediate_size"]), **GEMMA4_ROUTER)


def _moe_to_hf(cfg: ModelConfig) -> dict:
    moe = cfg.moe
    if moe is None:
        return dict(enable_moe_block=False, num_experts=None, top_k_experts=None, moe_intermediate_size=None)
    wrong = [f"model.moe.{k}={getattr(moe, k)!r}" for k, v in GEMMA4_ROUTER.items() if getattr(moe, k) != v]
    if wrong:
        raise HFFormatError(f"a gemma4_text export holds Gemma 4's MoE block only (experts beside the MLP, its router "
                            f"with norm, scale and per-expert scale, renormalised top-k, no biases); this model has "
                            f"{', '.join(wrong)}")
    return dict(enable_moe_block=True, num_experts=moe.num_experts, top_k_experts=moe.top_k,
                moe_intermediate_size=moe.expert_intermediate_size)


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("gemma4_text exports a single attention_bias; qkv_bias and o_bias must agree")
    if cfg.layer_kinds()[-1] != FULL:
        raise HFFormatError("gemma4_text's last layer is always full_attention (transformers forces it); fix layer_types")
    if cfg.global_kv_heads and not cfg.attention_k_eq_v:
        raise HFFormatError("gemma4_text holds global_kv_heads only with attention_k_eq_v (num_global_key_value_heads)")
    s = cfg.rope_scaling
    if cfg.rope_proportion != 1.0 or s is None or s.type == "linear":
        full = {"rope_type": "proportional", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.rope_proportion}
        if s is not None:
            full["factor"] = s.factor
    else:
        full = rope_to_hf(cfg.rope_theta, s)
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    return dict(
        hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias, final_logit_softcapping=cfg.final_logit_softcap,
        sliding_window=cfg.sliding_window or DEFAULTS["sliding_window"], layer_types=list(cfg.layer_kinds()),
        rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": local_theta}},
        global_head_dim=cfg.kind_head_dim(FULL), num_global_key_value_heads=cfg.global_kv_heads,
        attention_k_eq_v=cfg.attention_k_eq_v, num_kv_shared_layers=cfg.kv_shared_layers,
        use_double_wide_mlp=cfg.double_wide_mlp, hidden_size_per_layer_input=cfg.per_layer_input or 0,
        vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size, use_bidirectional_attention=None,
        **_moe_to_hf(cfg))


# --- tensors ------------------------------------------------------------------------------------

HF_NAMES = {  # jaxcpt weight (base name) -> name inside model.layers.{i}.
    "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
    "o": "self_attn.o_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias", "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
    "down": "mlp.down_proj.weight", "attn_norm": "input_layernorm.weight",
    "post_attn_norm": "post_attention_layernorm.weight", "mlp_norm": "pre_feedforward_layernorm.weight",
    "post_mlp_norm": "post_feedforward_layernorm.weight", "ple_gate": "per_layer_input_gate.weight",
    "ple_proj": "per_layer_projection.weight", "ple_norm": "post_per_layer_input_norm.weight",
    "layer_scalar": "layer_scalar",
    # the MoE block (jaxcpt.model.moe_beside); the experts' own tensors are _expert_rows'
    "router": "router.proj.weight", "router_scale": "router.scale", "per_expert_scale": "router.per_expert_scale",
    "pre_expert_norm": "pre_feedforward_layernorm_2.weight", "post_dense_norm": "post_feedforward_layernorm_1.weight",
    "post_expert_norm": "post_feedforward_layernorm_2.weight",
}
EXPERTS = ("expert_gate", "expert_up", "expert_down")


def _same(x):
    return x


def _t(x):
    return np.ascontiguousarray(x.T)


def _layer_row(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> Tensor:
    """One stacked weight <-> its per-layer HF tensor; ``shape`` is jaxcpt's, after [L]."""
    base = layer_groups.base_name(name)
    hf_name = "model.layers.{i}." + HF_NAMES[base]
    layers = layer_groups.layers_of(cfg, name)
    if base in ("q", "k", "v"):  # HF [N*D, E] <-> [E, N, D]
        e, n, d = shape
        return Tensor(("layers", name), hf_name, lambda w: np.ascontiguousarray(w.T.reshape(e, n, d)),
                      lambda w: np.ascontiguousarray(w.reshape(e, n * d).T), (n * d, e), layers=layers)
    if base == "o":  # HF [E, H*D] <-> [H, D, E]
        h, d, e = shape
        return Tensor(("layers", name), hf_name, lambda w: np.ascontiguousarray(w.T.reshape(h, d, e)),
                      lambda w: np.ascontiguousarray(w.reshape(h * d, e).T), (e, h * d), layers=layers)
    if base.endswith("_bias") and len(shape) == 2:  # HF [N*D] <-> [N, D]
        n, d = shape
        return Tensor(("layers", name), hf_name, lambda b: b.reshape(n, d), lambda b: b.reshape(n * d), (n * d,),
                      layers=layers)
    if len(shape) == 2:  # torch Linear [out, in] <-> [in, out]
        return Tensor(("layers", name), hf_name, _t, _t, shape[::-1], layers=layers)
    if not shape:  # layer_scalar: HF [1] <-> a scalar per layer
        return Tensor(("layers", name), hf_name, lambda w: w.reshape(()), lambda w: np.reshape(w, (1,)), (1,),
                      layers=layers)
    return Tensor(("layers", name), hf_name, _same, _same, shape, layers=layers)


def _experts_t(w):
    """[X, a, b] <-> [X, b, a]: each expert's torch Linear layout <-> jaxcpt's [in, out]."""
    return np.ascontiguousarray(np.swapaxes(w, 1, 2))


def _gate_up_half(k: int, f: int):
    """HF gate_up_proj [X, 2F, E] -> the gate (k=0: rows :F) or up (k=1: rows F:) share as jaxcpt's [X, E, F]."""
    return lambda w: _experts_t(w[:, k * f:(k + 1) * f])


def _join_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """jaxcpt's gate, up [X, E, F] -> HF gate_up_proj [X, 2F, E] (gate rows first, as transformers' chunk(2) reads)."""
    return np.ascontiguousarray(np.concatenate([_experts_t(gate), _experts_t(up)], axis=1))


def _joined_only(_):
    raise HFFormatError("Gemma 4's experts.gate_up_proj holds two jaxcpt parameters (expert_gate and expert_up); "
                        "only jaxcpt's HF export (save_hf) writes it, from both")


def _expert_rows(cfg: ModelConfig) -> list[Tensor]:
    """The experts of the MoE block: HF one fused tensor per layer <-> jaxcpt [L, X, ...]."""
    e, x, f = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.expert_intermediate_size
    pre = "model.layers.{i}.experts."
    parts = (("layers", "expert_gate"), ("layers", "expert_up"))
    rows = [Tensor(path, pre + "gate_up_proj", _gate_up_half(k, f), _joined_only, (x, 2 * f, e), parts=parts,
                   join=_join_gate_up) for k, path in enumerate(parts)]
    return rows + [Tensor(("layers", "expert_down"), pre + "down_proj", _experts_t, _experts_t, (x, e, f))]


def _vocab_rows(path, hf_name, real: int, padded: int, width: int) -> Tensor:
    """A [rows, width] vocabulary table stored with its rows padded (HF [real, width])."""
    return Tensor(path, hf_name, lambda w: np.pad(w, ((0, padded - real), (0, 0))), lambda w: np.ascontiguousarray(w[:real]),
                  (real, width), vocab_axis=0, rows_to_jax=_same, rows_to_hf=_same)


def tensors(cfg: ModelConfig) -> list[Tensor]:
    """Every parameter of a Gemma 4 text model with its HF name and layout."""
    e, v = cfg.hidden_size, cfg.vocab_size
    rows = [_vocab_rows(("embedding",), "model.embed_tokens.weight", v, cfg.padded_vocab_size, e)]
    if cfg.per_layer_input:
        width = cfg.num_layers * cfg.per_layer_input
        rows += [_vocab_rows(("per_layer_embedding",), "model.embed_tokens_per_layer.weight",
                             cfg.per_layer_vocab_size or v, per_layer_input.padded_vocab(cfg), width),
                 Tensor(("per_layer_projection",), "model.per_layer_model_projection.weight", _t, _t, (width, e)),
                 Tensor(("per_layer_norm",), "model.per_layer_projection_norm.weight", _same, _same,
                        (cfg.per_layer_input,))]
    rows += [_layer_row(cfg, name, shape) for name, shape, _, _ in layer_groups.stack_names(cfg) if name not in EXPERTS]
    if cfg.moe is not None:
        rows += _expert_rows(cfg)
    rows.append(Tensor(("final_norm",), "model.norm.weight", _same, _same, (e,)))
    if not cfg.tie_word_embeddings:  # HF [V, E] <-> [E, Vp]
        rows.append(Tensor(("lm_head",), "lm_head.weight", lambda w: _t(np.pad(w, ((0, cfg.padded_vocab_size - v), (0, 0)))),
                           lambda w: _t(w[:, :v]), (v, e), vocab_axis=1, rows_to_jax=_t, rows_to_hf=_t))
    return rows


FAMILY = Family(
    name="gemma4_text", model_type="gemma4_text", architecture="Gemma4ForCausalLM",
    declared=BLOCK,
    expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types", "final_logit_softcap", "rope_local_theta",
               "global_head_dim", "global_kv_heads", "attention_k_eq_v", "rope_proportion", "kv_shared_layers",
               "double_wide_mlp", "per_layer_input", "per_layer_vocab_size"),
    defaults=DEFAULTS, read=read, write=write, norms=(), sliding="local:global pattern (`layer_types`); full layers "
    "with their own head_dim, KV heads and proportional RoPE", tensors=tensors,
)

"""Qwen3.5 text (``Qwen3_5ForCausalLM``, ``qwen3_5_text``): a hybrid of Gated DeltaNet and attention layers.

``layer_types`` lists ``linear_attention`` (Gated DeltaNet, ``jaxcpt.model.gated_deltanet``) and
``full_attention`` layers; the released models repeat 3 linear + 1 full (``full_attention_interval``
4, the default when ``layer_types`` is absent). The attention layers gate their output per head with
a sigmoid of a second half of q_proj, RMSNorm q and k, and rotate only the first
``partial_rotary_factor`` (0.25) of each head with RoPE. Every RMSNorm but the linear layers' gated one
scales by (1 + w).

Qwen3.5's RoPE is M-RoPE (``mrope_section``); for text every position stream holds the same token
index, which makes it plain RoPE, so the text model reads it as such.
"""

from __future__ import annotations

import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, require_activation, rope_from_params, rope_to_hf
from jaxcpt.hf.mapping import LLAMA_NORMS, Tensor
from jaxcpt.model.config import LINEAR, LinearAttentionConfig, ModelConfig

# transformers' Qwen3_5TextConfig defaults
DEFAULTS = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
                num_key_value_heads=4, head_dim=256, attention_bias=False, linear_conv_kernel_dim=4,
                linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
                linear_num_value_heads=32, full_attention_interval=4)
KINDS = ("linear_attention", "full_attention")
MROPE_KEYS = ("mrope_section", "mrope_interleaved")  # M-RoPE's multimodal split: plain RoPE for text


def _layer_types(hf: dict, where: str) -> tuple[str, ...]:
    layers = int(hf["num_hidden_layers"])
    interval = int(hf["full_attention_interval"])
    types = hf.get("layer_types") or [LINEAR if (i + 1) % interval else "full_attention" for i in range(layers)]
    unknown = sorted(set(types) - set(KINDS))
    if unknown:
        raise HFFormatError(f"{where}: layer type(s) {unknown} are not supported in qwen3_5_text ({', '.join(KINDS)})")
    if len(types) != layers:
        raise HFFormatError(f"{where}: layer_types lists {len(types)} layers, num_hidden_layers is {layers}")
    return tuple(types)


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    params = dict(hf.get("rope_parameters") or {})
    partial = float(params.pop("partial_rotary_factor", hf.get("partial_rotary_factor") or 0.25))
    for key in MROPE_KEYS:
        params.pop(key, None)
    plain = {k: v for k, v in hf.items() if k != "partial_rotary_factor"}
    theta, scaling = rope_from_params(params, plain, where, default_theta=10000.0)
    attention_bias = bool(hf["attention_bias"])  # q, k, v and o alike
    types = _layer_types(hf, where)
    linear = LinearAttentionConfig(
        num_key_heads=int(hf["linear_num_key_heads"]), num_value_heads=int(hf["linear_num_value_heads"]),
        key_head_dim=int(hf["linear_key_head_dim"]), value_head_dim=int(hf["linear_value_head_dim"]),
        conv_kernel=int(hf["linear_conv_kernel_dim"])) if LINEAR in types else None
    return dict(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial, qkv_bias=attention_bias,
                o_bias=attention_bias, layer_types=types, linear_attention=linear)


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("qwen3_5_text exports a single attention_bias; qkv_bias and o_bias must agree")
    rope = dict(rope_to_hf(cfg.rope_theta, cfg.rope_scaling), partial_rotary_factor=cfg.partial_rotary_factor)
    out = dict(hidden_act="silu", attention_bias=cfg.qkv_bias, layer_types=list(cfg.layer_kinds()),
               rope_parameters=rope)
    lin = cfg.linear_attention or LinearAttentionConfig()
    out.update(linear_num_key_heads=lin.num_key_heads, linear_num_value_heads=lin.num_value_heads,
               linear_key_head_dim=lin.key_head_dim, linear_value_head_dim=lin.value_head_dim,
               linear_conv_kernel_dim=lin.conv_kernel)
    return out


def linear_tensors(cfg: ModelConfig) -> list[Tensor]:
    """The Gated DeltaNet weights (``layers.lin_*`` [L_linear, ...]) <-> ``model.layers.{i}.linear_attn.*``."""
    if not cfg.linear_layers:
        return []
    lin = cfg.linear_attention
    e, c, w = cfg.hidden_size, lin.conv_channels, lin.conv_kernel
    hv, dv = lin.num_value_heads, lin.value_head_dim
    pre = "model.layers.{i}.linear_attn."

    def t(x):
        return np.ascontiguousarray(x.T)

    def same(x):
        return x

    def row(leaf, name, to_jax, to_hf, shape):
        return Tensor(("layers", leaf), pre + name, to_jax, to_hf, shape, layers=cfg.linear_layers)

    return [
        row("lin_qkv", "in_proj_qkv.weight", t, t, (c, e)),  # [C, E] <-> [E, C]
        row("lin_conv", "conv1d.weight", lambda x: t(x[:, 0, :]), lambda x: t(x)[:, None, :], (c, 1, w)),  # <-> [W, C]
        row("lin_z", "in_proj_z.weight", lambda x: np.ascontiguousarray(x.T.reshape(e, hv, dv)),
            lambda x: np.ascontiguousarray(x.reshape(e, hv * dv).T), (hv * dv, e)),
        row("lin_b", "in_proj_b.weight", t, t, (hv, e)),
        row("lin_a", "in_proj_a.weight", t, t, (hv, e)),
        row("lin_dt_bias", "dt_bias", same, same, (hv,)),
        row("lin_a_log", "A_log", same, same, (hv,)),
        row("lin_norm", "norm.weight", same, same, (dv,)),
        row("lin_out", "out_proj.weight", lambda x: np.ascontiguousarray(x.T.reshape(hv, dv, e)),
            lambda x: np.ascontiguousarray(x.reshape(hv * dv, e).T), (e, hv * dv)),
    ]


FAMILY = Family(
    name="qwen3_5_text", model_type="qwen3_5_text", architecture="Qwen3_5ForCausalLM",
    declared=dict(norm_plus_one=True, qk_norm=True, attn_output_gate=True),
    expresses=("qkv_bias", "o_bias", "layer_types", "partial_rotary_factor", "linear_attention"),
    defaults=DEFAULTS, read=read, write=write, norms=LLAMA_NORMS, sliding="no (Gated DeltaNet layers instead)",
    extra_tensors=linear_tensors,
)

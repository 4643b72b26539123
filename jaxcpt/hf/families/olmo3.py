"""OLMo 3 (``Olmo3ForCausalLM``): Allen AI's fully open model, whose pretraining mix can be replayed.

What its block does differently from Llama: norms *after* attention and MLP instead of
before (``post_attention_layernorm`` and ``post_feedforward_layernorm`` norm the branch
outputs; the branch inputs are not normed), RMSNorm on q and k over the whole projection
(all heads' channels at once, an ``[H*D]`` scale), and a sliding/full layer pattern (three
sliding layers, then a full one, by default). RoPE is given per layer type: the full
layers carry the scaling (YaRN in the released 7B/32B), the sliding layers an unscaled base.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import (Family, layer_types_from_hf, require_activation, rope_from_params, rope_to_hf,
                                     windows_from_hf)
from jaxcpt.model.config import ModelConfig

THETA = 500_000.0  # transformers' Olmo3Config.default_theta, for both layer types
NORMS = (("post_attn_norm", "post_attention_layernorm"), ("post_mlp_norm", "post_feedforward_layernorm"))


def _rope(hf: dict, where: str) -> dict:
    """Both RoPEs, as Olmo3Config builds them: a legacy rope_scaling and rope_theta reach the full layers only."""
    params = hf.get("rope_parameters") or {}
    if params and not ({"full_attention", "sliding_attention"} & set(params)):
        raise HFFormatError(f"{where}: OLMo 3 rope_parameters must be given per layer type "
                            "(full_attention, sliding_attention)")
    full = dict(params.get("full_attention") or {})
    full.update(hf.get("rope_scaling") or {})
    full.setdefault("rope_theta", hf.get("rope_theta", THETA))
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", THETA)  # Olmo3Config: a legacy rope_theta is used up by the full layers
    theta, scaling = rope_from_params(full, hf, where, THETA, top_level_original=False)
    local_theta, local_scaling = rope_from_params(local, hf, where, THETA, top_level_original=False)
    if local_scaling is not None:
        raise HFFormatError(f"{where}: RoPE scaling on sliding_attention layers ('{local_scaling.type}') is not "
                            "supported; only the full_attention layers may scale (supported there: all rope types)")
    if (local_theta, local_scaling) == (theta, scaling):  # one RoPE for all layers
        return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=None)
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def read(hf: dict, where: str) -> dict:
    require_activation(hf, "hidden_act", {"silu": "silu", "swish": "silu"}, where)
    default = ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
    attention_bias = bool(hf["attention_bias"])  # q, k, v and o alike
    return dict(qkv_bias=attention_bias, o_bias=attention_bias, **_rope(hf, where),
                **windows_from_hf(layer_types_from_hf(hf, where, default), hf["sliding_window"]))


def write(cfg: ModelConfig) -> dict:
    if cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError("olmo3 exports a single attention_bias; qkv_bias and o_bias must agree")
    full = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    sliding = "sliding_attention" in cfg.layer_kinds()
    if sliding and cfg.rope_local_theta is None and cfg.rope_scaling is not None:
        raise HFFormatError("an olmo3 export cannot scale the RoPE of sliding layers (the model config scales every "
                            "layer's); set rope_local_theta to give the sliding layers their own, unscaled base")
    local = rope_to_hf(local_theta, None)
    return dict(hidden_act="silu", attention_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_kinds()),
                rope_parameters={"full_attention": full, "sliding_attention": local})


FAMILY = Family(
    name="olmo3", model_type="olmo3", architecture="Olmo3ForCausalLM",
    declared=dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_scope="projection"),
    expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types", "rope_local_theta"),
    defaults=dict(max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  attention_bias=False, sliding_window=4096, pad_token_id=1, bos_token_id=None, eos_token_id=50279),
    read=read, write=write, norms=NORMS, sliding="3 sliding : 1 full by default (`layer_types`), "
    "sliding layers with their own, unscaled RoPE",
)

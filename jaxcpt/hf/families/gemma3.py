"""Gemma 3 text (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Gemma 2's block (see gemma2.py) plus (1 + w) RMSNorms on q and k, without attention
soft-capping (transformers' Gemma 3 never passes ``attn_logit_softcapping`` to its
attention, so an imported value is ignored here too), and a local:global layer pattern
(5:1 by default, ``sliding_window_pattern`` in older configs) whose sliding layers have
their own, unscaled RoPE base while the global layers carry the RoPE scaling.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families.base import Family, rope_from_params, rope_to_hf
from jaxcpt.hf.families.gemma2 import GEMMA_BLOCK, GEMMA_DEFAULTS, GEMMA_NORMS, gemma_block, gemma_block_to_hf
from jaxcpt.model.config import ModelConfig

GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # transformers' default_theta for Gemma 3


def _rope(hf: dict, where: str) -> dict:
    """Both RoPEs, from 5.x per-layer-type rope_parameters or the older rope_theta / rope_local_base_freq / rope_scaling."""
    params = hf.get("rope_parameters") or {}
    if params and not ({"full_attention", "sliding_attention"} & set(params)):
        raise HFFormatError(f"{where}: Gemma 3 rope_parameters must be given per layer type "
                            "(full_attention, sliding_attention)")
    full = dict(params.get("full_attention") or {})
    local = dict(params.get("sliding_attention") or {})
    full.update(hf.get("rope_scaling") or {})  # transformers applies a legacy rope_scaling to the global layers
    full.pop("truncate", None)  # transformers' YaRN reads `truncate` from the outer dict, so for Gemma 3 it is always true
    full.setdefault("rope_theta", hf.get("rope_theta", GLOBAL_THETA))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", LOCAL_THETA))
    theta, scaling = rope_from_params(full, hf, where, GLOBAL_THETA, top_level_original=False)
    local_theta, local_scaling = rope_from_params(local, hf, where, LOCAL_THETA, top_level_original=False)
    if (local_theta, local_scaling) == (theta, scaling):  # one RoPE for all layers
        return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=None)
    if local_scaling is not None:
        raise HFFormatError(f"{where}: RoPE scaling on sliding_attention layers ('{local_scaling.type}') is not "
                            "supported; only the full_attention layers may scale (supported there: all rope types)")
    return dict(rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta)


def read(hf: dict, where: str) -> dict:
    pattern = int(hf.get("sliding_window_pattern") or 6)  # five local layers, then a global one
    default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(int(hf["num_hidden_layers"]))]
    return dict(**gemma_block(hf, where, default), **_rope(hf, where))


def write(cfg: ModelConfig) -> dict:
    full = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    local_theta = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
    local = rope_to_hf(local_theta, None) if cfg.rope_local_theta is not None else dict(full)
    out = dict(**gemma_block_to_hf(cfg), attn_logit_softcapping=None, use_bidirectional_attention=False,
               rope_parameters={"full_attention": full, "sliding_attention": local},
               rope_theta=cfg.rope_theta, rope_local_base_freq=local_theta)  # and the pre-5.x spelling
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    kinds = cfg.layer_kinds()
    for period in range(1, cfg.num_layers + 1):  # older readers know the pattern only as a period
        if all((kind == "full_attention") == ((i + 1) % period == 0) for i, kind in enumerate(kinds)):
            out["sliding_window_pattern"] = period
            break
    return out


FAMILY = Family(
    name="gemma3", model_type="gemma3_text", architecture="Gemma3ForCausalLM",
    declared=dict(GEMMA_BLOCK, qk_norm=True),
    expresses=("qkv_bias", "o_bias", "sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcap",
               "rope_local_theta"),
    defaults=dict(GEMMA_DEFAULTS, max_position_embeddings=131072, final_logit_softcapping=None),
    read=read, write=write, norms=GEMMA_NORMS, sliding="local:global pattern (`layer_types`), "
    "local layers with their own RoPE base",
)

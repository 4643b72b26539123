"""What every family module is made of, and the config.json fields all families share.

A ``Family`` holds, side by side: the names transformers gives it, the block options
all its checkpoints have (``declared``), the further options its config.json can express
(``expresses``), transformers' defaults for keys a config.json may omit, its norm names,
and two functions for its own config.json keys. ``config_from_hf`` / ``config_to_hf``
below do the shared part, so a family module holds only what is its own.

Reading accepts both the transformers 5 spelling (``rope_parameters``, ``dtype``) and
the older one (``rope_theta`` / ``rope_scaling``, ``torch_dtype``) still found in most
checkpoints; writing writes both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.mapping import ExpertNames
from jaxcpt.model.config import ModelConfig, RopeScaling

# ModelConfig fields that describe what a decoder block does; a family fixes some
# (``declared``), lets config.json choose others (``expresses``), and has the rest at
# ModelConfig's defaults.
BLOCK_OPTIONS = (
    "qkv_bias", "o_bias", "mlp_bias", "sliding_window", "layer_types", "rope_local_theta", "norm_plus_one",
    "post_norms", "qk_norm", "activation", "scale_embeddings", "query_pre_attn_scalar", "attn_logit_softcap",
    "final_logit_softcap", "pre_norms", "qk_norm_scope", "rope_layers", "attn_output_gate", "partial_rotary_factor",
    "linear_attention", "attention_sinks",
    "global_head_dim", "global_kv_heads", "attention_k_eq_v", "value_norm", "rope_proportion", "kv_shared_layers",
    "double_wide_mlp", "per_layer_input", "per_layer_vocab_size", "layer_scalar", "mla",
)
ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # ModelConfig.family
    model_type: str  # config.json model_type
    architecture: str  # config.json architectures[0], the transformers class
    declared: dict  # block options every checkpoint of the family has
    expresses: tuple[str, ...]  # block options its config.json sets per checkpoint
    defaults: dict  # transformers' config-class defaults for keys config.json may omit
    read: Callable[[dict, str], dict]  # config.json (defaults filled in) -> the family's own ModelConfig fields
    write: Callable[[ModelConfig], dict]  # ModelConfig -> the family's own config.json keys
    norms: tuple[tuple[str, str], ...]  # (jaxcpt leaf, HF name in model.layers.{i}.) of the per-layer norms
    sliding: str  # how its layers may slide, for the README table
    # MoE families: router and expert tensor names (jaxcpt.hf.mapping), or a function cfg -> Tensor rows for
    # checkpoints that fuse all experts of a layer into one tensor (gpt-oss)
    experts: ExpertNames | Callable[[ModelConfig], list] | None = None
    # the family's own tensors beyond the shared decoder's (a hybrid's linear-attention weights), if any
    extra_tensors: Callable[[ModelConfig], list] | None = None
    # the family's whole tensor table, where the shared decoder's does not fit (Gemma 4's layers of several shapes)
    tensors: Callable[[ModelConfig], list] | None = None


def config_from_hf(family: Family, hf: dict, where: str) -> ModelConfig:
    """``ModelConfig`` of a parsed config.json of ``family``; unsupported settings raise HFFormatError."""
    for key in REQUIRED_KEYS:
        if key not in hf:
            raise HFFormatError(f"{where}: required field '{key}' is missing")
    hf = {**family.defaults, **hf}  # an explicit null stays null, as in transformers
    heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or None
    if head_dim is not None and int(head_dim) * heads == int(hf["hidden_size"]):
        head_dim = None  # the usual width: None, so configs that spell it and configs that do not compare equal
    common = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=None if head_dim is None else int(head_dim),
        max_position_embeddings=int(hf["max_position_embeddings"]),
        rms_norm_eps=float(hf["rms_norm_eps"]),
        tie_word_embeddings=bool(hf["tie_word_embeddings"]),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=hf.get("eos_token_id"),  # Llama 3 Instruct lists several stop tokens: keep them all
        pad_token_id=_first(hf.get("pad_token_id")),
    )
    own = family.read(hf, where)
    common.update({key: own.pop(key) for key in list(own) if key in common})  # e.g. DeepSeek-V3's head_dim
    return ModelConfig(family=family.name, **common, **family.declared, **own)


def config_to_hf(family: Family, cfg: ModelConfig, dtype: str) -> dict:
    """A config.json dict transformers reads back as ``family`` with the same numbers."""
    wrong = []
    for name in BLOCK_OPTIONS:
        value = getattr(cfg, name)
        if name in family.declared and value != family.declared[name]:
            wrong.append(f"{name}={value!r} (always {family.declared[name]!r} there)")
        elif name not in family.declared and name not in family.expresses and value != _default(name):
            wrong.append(f"{name}={value!r} (it has no such option)")
    moe = cfg.moe
    if moe is not None and "mla" not in family.expresses:  # DeepSeek-V3's router options: only its family holds them
        deepseek = {"scoring": "softmax", "num_groups": 1, "top_groups": 1, "routed_scaling_factor": 1.0,
                    "shared_experts": 0, "first_dense_layers": 0, "score_correction_bias": False}
        wrong += [f"moe.{k}={getattr(moe, k)!r} (DeepSeek-V3's; family deepseek_v3 holds it)"
                  for k, v in deepseek.items() if getattr(moe, k) != v]
    if wrong:
        raise HFFormatError(f"a '{family.name}' export cannot hold {', '.join(wrong)}; fix the model config or the family")
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    out.update(family.write(cfg))
    return out


def _default(name: str):
    return ModelConfig.__dataclass_fields__[name].default


def _first(value):
    return value[0] if isinstance(value, list) else value


def require_activation(hf: dict, key: str, supported: dict[str, str], where: str) -> str:
    """The ModelConfig activation for config.json's ``key``, or an error naming the supported ones."""
    act = hf.get(key)
    if act not in supported:
        raise HFFormatError(f"{where}: {key} '{act}' is not supported here (supported: {', '.join(supported)})")
    return supported[act]


# --- RoPE ----------------------------------------------------------------------------

def rope_from_params(params: dict, hf: dict, where: str, default_theta: float,
                     top_level_original: bool = True) -> tuple[float, RopeScaling | None]:
    """(theta, scaling) from one flat HF rope dict, as transformers 5 standardises it.

    ``top_level_original``: a top-level ``original_max_position_embeddings`` in config.json
    wins over the one in the rope dict (transformers does so for flat rope parameters).
    """
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise HFFormatError(f"{where}: partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    if rope_type not in ROPE_TYPES:
        raise HFFormatError(f"{where}: rope type '{rope_type}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return theta, None
    original = params.get("original_max_position_embeddings", hf["max_position_embeddings"])
    if top_level_original and hf.get("original_max_position_embeddings"):
        original = hf["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None and rope_type in ("yarn", "longrope"):  # transformers: the ratio of the two lengths
        factor = hf["max_position_embeddings"] / original
    if factor is None:
        raise HFFormatError(f"{where}: rope type '{rope_type}' needs a 'factor'")
    fields = dict(type=rope_type, factor=float(factor), original_max_position_embeddings=int(original))
    if rope_type == "llama3":
        fields.update(low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]))
    elif rope_type == "yarn":
        fields.update(beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
                      truncate=bool(params.get("truncate", True)))
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if params.get(key) is not None:
                fields[key] = float(params[key])
    elif rope_type == "longrope":
        fields.update(short_factor=tuple(float(x) for x in params["short_factor"]),
                      long_factor=tuple(float(x) for x in params["long_factor"]))
        if params.get("attention_factor") is not None:
            fields["attention_factor"] = float(params["attention_factor"])
    return theta, RopeScaling(**fields)


def flat_rope(hf: dict, where: str, default_theta: float = 10000.0) -> dict:
    """rope_theta / rope_scaling ModelConfig fields from a config.json with one RoPE for all layers."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise HFFormatError(f"{where}: per-layer-type rope_parameters are not supported for this family")
    # transformers 5: a legacy rope_scaling dict replaces rope_parameters; rope_theta fills in
    params = dict(hf.get("rope_scaling") or params or {})
    theta, scaling = rope_from_params(params, hf, where, default_theta)
    return dict(rope_theta=theta, rope_scaling=scaling)


def rope_to_hf(theta: float, scaling: RopeScaling | None) -> dict:
    """One HF rope dict (the 5.x ``rope_parameters`` form)."""
    if scaling is None:
        return {"rope_type": "default", "rope_theta": theta}
    s = scaling
    rope = {"rope_type": s.type, "rope_theta": theta, "factor": s.factor}
    if s.type in ("llama3", "yarn", "longrope"):
        rope["original_max_position_embeddings"] = s.original_max_position_embeddings
    if s.type == "llama3":
        rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
    elif s.type == "yarn":
        rope.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow, truncate=s.truncate)
        rope.update({k: getattr(s, k) for k in ("mscale", "mscale_all_dim") if getattr(s, k) is not None})
    elif s.type == "longrope":
        rope.update(short_factor=list(s.short_factor), long_factor=list(s.long_factor))
    if s.type in ("yarn", "longrope") and s.attention_factor is not None:
        rope["attention_factor"] = s.attention_factor
    return rope


def flat_rope_to_hf(cfg: ModelConfig) -> dict:
    rope = rope_to_hf(cfg.rope_theta, cfg.rope_scaling)
    out = {"rope_parameters": rope, "rope_theta": cfg.rope_theta}  # and the pre-5.x spelling, for older readers
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)
    return out


# --- per-layer attention -------------------------------------------------------------

def layer_types_from_hf(hf: dict, where: str, default: list[str]) -> tuple[str, ...]:
    types = hf.get("layer_types") or default
    types = ["full_attention" if t == "attention" else t for t in types]  # transformers' legacy spelling
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise HFFormatError(f"{where}: layer type(s) {unknown} are not supported (full_attention, sliding_attention)")
    if len(types) != int(hf["num_hidden_layers"]):
        raise HFFormatError(f"{where}: layer_types lists {len(types)} layers, num_hidden_layers is {hf['num_hidden_layers']}")
    return tuple(types)


def windows_from_hf(types: tuple[str, ...], window) -> dict:
    """sliding_window / layer_types ModelConfig fields; a model without sliding layers has neither."""
    if "sliding_attention" not in types or not window:
        return dict(sliding_window=None, layer_types=None)
    return dict(sliding_window=int(window), layer_types=types)


def refuse_bidirectional(hf: dict, where: str) -> None:
    if hf.get("use_bidirectional_attention"):
        raise HFFormatError(f"{where}: use_bidirectional_attention=true (an encoder) is not supported; "
                            "jaxcpt trains causal language models")

"""Hugging Face model families: their config.json <-> ``ModelConfig``.

Each family is a row of ``FAMILIES``: the ``model_type`` and architecture class
transformers uses, and what sets it apart from plain Llama (Qwen2's q/k/v bias,
Mistral's sliding window). Reading accepts both the transformers 5 spelling
(``rope_parameters``, ``dtype``) and the older one (``rope_theta``/``rope_scaling``,
``torch_dtype``) still found in most checkpoints; writing uses the 5.x spelling.
"""

from __future__ import annotations

import dataclasses

from jaxcpt.errors import HFFormatError
from jaxcpt.model.config import ModelConfig, RopeScaling


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "LlamaForCausalLM"),
    "mistral": Family("mistral", "MistralForCausalLM"),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM"),
}


def _rope_from_hf(hf: dict, where: str) -> tuple[float, RopeScaling | None]:
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise HFFormatError(f"{where}: per-layer-type rope_parameters are not supported")
    params = dict(params or {})
    if hf.get("rope_scaling"):
        params = {**hf["rope_scaling"], **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "linear":
        return float(theta), RopeScaling(type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise HFFormatError(f"{where}: rope type '{rope_type}' is not supported (supported: default, linear, llama3)")


def _first(value):
    return value[0] if isinstance(value, list) else value


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """``ModelConfig`` from a parsed HF config.json; unsupported settings raise HFFormatError naming them."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise HFFormatError(
            f"{where}: model_type '{model_type}' is not supported; supported model types: {', '.join(FAMILIES)}"
        )
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFFormatError(f"{where}: hidden_act '{act}' is not supported (only silu/SwiGLU)")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise HFFormatError(f"{where}: required field '{key}' is missing")
    theta, scaling = _rope_from_hf(hf, where)
    sliding = None
    if model_type == "mistral":
        sliding = hf.get("sliding_window")
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        raise HFFormatError(f"{where}: Qwen2 with use_sliding_window=true (per-layer windows) is not supported")
    attention_bias = bool(hf.get("attention_bias", False))
    heads = int(hf["num_attention_heads"])
    return ModelConfig(
        family=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=hf.get("head_dim") or None,
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=attention_bias if model_type == "llama" else False,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        sliding_window=int(sliding) if sliding else None,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_first(hf.get("bos_token_id")),
        eos_token_id=hf.get("eos_token_id"),  # Llama 3 Instruct lists several stop tokens: keep them all
        pad_token_id=_first(hf.get("pad_token_id")),
    )


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """A config.json dict transformers reads back as the same architecture."""
    family = FAMILIES[cfg.family]
    if cfg.family == "qwen2" and (not cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        raise HFFormatError("a qwen2 export needs qkv_bias=true, o_bias=false, mlp_bias=false")
    if cfg.family != "qwen2" and cfg.qkv_bias != cfg.o_bias:
        raise HFFormatError(f"{cfg.family} exports a single attention_bias; qkv_bias and o_bias must agree")
    if cfg.sliding_window is not None and cfg.family != "mistral":
        raise HFFormatError(f"sliding_window is only exported for family 'mistral', not '{cfg.family}'")
    rope: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.type, "rope_theta": cfg.rope_theta, "factor": s.factor}
        if s.type == "llama3":
            rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                        original_max_position_embeddings=s.original_max_position_embeddings)
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
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": rope,
        # the pre-5.x spelling too, so older transformers (and vLLM) read the same rope
        "rope_theta": cfg.rope_theta,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": dtype,
        "torch_dtype": dtype,
        "use_cache": True,
        "attention_dropout": 0.0,
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(rope)
    if cfg.family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif cfg.family == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    elif cfg.family == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    return out


def generation_config(cfg: ModelConfig) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out

"""Hugging Face model families: one module each, holding its config.json <-> ``ModelConfig``
mapping, its tensor names and the block options it declares (see ``base.Family``).

Adding a family = adding a module with a ``FAMILY`` and listing it here, plus its tests.
Everything outside these modules asks the registry, never a ``model_type``.
"""

from __future__ import annotations

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.families import (base, deepseek_v3, gemma2, gemma3, gemma4, gpt_oss, llama, mistral, mixtral, olmo3, olmoe, qwen2,
                                 qwen3,
                                 qwen3_5_text, qwen3_moe, smollm3, unsupported)
from jaxcpt.hf.families.base import Family
from jaxcpt.hf.mapping import Tensor, decoder_tensors
from jaxcpt.model.config import ModelConfig

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (llama, mistral, qwen2, qwen3, gemma2, gemma3,
                                                                olmo3, smollm3, qwen3_moe, mixtral, qwen3_5_text, olmoe,
                                                                gpt_oss, gemma4, deepseek_v3)}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
# model types whose checkpoints hold a text model we support, under another wrapper
_WRAPPED = {"gemma3": "gemma3_text (Gemma3ForCausalLM); a multimodal Gemma3ForConditionalGeneration checkpoint "
                      "must have its language model saved on its own first",
            "qwen3_5": "qwen3_5_text (Qwen3_5ForCausalLM); a multimodal Qwen3_5ForConditionalGeneration checkpoint "
                       "(vision tower, text_config) must have its language model saved on its own first"}


def family_of_hf(hf: dict, where: str) -> Family:
    model_type = hf.get("model_type")
    if (why := unsupported.refusal(hf, where)) is not None:
        raise HFFormatError(why)
    if model_type in _WRAPPED:
        raise HFFormatError(f"{where}: model_type '{model_type}' is not supported; supported is {_WRAPPED[model_type]}")
    if model_type not in _BY_MODEL_TYPE:
        raise HFFormatError(f"{where}: model_type '{model_type}' is not supported; supported model types: "
                            f"{', '.join(_BY_MODEL_TYPE)}")
    return _BY_MODEL_TYPE[model_type]


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """``ModelConfig`` from a parsed HF config.json; unsupported settings raise HFFormatError naming them."""
    return base.config_from_hf(family_of_hf(hf, where), hf, where)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    """A config.json dict transformers reads back as the same architecture."""
    return base.config_to_hf(FAMILIES[cfg.family], cfg, dtype)


def tensor_table(cfg: ModelConfig) -> list[Tensor]:
    """Every parameter of a model with config ``cfg``, with its HF name and layout."""
    family = FAMILIES[cfg.family]
    if family.tensors is not None:
        return family.tensors(cfg)
    rows = decoder_tensors(cfg, family.norms, family.experts)
    return rows + family.extra_tensors(cfg) if family.extra_tensors is not None else rows


def generation_config(cfg: ModelConfig) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            out[key] = getattr(cfg, key)
    return out


def families_markdown() -> str:
    """The README table of supported families, from the family modules' declarations."""
    lines = ["| family | transformers class (`model_type`) | import | export | splash | sliding window | "
             "linear-attention layers | tied embeddings | block options it declares | options its config.json sets |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in FAMILIES.values():
        declared = ", ".join(f"`{k}={v}`" for k, v in f.declared.items()) or "none (the shared block)"
        expresses = ", ".join(f"`{name}`" for name in f.expresses)
        linear = "Gated DeltaNet (`layer_types`)" if "linear_attention" in f.expresses else "no"
        splash = "no (attention sinks)" if f.declared.get("attention_sinks") else "yes"
        if "mla" in f.expresses:  # MLA's v heads are zero-padded to the q/k width for every kernel (model/mla.py)
            splash = "compiles for TPU, not run on one yet (MLA: v padded to the q/k head width)"
        lines.append(f"| {f.name} | `{f.architecture}` (`{f.model_type}`) | yes | yes | {splash} | {f.sliding} | "
                     f"{linear} | yes | {declared} | {expresses} |")
    return "\n".join(lines)

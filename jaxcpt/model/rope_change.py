"""Changing a model's RoPE at the start of a continual-pretraining run, for context extension.

Extending a context usually starts by changing the rotary embedding: a larger base
(``rope_theta``, e.g. Llama 3's 500k or Qwen's 1M), or a frequency scaling with a new
factor and original length (position interpolation = ``linear``, ``llama3``, ``yarn``).
RoPE has no parameters, so the change is to the model's *config*: ``apply_rope_change``
returns the starting model's ``ModelConfig`` with the new numbers, the run computes with
them, and every export writes them into config.json (``rope_parameters`` in
transformers 5's spelling, via ``jaxcpt.hf.families.base.rope_to_hf``), so transformers
computes exactly what was trained.

``check_trained_length`` warns when a stage trains rows longer than the RoPE settings were
trained for and the run changes nothing about the RoPE: the positions past that length
are out of distribution for the starting model (the reason for the change in the first place).
"""

from __future__ import annotations

import dataclasses
import logging

from jaxcpt.model.config import ModelConfig, RopeChange

log = logging.getLogger(__name__)
SCALED_TYPES = ("linear", "llama3", "yarn")  # the scalings a run may set; dynamic/longrope stay as read


def apply_rope_change(model_cfg: ModelConfig, change: RopeChange | None) -> ModelConfig:
    """``model_cfg`` with ``change`` applied (absolute values: applying it twice changes nothing); ``rope`` cleared."""
    if change is None:
        return dataclasses.replace(model_cfg, rope=None) if model_cfg.rope is not None else model_cfg
    from jaxcpt.config import ConfigError

    updates: dict = {"rope": None}
    if change.theta is not None:
        if change.theta <= 0:
            raise ConfigError(f"model.rope.theta must be > 0, got {change.theta}")
        updates["rope_theta"] = float(change.theta)
    longest = model_cfg.max_position_embeddings
    if change.scaling is not None:
        s = change.scaling
        if s.type not in SCALED_TYPES:
            raise ConfigError(f"model.rope.scaling.type '{s.type}' cannot be set by a run; use one of "
                              f"{', '.join(SCALED_TYPES)} (or model.rope.theta)")
        if s.factor < 1:
            raise ConfigError(f"model.rope.scaling.factor must be >= 1 to extend a context, got {s.factor}")
        updates["rope_scaling"] = s
        if s.type != "linear":  # linear has no original length of its own
            longest = max(longest, int(round(s.original_max_position_embeddings * s.factor)))
        else:
            longest = max(longest, int(round(model_cfg.max_position_embeddings * s.factor)))
    if change.max_position_embeddings is not None:
        longest = change.max_position_embeddings
    updates["max_position_embeddings"] = longest
    changed = dataclasses.replace(model_cfg, **updates)
    changed.validate()
    return changed


def describe_rope(model_cfg: ModelConfig) -> str:
    """One line: theta, scaling and the trained length, as ``train --check`` prints it."""
    s = model_cfg.rope_scaling
    scaling = "no scaling" if s is None else f"{s.type} x{s.factor:g}" + (
        f" of {s.original_max_position_embeddings}" if s.type in ("llama3", "yarn", "longrope") else "")
    return f"theta {model_cfg.rope_theta:g}, {scaling}, max_position_embeddings {model_cfg.max_position_embeddings}"


def trained_length(model_cfg: ModelConfig) -> int:
    """The longest context the model's RoPE settings were trained for: its max_position_embeddings."""
    return model_cfg.max_position_embeddings


def check_trained_length(model_cfg: ModelConfig, change: RopeChange | None, seq_lens: dict[str, int]) -> list[str]:
    """Warnings (logged and returned) for stages whose rows are longer than the RoPE was trained for, when the
    run does not change the RoPE. ``seq_lens``: {stage name: tokens per row}."""
    if change is not None:
        return []
    longest = trained_length(model_cfg)
    warnings = []
    for stage, seq_len in seq_lens.items():
        if seq_len > longest:
            theta = model_cfg.rope_theta
            scaling = model_cfg.rope_scaling.type if model_cfg.rope_scaling else "none"
            warnings.append(
                f"{stage} trains rows of {seq_len} tokens, but the model's RoPE (theta {theta:g}, scaling {scaling}) "
                f"was trained for {longest} positions (max_position_embeddings) and the run does not change it: "
                f"positions {longest}..{seq_len - 1} are new to the model. Set model.rope (e.g. model.rope.theta, or "
                f"model.rope.scaling: {{type: yarn, factor: {-(-seq_len // longest)}, original_max_position_embeddings: "
                f"{longest}}}) or keep seq_len <= {longest}")
    for text in warnings:
        log.warning(text)
    return warnings

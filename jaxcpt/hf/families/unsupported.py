"""Checkpoints of model types transformers ships that jaxcpt does not import as they are, and why.

An import of such a checkpoint stops with what stands in the way, by name, rather than dropping
anything; ``family_of_hf`` asks ``refusal`` before it looks a family up.
"""

from __future__ import annotations


def refusal(hf: dict, where: str) -> str | None:
    """Why a config.json of a model type transformers has but jaxcpt does not import cannot load; None if not such."""
    if hf.get("model_type") == "gemma4":  # Gemma4ForConditionalGeneration: the text decoder plus vision/audio towers
        towers = [name for name in ("vision_config", "audio_config") if hf.get(name)]
        return (f"{where}: model_type 'gemma4' (Gemma4ForConditionalGeneration, with {', '.join(towers) or 'no'} "
                "towers) is not supported as it is. A text-only import keeps the language model "
                "(model.language_model.*, its text_config) and would drop the vision and audio towers and their "
                "embedders: save the language model on its own first (a Gemma4ForCausalLM checkpoint, model_type "
                "gemma4_text), which jaxcpt imports")
    return None

"""Models to evaluate: a jaxcpt run, checkpoint directory or step, or a Hugging Face directory."""

from __future__ import annotations

from jaxcpt.errors import UserError


def load_for_evaluation(path, *, mesh=None, dtype: str = "float32", weights: str = "raw"):
    """(model, HF tokenizer, mesh) of ``path``, opened by ``jaxcpt.open_model`` (its rules for
    the tokenizer and the weights); ``weights='ema'`` takes a checkpoint's moving average. A LoRA
    model keeps its adapters, as it trained."""
    from transformers import AutoTokenizer

    from jaxcpt.open_model import open_model
    from jaxcpt.sharding.mesh import build_mesh

    mesh = mesh if mesh is not None else build_mesh()
    opened = open_model(path, weights=weights, lora="adapter", mesh=mesh, dtype=dtype)
    if opened.tokenizer_dir is None:
        raise UserError(f"'{path}' has no tokenizer (an HF directory without tokenizer files, or a checkpoint with "
                        "neither RUN/tokenizer nor a stored copy); add the tokenizer files, or evaluate its HF export "
                        "(jaxcpt export-hf --tokenizer DIR)")
    tokenizer = AutoTokenizer.from_pretrained(opened.tokenizer_dir, local_files_only=True)
    return opened.model(), tokenizer, mesh

"""Models to evaluate: a jaxcpt run, checkpoint directory or step, or a Hugging Face directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxcpt.errors import UserError


def load_for_evaluation(path, *, mesh=None, dtype: str = "float32", weights: str = "raw"):
    """(model, HF tokenizer, mesh, params) of ``path``; ``weights='ema'`` takes a checkpoint's moving average."""
    from transformers import AutoTokenizer

    from jaxcpt.sharding.mesh import build_mesh

    mesh = mesh if mesh is not None else build_mesh()
    if (Path(path) / "config.json").is_file():
        from jaxcpt.hf.convert import load_hf

        if weights != "raw":
            raise UserError(f"'{path}' is a Hugging Face directory, which holds one set of weights; weights=ema "
                            "needs a jaxcpt checkpoint that kept a moving average (ema.decay > 0)")
        model = load_hf(path, mesh=mesh, dtype=dtype)
        tokenizer_dir = str(path)
        params = None
    else:
        model, params = _load_checkpoint(path, mesh, dtype, weights)
        tokenizer_dir = model.tokenizer_dir
        if tokenizer_dir is None:
            raise UserError(f"the checkpoint '{path}' has no tokenizer (neither RUN/tokenizer nor a stored copy); "
                            "evaluate its HF export instead (jaxcpt export-hf)")
    return model, AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True), mesh, params


def _load_checkpoint(path, mesh, dtype: str, weights: str):
    from flax import nnx

    from jaxcpt.model.persist import load_model, resolve_run_checkpoints

    model = load_model(path, mesh=mesh, dtype=dtype)
    if weights == "raw":
        return model, None
    if weights != "ema":
        raise UserError(f"weights must be 'raw' or 'ema', got {weights!r}")
    from jaxcpt.checkpoint import resolve_step_dir, restore_params
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.sharding.rules import make_rules
    from jaxcpt.train.state import trainable_view, with_trainable

    step_dir = resolve_step_dir(resolve_run_checkpoints(path))
    params = nnx.state(model, nnx.Param).to_pure_dict()
    from jaxcpt.checkpoint import read_meta

    keys = read_meta(step_dir).get("trainable_keys")
    abstract = abstract_params(dataclasses.replace(model.config), mesh, make_rules())
    view = trainable_view(abstract, keys or list(trainable_view(abstract, _all_paths(abstract))))
    average = restore_params(step_dir, view, item="ema")
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, with_trainable(params, average))
    return model, state


def _all_paths(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _all_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"

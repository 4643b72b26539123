"""A model to adapt, as host arrays: read from an HF directory or a jaxcpt checkpoint, written as an HF directory.

Adaptation edits a few named parameters (``embedding`` [V, E], ``lm_head`` [E, V], the
``layers.*`` stacks [L, ...]) and must leave every other tensor bit-identical. Reading goes
through ``jaxcpt.open_model`` onto one CPU device (surgery is host work; a GPU's
memory would only limit it), in a storage dtype that holds the source exactly, and
writing through ``save_hf`` in the source's dtype, so an unchanged tensor round-trips
bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig

SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass
class SourceModel:
    """What an adaptation step starts from."""

    path: str  # as given
    config: ModelConfig
    params: dict  # nested dict of numpy arrays, the names of jaxcpt.model.persist.params_of
    dtype: str  # storage dtype of the source; exports use it, so untouched tensors stay bit-identical
    tokenizer_dir: str | None  # HF tokenizer files of the source, if any
    adaptation: dict | None  # what earlier adaptation steps added (jaxcpt.adapt.metadata), if any


def host_mesh():
    from jaxcpt.sharding.mesh import build_mesh

    return build_mesh({"data": 1}, devices=jax.devices("cpu")[:1])


def hf_weights_dtype(directory: Path) -> str:
    """The dtype the HF directory's tensors are stored in (float32 when they mix dtypes: it holds them all exactly)."""
    from safetensors import safe_open

    kinds = set()
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as handle:
            kinds.update(handle.get_slice(name).get_dtype() for name in handle.keys())
    unknown = kinds - set(SAFETENSORS_DTYPES)
    if unknown:
        raise UserError(f"'{directory}' stores tensors as {sorted(unknown)}; only F32, BF16 and F16 are supported")
    if len(kinds) == 1:
        return SAFETENSORS_DTYPES[kinds.pop()]
    if kinds:
        print(f"note: '{directory}' mixes dtypes {sorted(kinds)}; writing float32, which holds every value exactly")
    return "float32"


def load_source(path: str | os.PathLike, tokenizer: str | None = None) -> SourceModel:
    """The model at ``path`` (an HF directory or a jaxcpt run/checkpoint directory), opened by
    ``jaxcpt.open_model``: a LoRA run's adapters folded in, tokenizer and adaptation record by its rules."""
    from jaxcpt.open_model import locate_model, open_model

    location = locate_model(path)
    if location.kind == "hf":
        dtype = hf_weights_dtype(Path(path))
        # bfloat16 sources stay bfloat16 in memory (half the host memory); float16 has no such storage dtype
        # here, and float32 holds it exactly.
        opened = open_model(location, lora="merged", mesh=host_mesh(),
                            param_dtype="bfloat16" if dtype == "bfloat16" else "float32")
    else:
        opened = open_model(location, lora="merged", mesh=host_mesh())
        dtype = opened.config.param_dtype
    params = jax.tree.map(np.asarray, opened.params)
    tokenizer_dir = tokenizer or opened.tokenizer_dir
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer directory '{tokenizer_dir}' does not exist")
    return SourceModel(str(path), opened.config, params, dtype, tokenizer_dir, opened.adaptation)


def _fit_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad ``array`` up to ``shape``: the model may store more vocabulary rows than the real vocabulary."""
    if array.shape == tuple(shape):
        return array
    if any(a > s for a, s in zip(array.shape, shape)) or array.ndim != len(shape):
        raise ValueError(f"cannot fit an array of shape {array.shape} into {shape}")
    return np.pad(array, [(0, s - a) for a, s in zip(array.shape, shape)])


def save_model(cfg: ModelConfig, params: dict, out: str | os.PathLike, *, dtype: str, tokenizer_dir: str | None,
               overwrite: bool = False) -> Path:
    """Write ``params`` (real-size arrays) as an HF directory; ``tokenizer_dir``'s companion files travel along."""
    from jaxcpt.hf.convert import save_hf
    from jaxcpt.model.persist import abstract_params, model_from_params
    from jaxcpt.sharding.rules import make_rules

    mesh, rules = host_mesh(), make_rules()
    device = mesh.devices.flat[0]
    targets = abstract_params(cfg, mesh, rules)
    arrays = jax.tree.map(lambda a, t: jax.device_put(_fit_to(np.asarray(a, t.dtype), t.shape), device),
                          params, targets)
    model = model_from_params(cfg, arrays, rules)
    return save_hf(model, out, dtype=dtype, tokenizer_dir=tokenizer_dir, overwrite=overwrite)


def real_vocab_rows(params: dict, cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(input embedding [V, E], output projection [E, V] or None when tied) at the config's real vocabulary size."""
    embedding = params["embedding"][: cfg.vocab_size]
    lm_head = params["lm_head"][:, : cfg.vocab_size] if "lm_head" in params else None
    return embedding, lm_head


def check_out(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail before any work when ``out`` would be refused at the end."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise UserError(f"'{path}' exists and is not empty; choose another --out or pass --overwrite")

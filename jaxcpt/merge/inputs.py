"""The models a merge reads: HF directories and jaxcpt checkpoints, one tensor at a time, in HF layout.

What a read holds on the host:

* an HF directory: one tensor. Each read opens the safetensors file, copies the tensor
  out of the memory map and closes it again; a handle kept open would leave every page
  it ever touched mapped into the process, and resident memory would grow to the
  whole model while the merge streams through it.
* a jaxcpt checkpoint: one *parameter*, all layers of it ([L, ...], e.g. every layer's
  MLP up projection), restored with Orbax as a numpy array and kept while its layers
  are merged (restoring takes up to twice its size for a moment when its chunks are
  cut along a later axis). Orbax stores each array in chunks of one device shard, and
  the layer axis is never sharded, so every chunk spans all layers: a single layer
  cannot be read without decoding them all. Reading parameter by parameter decodes
  each chunk once; reading layer by layer would decode every parameter once per layer
  for the same peak memory. For a Llama-3.1-8B checkpoint in bfloat16 the largest
  parameter (the [32, 4096, 14336] MLP matrices) is 3.8 GB of the model's 16 GB.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import ml_dtypes
import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig

# Settings that decide the tensors' shapes and meaning: inputs must agree on all of them.
STRUCTURE_FIELDS = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_size", "tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm",
                    "post_norms", "pre_norms", "qk_norm_scope",
                    # hybrids: which layers are Gated DeltaNet decides which tensors exist, and their heads the shapes
                    "linear_layers", "linear_attention", "attn_output_gate")
# Settings that leave the tensors alone: the merged model takes the first CPT model's, and a difference is noted.
CONFIG_FIELDS = ("rope_theta", "rope_scaling", "rope_local_theta", "rms_norm_eps", "sliding_window", "layer_types",
                 "rope_layers", "partial_rotary_factor",
                 "max_position_embeddings", "query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                 "bos_token_id", "eos_token_id", "pad_token_id")
DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16", np.dtype(np.float16): "float16"}


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of the merged model: its HF name and shape, and where it lives in a jaxcpt checkpoint."""

    name: str  # e.g. model.layers.3.mlp.up_proj.weight
    shape: tuple[int, ...]  # HF layout
    parameter: tuple[str, ...]  # jaxcpt parameter path, e.g. ('layers', 'up')
    layer: int | None  # index into the stacked [L, ...] parameter; None for unstacked ones
    to_hf: Callable[[np.ndarray], np.ndarray]  # one jaxcpt slice -> HF layout


def hf_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """Every tensor of a model with config ``cfg``, parameter by parameter, layers in order within each.

    The only place the merge uses jaxcpt's HF name table.
    """
    from jaxcpt.hf.families import tensor_table

    out = []
    for row in tensor_table(cfg):
        if row.parts and row.path != row.parts[0]:  # an HF tensor of several parameters (gpt-oss): listed once
            continue
        layers = range(row.stack_size(cfg.num_layers)) if row.stacked else [None]
        for layer in layers:  # stack index (a hybrid's sub-stacks hold some layers only)
            name = row.name_at(layer) if layer is not None else row.hf_name
            out.append(HFTensor(name, tuple(row.hf_shape), tuple(row.path), layer, row.to_hf))
    return out


class HFInput:
    """A Hugging Face checkpoint directory (config.json + safetensors)."""

    kind = "hf"

    def __init__(self, directory: Path):
        from jaxcpt.hf.convert import SafetensorsReader, read_hf_config

        self.path = directory
        self.config = read_hf_config(directory)
        self._reader = SafetensorsReader(directory)  # checks the index and that every shard file exists
        self._dtypes = self._read_dtypes()

    def _read_dtypes(self) -> dict[str, np.dtype]:
        from safetensors import safe_open

        dtypes = {}
        for file in sorted(set(self._reader.weight_map.values())):
            with safe_open(self.path / file, framework="numpy") as handle:
                for name in handle.keys():
                    dtypes[name] = _numpy_dtype(handle.get_slice(name).get_dtype(), f"{self.path / file}: '{name}'")
        return dtypes

    def dtype(self, tensor: HFTensor) -> np.dtype:
        self._check(tensor)
        return self._dtypes[tensor.name]

    def read(self, tensor: HFTensor) -> np.ndarray:
        from safetensors import safe_open

        self._check(tensor)
        with safe_open(self._reader.where(tensor.name), framework="numpy") as handle:
            return handle.get_tensor(tensor.name)

    def _check(self, tensor: HFTensor) -> None:
        got = self._reader.shape(tensor.name)  # raises HFFormatError naming the directory when missing
        if got != tensor.shape:
            raise UserError(f"tensor '{tensor.name}' in '{self._reader.where(tensor.name)}' has shape {got}, but "
                            f"config.json implies {tensor.shape}; the weights and config.json do not belong together")

    def hf_config(self, dtype: str) -> dict:
        hf = json.loads((self.path / "config.json").read_text())
        hf["dtype"] = dtype
        hf.pop("torch_dtype", None)
        return hf

    def companion_dir(self) -> Path:
        return self.path


class CheckpointInput:
    """A jaxcpt checkpoint: a run directory, RUN/checkpoints (latest step) or one step."""

    kind = "checkpoint"

    def __init__(self, location):
        import orbax.checkpoint as ocp
        from etils import epath

        self.path = Path(location.path)
        self.step_dir = epath.Path(location.step_dir)
        self.config = location.config
        if self.config.lora is not None:  # its tensors alone are the frozen base: merging them would drop the training
            raise UserError(f"checkpoint '{self.step_dir}' holds LoRA adapters (model.lora); merge its merged export "
                            f"instead: jaxcpt export-hf {location.path} --out DIR (adapters folded in), then pass DIR")
        self._tokenizer_dir = location.tokenizer_dir
        tree = ocp.PyTreeCheckpointHandler().metadata(self.step_dir / "state").tree
        if not isinstance(tree, dict) or "params" not in tree:
            raise UserError(f"checkpoint '{self.step_dir}' has no 'params' in its state")
        self._metadata = tree["params"]
        self._held: tuple[tuple[str, ...], np.ndarray] | None = None  # the one parameter on the host

    def _leaf_metadata(self, tensor: HFTensor):
        node = self._metadata
        for key in tensor.parameter:
            if not isinstance(node, dict) or key not in node:
                raise UserError(f"checkpoint '{self.step_dir}' has no parameter '{'.'.join(tensor.parameter)}' "
                                f"(needed for '{tensor.name}'); was it written by another jaxcpt version?")
            node = node[key]
        return node

    def dtype(self, tensor: HFTensor) -> np.dtype:
        return np.dtype(self._leaf_metadata(tensor).dtype)

    def read(self, tensor: HFTensor) -> np.ndarray:
        if self._held is None or self._held[0] != tensor.parameter:
            self._held = None  # free the previous parameter before reading the next
            self._held = (tensor.parameter, self._restore(tensor))
        value = self._held[1]
        value = value[tensor.layer] if tensor.layer is not None else value
        out = tensor.to_hf(value)
        if out.shape != tensor.shape:
            raise UserError(f"parameter '{'.'.join(tensor.parameter)}' of '{self.step_dir}' gives '{tensor.name}' "
                            f"the shape {out.shape}, but its model config implies {tensor.shape}")
        return out

    def _restore(self, tensor: HFTensor) -> np.ndarray:
        """One parameter as a numpy array: an Orbax partial restore that reads no other array."""
        import orbax.checkpoint as ocp

        def nest(leaf):
            for key in reversed(("params", *tensor.parameter)):
                leaf = {key: leaf}
            return leaf

        target = nest(self._leaf_metadata(tensor))
        args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                      restore_args=nest(ocp.RestoreArgs(restore_type=np.ndarray)))
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            value = reader.restore(self.step_dir / "state", args=args)
        finally:
            reader.close()
        for key in ("params", *tensor.parameter):
            value = value[key]
        return np.asarray(value)

    def hf_config(self, dtype: str) -> dict:
        from jaxcpt.hf.families import config_to_hf

        return config_to_hf(self.config, dtype)

    def companion_dir(self) -> Path | None:
        return Path(self._tokenizer_dir) if self._tokenizer_dir else None


ModelInput = HFInput | CheckpointInput


def open_input(path: str | Path) -> ModelInput:
    """An HF directory (has config.json) or a jaxcpt checkpoint (run dir, RUN/checkpoints, one step),
    located by ``jaxcpt.open_model`` (its rules for the step and the tokenizer); tensors are read
    here, one at a time."""
    from jaxcpt.open_model import locate_model

    location = locate_model(path)
    return HFInput(Path(path)) if location.kind == "hf" else CheckpointInput(location)


def _describe(value) -> str:
    return repr(value) if not dataclasses.is_dataclass(value) else str(dataclasses.asdict(value))


def _structure(cfg: ModelConfig, name: str):
    """A structure setting of ``cfg``; linear_attention without its chunk_size, a training choice that leaves the
    tensors alone."""
    value = getattr(cfg, name)
    if name == "linear_attention" and value is not None:
        value = {key: v for key, v in dataclasses.asdict(value).items() if key != "chunk_size"}
    return value


def check_compatible(base: ModelInput, models: list[ModelInput]) -> list[str]:
    """Raise UserError listing every structural difference; return notes on the other config differences."""
    problems, notes = [], []
    for i, model in enumerate(models, start=1):
        label = f"model {i} ({model.path})" if len(models) > 1 else f"the model ({model.path})"
        for name in STRUCTURE_FIELDS:
            a, b = _structure(base.config, name), _structure(model.config, name)
            if a != b:
                problems.append(f"{name}: {_describe(a)} in the base, {_describe(b)} in {label}")
        for name in CONFIG_FIELDS:
            a, b = getattr(base.config, name), getattr(model.config, name)
            if a != b:
                notes.append(f"{name}: {_describe(a)} in the base, {_describe(b)} in {label}")
    if problems:
        raise UserError(f"the models do not share an architecture, so their tensors cannot be merged ({base.path} is "
                        "the base): " + "; ".join(problems))
    return notes


def _numpy_dtype(safetensors_dtype: str, where: str) -> np.dtype:
    names = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
    if safetensors_dtype not in names:
        raise UserError(f"{where} is stored as {safetensors_dtype}; merging reads float32, bfloat16 or float16")
    return np.dtype(names[safetensors_dtype])


def output_dtype(inputs: list[ModelInput], tensors: list[HFTensor]) -> str:
    """The inputs' dtype when they all share one; float32 (exact for all of them) when they differ."""
    seen = {inp.dtype(t) for inp in inputs for t in tensors}
    for dtype in seen:
        if dtype not in DTYPE_NAMES:
            raise UserError(f"a parameter is stored as {dtype}; merging reads float32, bfloat16 or float16")
    return DTYPE_NAMES[seen.pop()] if len(seen) == 1 else "float32"

"""Streaming conversion between Hugging Face safetensors directories and sharded jaxcpt models.

Import never holds two copies of the model on the host: each device's block of each
parameter is built on that device from slices of the safetensors files, one layer's
tensor or one vocabulary block at a time (``jaxcpt.hf.tensor_io``). Export goes the other
way, one layer's tensor or one vocabulary block at a time, gathering across hosts when an
array spans them, appended to the safetensors files as it arrives; only process 0 writes,
into a temporary directory renamed into place at the end, so a crash never leaves a
half-written export behind under the final name. Beyond the model's own arrays, host
memory holds one such slice (docs/real-size.md states the bound).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx

from jaxcpt.errors import HFFormatError, UserError
from jaxcpt.hf import mxfp4
from jaxcpt.hf.families import config_from_hf, config_to_hf, generation_config, tensor_table
from jaxcpt.hf.mapping import Tensor, hf_names
from jaxcpt.hf.tensor_io import SafetensorsReader, ShardStream, block_rows, place  # noqa: F401 (SafetensorsReader: merge)
from jaxcpt.model import expert_lora
from jaxcpt.model import lora as lora_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.layer_groups import base_name  # full_q -> q (Gemma 4's stacks per layer shape)
from jaxcpt.model.transformer import Transformer, abstract_model, variable_shardings
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules

# Files that travel with the weights: the tokenizer, and the source's generation settings
# (sampling defaults, every stop token), which replace the minimal generation_config.json.
COMPANION_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "jaxcpt_adaptation.json",  # what extend-vocab / expand-depth added (jaxcpt.adapt.metadata), kept with the model
)


def copy_companion_files(source: str | os.PathLike, target: str | os.PathLike) -> list[str]:
    """Copy the COMPANION_FILES that ``source`` has into ``target`` (created); returns their names."""
    copied = [name for name in COMPANION_FILES if (Path(source) / name).is_file()]
    if copied:
        Path(target).mkdir(parents=True, exist_ok=True)
    for name in copied:
        shutil.copy2(Path(source) / name, Path(target) / name)
    return copied


NUMPY_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """``ModelConfig`` of an HF checkpoint directory (reads only config.json)."""
    directory = Path(path)
    if not directory.is_dir():
        raise HFFormatError(f"'{directory}' is not a directory; pass a Hugging Face checkpoint directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise HFFormatError(f"'{config_file}' is missing; an HF checkpoint directory needs config.json")
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFFormatError(f"'{config_file}' is not valid JSON: {e}") from None
    return config_from_hf(hf, where=str(config_file))


def _check_shapes(reader: SafetensorsReader, table: list[Tensor], cfg: ModelConfig) -> None:
    for row in table:
        for name in hf_names(row, cfg.num_layers):
            got = reader.shape(name)
            if got != row.hf_shape:
                raise HFFormatError(
                    f"tensor '{name}' in '{reader.where(name)}' has shape {got}, but config.json implies "
                    f"{row.hf_shape}; the weights and config.json do not belong together"
                )


def value_at(tree, path: tuple[str, ...]):
    """The node of a nested state at a tensor row's path, e.g. ('layers', 'q')."""
    for key in path:
        tree = tree[key]
    return tree


def load_hf(
    path: str | os.PathLike,
    mesh: jax.sharding.Mesh | None = None,
    dtype: str | None = None,
    *,
    param_dtype: str = "float32",
    rules=None,
    **model_overrides,
) -> Transformer:
    """Load an HF checkpoint directory of a supported family (``jaxcpt.hf.families``) as a sharded jaxcpt model.

    ``mesh``: where to place parameters (default: all devices on a data-parallel axis).
    ``dtype``: compute dtype (default float32); ``param_dtype``: storage dtype.
    ``model_overrides``: extra ``ModelConfig`` fields (e.g. ``remat='full'``).
    """
    directory = Path(path)
    cfg = read_hf_config(directory)
    import dataclasses

    cfg = dataclasses.replace(cfg, dtype=dtype or "float32", param_dtype=param_dtype, **model_overrides)
    cfg.validate()
    reader = mxfp4.wrap(SafetensorsReader(directory))  # MXFP4-packed experts (gpt-oss) read dequantized
    table = tensor_table(cfg)
    _check_shapes(reader, table, cfg)
    mesh = mesh if mesh is not None else build_mesh()
    rules = rules if rules is not None else make_rules()
    abstract = abstract_model(cfg, rules)
    graphdef, state = nnx.split(abstract)
    shardings = variable_shardings(state, mesh, rules)
    np_dtype = NUMPY_DTYPES[cfg.param_dtype]
    for row in table:
        variable, sharding = value_at(state, row.path), value_at(shardings, row.path)
        shape = variable.get_value().shape
        variable.set_value(place(row, reader, shape, sharding, np_dtype, cfg.num_layers))
    return nnx.merge(graphdef, state)


def _agree(value):
    """Process 0's ``value`` on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return value
    from jaxcpt.sharding.distributed import gather_json

    return gather_json(value)[0]


# The file whose presence says a directory is complete: copied last to remote targets.
_LAST_FILES = ("config.json", "adapter_config.json")


def _upload(local: Path, target: epath.Path) -> None:
    """Copy a finished local export to a remote directory, replacing it; config.json goes last."""
    if target.exists():
        target.rmtree()
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(local.iterdir(), key=lambda p: p.name in _LAST_FILES)
    for file in files:
        epath.Path(file).copy(target / file.name, overwrite=True)
    shutil.rmtree(local)


class StagedExport:
    """An export directory that appears under its name only once it is complete.

    Every process creates one (they agree on whether the target may be written); only process 0
    writes, into ``tmp``: for a local target a temporary sibling renamed into place by
    ``publish``; for a remote (gs://) one a local directory uploaded with config.json last, so a
    directory without config.json is an upload that did not finish.

    Faults it handles:

    * A failed export leaves no ``.NAME.tmp-*`` behind: the staging directory is removed when
      this object is released (a weakref finalizer: when the error that ended the export has been
      handled, at the latest when the process exits), or on leaving ``with StagedExport(...)``.
      One left by a killed process is removed when the next export to the same target starts.
    * ``overwrite`` never deletes the old export before the new one is complete: locally the old
      one is renamed aside (``.NAME.old-*``), the new one renamed in, then the old one deleted; a
      crash between the two renames leaves the old export aside, and the next export of the target
      puts it back first. A remote target gets the new export uploaded beside it first
      (``.NAME.tmp-*``), so a complete copy exists at every moment; only then is the old one replaced.
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool):
        self.remote = "://" in str(path)
        self.out = epath.Path(path) if self.remote else Path(path)
        self.writer = jax.process_index() == 0
        if self.writer and not self.remote:
            self._clean_leftovers()
        # Process 0 looks at the target and every host follows its answer: with per-host disks only
        # one host may see an old export, and a host that raised alone would leave the others
        # blocked in the gathers that follow.
        occupied = _agree(bool(self.out.exists() and any(self.out.iterdir())) if self.writer else None)
        if occupied and not overwrite:
            raise UserError(f"'{self.out}' exists and is not empty; choose another --out or pass overwrite")
        self.occupied = occupied
        self.tmp: Path | None = None
        self._cleanup = None
        if self.writer:
            import weakref

            parent = Path(tempfile.gettempdir()) if self.remote else self.out.parent
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.tmp), True)

    def __enter__(self) -> "StagedExport":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def discard(self) -> None:
        """Remove the staging directory now (after a failure; a no-op once published)."""
        if self._cleanup is not None:
            self._cleanup()

    def _clean_leftovers(self) -> None:
        """Staging directories of this target left by a killed export; an old export set aside by an
        overwrite that died before the new one was renamed in goes back under its name."""
        parent = self.out.parent
        if not parent.is_dir():
            return
        for old in sorted(parent.glob(f".{self.out.name}.old-*")):
            if not self.out.exists():
                os.replace(old, self.out)
                print(f"warning: restored {self.out} from {old.name}, set aside by an overwrite that did not finish",
                      flush=True)
            else:
                shutil.rmtree(old, ignore_errors=True)
        for tmp in parent.glob(f".{self.out.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"removed {tmp}, left by an export of {self.out} that did not finish", flush=True)

    def publish(self, barrier: str) -> Path | None:
        """Move the finished files into place; returns the directory on process 0, None elsewhere."""
        if self.writer:
            if self._cleanup is not None:
                self._cleanup.detach()  # the staged files become the export: nothing to clean up
            if self.remote:
                self._publish_remote()
            else:
                self._publish_local()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(barrier)
        return self.out if self.writer else None

    def _publish_local(self) -> None:
        if not self.out.exists():
            os.replace(self.tmp, self.out)
            return
        aside = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
        os.replace(self.out, aside)  # onto the empty directory mkdtemp made: atomic on POSIX
        try:
            os.replace(self.tmp, self.out)
        except BaseException:
            os.replace(aside, self.out)  # the new one did not go in: the old one stays
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(aside)

    def _publish_remote(self) -> None:
        if not self.occupied:
            _upload(self.tmp, self.out)
            return
        # No atomic rename on object stores: upload the new export complete beside the old one,
        # then replace the old one from it (server-side copies, config.json last).
        staged = self.out.parent / f".{self.out.name}.tmp-{os.path.basename(self.tmp).rsplit('-', 1)[-1]}"
        _upload(self.tmp, staged)
        self.out.rmtree()
        self.out.mkdir(parents=True, exist_ok=True)
        for file in sorted(staged.iterdir(), key=lambda p: p.name in _LAST_FILES):
            file.copy(self.out / file.name, overwrite=True)
        staged.rmtree()


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host, gathering from other hosts' devices when it spans them."""
    if isinstance(x, np.ndarray):
        return x
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def parse_size(size: int | str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not match:
        raise UserError(f"max_shard_size '{size}' is not a size like '5GB' or '500MB'")
    units = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * units[(match.group(2) or "").upper()])


def _export_order(table: list[Tensor], cfg: ModelConfig) -> list[tuple[str, Tensor, int | None]]:
    """Every HF tensor as (name, row, layer), in checkpoint order: unstacked ones first, then layer by layer."""
    table = [row for row in table if not row.parts or row.path == row.parts[0]]  # a fused tensor: written once
    out = [(row.hf_name, row, None) for row in table if not row.stacked]
    for layer in range(cfg.num_layers):  # rows of a hybrid's sub-stacks hold some layers only
        for row in table:
            if not row.stacked or (row.layers is not None and layer not in row.layers):
                continue
            index = layer if row.layers is None else row.layers.index(layer)
            if row.experts:  # one HF tensor per expert: the index is then (stack index, expert)
                out += [(row.hf_name.format(i=layer, j=j), row, (index, j)) for j in range(row.experts)]
            else:
                out.append((row.name_at(index), row, index))
    return out


def _host_slices(state, cfg: ModelConfig, row: Tensor, layer: int | None, dtype: str):
    """The HF tensor of (row, layer) on this host, in pieces: whole, or a vocabulary block at a time.

    Every process takes part in the gathers; the values are complete on process 0.
    """
    if row.join is not None:  # one HF tensor of several parameters' layer slices (mapping.Tensor.parts)
        slices = [to_host(_expert_folded(state, cfg, path, (layer,), dtype)) for path in row.parts]
        yield row.join(*slices)
        return
    value = value_at(state, row.path)[...]
    if row.experts:  # (layer, expert): one expert's slice
        yield row.to_hf(to_host(_expert_folded(state, cfg, row.path, layer, dtype)))
        return
    if row.vocab_axis is None:
        if layer is not None and expert_lora.adapted_by(row.path[-1]):  # a fused expert tensor (gpt-oss down_proj)
            value = _expert_folded(state, cfg, row.path, (layer,), dtype)
        elif layer is not None and not _adapted(cfg, row):  # one program indexes and casts: one buffer
            value = _layer_of(value, layer, dtype=jnp.dtype(dtype))
        else:
            value = _folded(state, cfg, row, layer, value[layer] if layer is not None else value)
        yield row.to_hf(to_host(value.astype(jnp.dtype(dtype))))
        return
    step = block_rows(row, jnp.dtype(dtype).itemsize)
    real = row.hf_shape[0]  # the table's real rows (vocab_size; Gemma 4's per-layer table may have its own)
    for first in range(0, real, step):  # padding rows are not exported
        size = min(step, real - first)
        block = _vocab_block(value, first, size=size, axis=row.vocab_axis, dtype=jnp.dtype(dtype))
        yield row.rows_to_hf(to_host(block))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _layer_of(stack, layer, *, dtype):
    """Layer ``layer`` (traced: one program for every layer) of a stacked parameter, cast."""
    return jax.lax.dynamic_index_in_dim(stack, layer, axis=0, keepdims=False).astype(dtype)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _expert_of(stack, layer, expert, *, dtype):
    """Expert ``expert`` of layer ``layer`` of a stacked [L, X, ...] expert parameter, cast (one program)."""
    one = jax.lax.dynamic_index_in_dim(stack, layer, axis=0, keepdims=False)
    return jax.lax.dynamic_index_in_dim(one, expert, axis=0, keepdims=False).astype(dtype)


@functools.partial(jax.jit, static_argnames=("size", "axis", "dtype"))
def _vocab_block(table, first, *, size: int, axis: int, dtype):
    """Vocabulary entries [first, first + size) of a table, cast; ``first`` is traced, so every
    full-sized block shares one compiled program (a static slice would compile one per block)."""
    return jax.lax.dynamic_slice_in_dim(table, first, size, axis=axis).astype(dtype)


def _expert_folded(state, cfg: ModelConfig, path: tuple[str, ...], index: tuple, dtype: str) -> jax.Array:
    """An expert parameter's slice ``index`` ((layer,) or (layer, expert)), its experts' LoRA update folded in
    (jaxcpt.model.expert_lora; one slice at a time, so no merged copy of the expert stack exists), cast."""
    value = value_at(state, path)[...]
    take = _expert_of if len(index) == 2 else _layer_of
    adapted = expert_lora.adapted_by(path[-1]) if cfg.lora is not None and path[0] == "layers" else None
    if adapted is None or adapted[0] not in cfg.lora.targets:
        return take(value, *index, dtype=jnp.dtype(dtype))
    a, b = (take(value_at(state, ("layers", n))[...], *index, dtype=jnp.float32) for n in expert_lora.adapter_names(adapted[0]))
    w = take(value, *index, dtype=jnp.float32)
    return expert_lora.fold(w, a, b, adapted[1], cfg.lora.scale).astype(jnp.dtype(dtype))


def _adapted(cfg: ModelConfig, row: Tensor) -> bool:
    """Whether the tensor has LoRA adapters (folded in on export)."""
    return (cfg.lora is not None and row.path[0] == "layers" and base_name(row.path[-1]) in cfg.lora.targets
            and expert_lora.adapted_by(row.path[-1]) is None)  # the experts fold in _expert_folded


def _folded(state, cfg: ModelConfig, row: Tensor, layer: int | None, value: jax.Array) -> jax.Array:
    """One layer's projection with its LoRA update folded in (float32); every other tensor as it is."""
    if not _adapted(cfg, row):
        return value
    a, b = (value_at(state, ("layers", name))[...][layer] for name in lora_lib.adapter_names(row.path[-1]))
    return lora_lib.fold(value, a, b, cfg.lora.scale)


def save_hf(
    model: Transformer,
    path: str | os.PathLike,
    dtype: str = "bfloat16",
    *,
    max_shard_size: int | str = "5GB",
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path | None:
    """Write ``model`` as an HF directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    ``path`` is a local directory or a ``gs://`` URL. Every process must call this (arrays
    spanning hosts are gathered collectively); only process 0 writes. ``extra_files``
    ({name: text}) are written beside the weights. A model with LoRA adapters is written merged:
    each target's W + scale * A @ B, formed in float32 one layer at a time, then cast to ``dtype``
    (``jaxcpt.hf.peft_export.save_peft_adapter`` writes the adapters themselves). Returns the directory
    on process 0, None elsewhere.
    """
    if dtype not in NUMPY_DTYPES:
        raise UserError(f"export dtype '{dtype}' is not one of {', '.join(NUMPY_DTYPES)}")
    cfg: ModelConfig = model.config
    hf_config = config_to_hf(cfg, dtype)
    table = tensor_table(cfg)
    order = _export_order(table, cfg)
    staged = StagedExport(path, overwrite)
    writer, tmp = staged.writer, staged.tmp
    state = nnx.state(model)
    stream = ShardStream(tmp, [(name, row.hf_shape) for name, row, _ in order], dtype,
                         parse_size(max_shard_size)) if writer else None
    for name, row, layer in order:  # one tensor, or one vocabulary block, on the host at a time
        for piece in _host_slices(state, cfg, row, layer, dtype):
            if writer:
                stream.append(name, piece)
            del piece
    if writer:
        weight_map, total = stream.finish(), stream.total_bytes
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2))
        if len(stream.files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if tokenizer_dir:
            copy_companion_files(tokenizer_dir, tmp)
        for name, text in (extra_files or {}).items():  # e.g. the run's jaxcpt_adaptation.json
            (tmp / name).write_text(text)
    return staged.publish("jaxcpt.save_hf")

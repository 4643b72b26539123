"""The one way to open a model: an HF directory, a jaxcpt run, RUN/checkpoints or one step.

Every command that reads "a model" (train start-up, evaluate, export-hf, extend-vocab /
expand-depth, merge) goes through here, so one set of rules holds everywhere:

- **where it is**: a directory with ``config.json`` is an HF model; anything else is a jaxcpt
  checkpoint, RUN -> RUN/checkpoints -> its newest complete step, or the step itself;
- **the tokenizer**: an HF directory's own files when it holds any; a checkpoint's
  RUN/tokenizer when present, else the tokenizer copy the checkpoint keeps (``files`` item);
- **the adaptation record**: ``jaxcpt_adaptation.json`` of an HF directory, ``meta.adaptation``
  of a checkpoint;
- **weights**: ``raw``, or ``ema`` (a checkpoint's moving average of the trainable parameters;
  the frozen ones as they are);
- **LoRA**: ``merged`` (adapters folded into their projections, a plain model), ``adapter``
  (kept as they are), ``base`` (dropped: the frozen model they apply to);
- **the adapter's base** (``adapter_base``): ``init.path`` of an HF start while it holds
  config.json, else RUN/hf/base, the frozen base written once beside the run's exports.

It lives beside ``checkpoint.py`` rather than in ``model/`` because it composes the checkpoint
reader, the HF reader and the model; ``model/`` stays the decoder and its pytrees.

``locate_model`` answers the cheap questions (config, tokenizer, adaptation, the step) without
reading a weight; ``open_model`` adds the parameters, abstract or loaded onto a mesh.
"""

from __future__ import annotations

import dataclasses
import os

from etils import epath

from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig

WEIGHTS = ("raw", "ema")
LORA = ("merged", "adapter", "base")
ADAPTATION_FILE = "jaxcpt_adaptation.json"


@dataclasses.dataclass(frozen=True)
class ModelLocation:
    """Where each piece of a model comes from, resolved once; no weights read."""

    path: str  # as given
    kind: str  # "hf" or "checkpoint"
    config: ModelConfig  # as stored (an HF directory's config.json, a checkpoint's meta.model_config)
    tokenizer_dir: str | None  # HF tokenizer files that belong to the model, if any
    adaptation: dict | None  # the extend-vocab / expand-depth record, if any
    step_dir: str | None = None  # the checkpoint step read (None for an HF directory)
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # the step's meta ({} for HF)

    @property
    def run_dir(self) -> str | None:
        """RUN of a checkpoint RUN/checkpoints/STEP (None for an HF directory)."""
        return str(epath.Path(self.step_dir).parent.parent) if self.step_dir else None

    @property
    def sources(self) -> dict[str, str]:
        """Where each piece came from, for messages and the run's start-up description."""
        where = self.step_dir or self.path
        return {"config": f"{where}/config.json" if self.kind == "hf" else f"{where} (meta)",
                "params": where, "tokenizer": self.tokenizer_dir or "(none)",
                "adaptation": (f"{self.path}/{ADAPTATION_FILE}" if self.kind == "hf" else f"{where} (meta)")
                if self.adaptation else "(none)"}


@dataclasses.dataclass(frozen=True)
class OpenedModel:
    """A located model with its parameters (nested dict: arrays on the mesh, or ShapeDtypeStruct when abstract)."""

    location: ModelLocation
    config: ModelConfig  # as opened: the overrides applied, ``lora=None`` once merged or dropped
    params: dict
    weights: str
    lora: str
    rules: object = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def tokenizer_dir(self) -> str | None:
        return self.location.tokenizer_dir

    @property
    def adaptation(self) -> dict | None:
        return self.location.adaptation

    def model(self):
        """The NNX module holding ``params``."""
        from jaxcpt.model.persist import model_from_params

        return model_from_params(self.config, self.params, self.rules)


def is_hf_dir(path) -> bool:
    return (epath.Path(path) / "config.json").exists()


def locate_model(path) -> ModelLocation:
    """Config, tokenizer and adaptation record of the model at ``path``, each resolved once."""
    if not path:
        raise UserError("no model path given; pass an HF directory or a jaxcpt run / checkpoint directory")
    p = epath.Path(path)
    if not p.exists():
        raise UserError(f"'{path}' does not exist; pass an HF directory (with config.json) or a jaxcpt run directory, "
                        "RUN/checkpoints or RUN/checkpoints/STEP")
    if is_hf_dir(p):
        return _locate_hf(path, p)
    return _locate_checkpoint(path, p)


def _locate_hf(path, p: epath.Path) -> ModelLocation:
    from jaxcpt.hf.convert import COMPANION_FILES, read_hf_config

    tokenizer = str(p.resolve()) if "://" not in str(p) else str(p)
    tokenizer = tokenizer if any((p / f).exists() for f in COMPANION_FILES) else None
    from jaxcpt.adapt.metadata import read_adaptation

    return ModelLocation(str(path), "hf", read_hf_config(path), tokenizer, read_adaptation(path))


def _locate_checkpoint(path, p: epath.Path) -> ModelLocation:
    from jaxcpt.checkpoint import read_meta, resolve_step_dir
    from jaxcpt.model.persist import config_from_meta

    step_dir = resolve_step_dir(p / "checkpoints" if (p / "checkpoints").is_dir() else p)
    meta = read_meta(step_dir)
    if "model_config" not in meta:
        raise UserError(f"checkpoint '{step_dir}' records no model config (meta.model_config); it was not written by "
                        "jaxcpt train or import-hf")
    return ModelLocation(str(path), "checkpoint", config_from_meta(meta), checkpoint_tokenizer_dir(step_dir),
                         meta.get("adaptation"), str(step_dir), meta)


def checkpoint_tokenizer_dir(step_dir) -> str | None:
    """The tokenizer rule for a checkpoint RUN/checkpoints/STEP: RUN/tokenizer when present, else the
    copy the checkpoint keeps (its ``files`` item), else None.

    Paths go through ``epath`` only: ``pathlib`` would turn ``gs://bucket/run`` into ``gs:/bucket/run``,
    a local path that does not exist, and the export would silently ship no tokenizer.
    """
    from jaxcpt.checkpoint import stored_export_tokenizer

    step_dir = epath.Path(step_dir)
    run_tokenizer = step_dir.parent.parent / "tokenizer"
    return str(run_tokenizer) if run_tokenizer.is_dir() else stored_export_tokenizer(step_dir)


def open_model(path_or_location, *, weights: str = "raw", lora: str = "merged", mesh=None, rules=None,
               abstract: bool = False, **overrides) -> OpenedModel:
    """The model at ``path_or_location`` (a path, or a ``locate_model`` answer already in hand).

    ``overrides``: ModelConfig fields to replace (numerics such as ``dtype``, ``param_dtype``,
    ``remat``); ``abstract``: ShapeDtypeStruct leaves with their target shardings, nothing read.
    """
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.sharding.rules import make_rules

    if weights not in WEIGHTS:
        raise UserError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if lora not in LORA:
        raise UserError(f"lora must be one of {LORA}, got {lora!r}")
    location = path_or_location if isinstance(path_or_location, ModelLocation) else locate_model(path_or_location)
    if weights == "ema" and location.kind == "hf":
        raise UserError(f"'{location.path}' is a Hugging Face directory, which holds one set of weights; weights=ema "
                        "needs a jaxcpt checkpoint that kept a moving average (ema.decay > 0)")
    mesh = mesh if mesh is not None else build_mesh()
    rules = rules if rules is not None else make_rules()
    cfg = dataclasses.replace(location.config, **overrides)
    if abstract:
        params = abstract_params(cfg, mesh, rules)
    elif location.kind == "hf":
        params = _read_hf(location, overrides, mesh, rules)
    else:
        params = _read_checkpoint(location, cfg, mesh, rules, weights)
    cfg, params = _apply_lora(cfg, params, lora, mesh, rules, abstract)
    return OpenedModel(location, cfg, params, weights, lora, rules)


def _read_hf(location: ModelLocation, overrides: dict, mesh, rules) -> dict:
    from jaxcpt.hf.convert import load_hf
    from jaxcpt.model.persist import params_of

    return params_of(load_hf(location.path, mesh=mesh, rules=rules, **overrides))  # streams tensor by tensor


def _read_checkpoint(location: ModelLocation, cfg: ModelConfig, mesh, rules, weights: str) -> dict:
    from jaxcpt.checkpoint import restore_params
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.train.state import trainable_view, with_trainable

    target = abstract_params(cfg, mesh, rules)
    params = restore_params(location.step_dir, target)
    if weights == "ema":  # the average covers the trainable view; frozen parameters are as they are
        keys = location.meta.get("trainable_keys") or list(_all_paths(target))
        average = restore_params(location.step_dir, trainable_view(target, keys), item="ema")
        params = with_trainable(params, average)
    return params


def _apply_lora(cfg: ModelConfig, params: dict, lora: str, mesh, rules, abstract: bool) -> tuple[ModelConfig, dict]:
    from jaxcpt.model.persist import abstract_params, base_model, merged_model, model_from_params, params_of

    if cfg.lora is None or lora == "adapter":
        return cfg, params
    plain = dataclasses.replace(cfg, lora=None)
    if abstract:
        return plain, abstract_params(plain, mesh, rules)
    model = model_from_params(cfg, params, rules)
    model = merged_model(model) if lora == "merged" else base_model(model)
    return plain, params_of(model)


def _all_paths(tree, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _all_paths(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


# -- the LoRA adapter's base ------------------------------------------------------------------
def adapter_base(init: dict | None, export_root: str) -> tuple[str, bool]:
    """(the directory a PEFT adapter applies to, whether it must still be written there).

    The rule, for the trainer's exports and ``jaxcpt export-hf --lora adapter`` alike: the
    ``init.path`` of an HF start while it holds config.json (the directory the run began from;
    training never changes the frozen base), else ``EXPORT_ROOT/base`` (RUN/hf/base), written once
    from the checkpoint's frozen weights, since a run resumed from its checkpoints alone (the start
    deleted, a fresh TPU VM) or started from a checkpoint has no other base on disk. Raising there
    instead would fail the export of a run whose checkpoint holds everything the base needs.
    """
    init = init or {}
    if init.get("source") == "hf" and init.get("path"):
        path = init["path"] if "://" in init["path"] else os.path.abspath(init["path"])
        if is_hf_dir(path):
            return path, False
    target = f"{export_root.rstrip('/')}/base"
    return target, not is_hf_dir(target)  # the base is frozen: one written earlier is the same model

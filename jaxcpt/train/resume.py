"""What a checkpoint carries so that resuming needs nothing but the checkpoint.

On TPU VMs the run directory is a worker's local disk and may be gone after a
preemption; the model's source directory (``init.path``) may have been deleted or,
worse, replaced by another model with the same shapes. So every checkpoint stores:

- ``meta.model_config``: the resolved architecture. A resume builds the model from it,
  never from ``init.path`` (if ``init.path`` still exists and now describes another model,
  that is a warning, and the checkpoint's model is used).
- ``meta.eval_history``: every evaluation record so far, the step-0 (base model) one
  first, so the forgetting report of a resumed run compares against the true baseline.
- ``files.data_tokenizer``: the tokenizer the data pipeline reads, and
  ``files.export_tokenizer``: the HF tokenizer files every export ships.
- ``data``: every host's data-iterator state (saved by the loop).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from pathlib import Path

from etils import epath

from jaxcpt.checkpoint import decode_files, encode_files
from jaxcpt.config import to_dict
from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.persist import config_from_meta
from jaxcpt.train.config import ADDED_FIELDS, NUMERICS_FIELDS, TrainConfig

log = logging.getLogger("jaxcpt.train")


# -- finding the checkpoint to resume from, without creating anything --------------------
def complete_steps(directory: epath.Path) -> list[int]:
    """Committed steps in a checkpoint directory, oldest first ([] if it does not exist)."""
    import orbax.checkpoint as ocp

    if not directory.exists():
        return []
    return sorted(ocp.step.checkpoint_steps(directory))


def newest_meta(directory: epath.Path) -> tuple[int, dict] | None:
    """(step, meta) of the newest step whose meta item reads; None for a fresh start.

    A damaged state item is detected later, when restoring (``Checkpointer.restore_newest``);
    the model config is the same in every step of a run, so any readable meta will do here.
    """
    import orbax.checkpoint as ocp

    for step in reversed(complete_steps(directory)):
        try:
            return step, ocp.JsonCheckpointHandler().restore(directory / str(step) / "meta")
        except Exception as e:  # noqa: BLE001 - a damaged step: try the one before
            log.warning("cannot read the meta item of checkpoint step %d in %s (%s); trying an older step",
                        step, directory, e)
    if complete_steps(directory):
        raise UserError(f"no checkpoint in '{directory}' has a readable meta item; the checkpoints are damaged")
    return None


# -- the model ------------------------------------------------------------------------
_NOT_ARCHITECTURE = set(NUMERICS_FIELDS + ADDED_FIELDS) | {"bos_token_id", "eos_token_id", "pad_token_id",
                                                            "initializer_range"}


def model_config_from_checkpoint(cfg: TrainConfig, meta: dict) -> ModelConfig:
    """The checkpoint's architecture with this run's numerics (dtype, remat, attention)."""
    saved = config_from_meta(meta)
    if cfg.model.param_dtype != saved.param_dtype:
        raise UserError(
            f"model.param_dtype={cfg.model.param_dtype}, but the checkpoint stores parameters in {saved.param_dtype}; "
            f"resume with model.param_dtype={saved.param_dtype}")
    if cfg.model.lora != saved.lora:
        raise UserError(
            f"model.lora is {to_dict(cfg.model.lora)}, but the checkpoints in this run have {to_dict(saved.lora)}; "
            "resume with the run's own model.lora, or start a new run directory (init.source=checkpoint starts from "
            "this run's model, its adapters merged)")
    numerics = {name: getattr(cfg.model, name) for name in NUMERICS_FIELDS}
    model_cfg = dataclasses.replace(saved, **numerics)
    _warn_if_source_changed(cfg, model_cfg)
    return model_cfg


def _warn_if_source_changed(cfg: TrainConfig, saved: ModelConfig) -> None:
    if cfg.init.source != "hf" or not cfg.init.path or not Path(cfg.init.path, "config.json").is_file():
        return
    from jaxcpt.hf.convert import read_hf_config

    try:
        now = to_dict(read_hf_config(cfg.init.path))
    except UserError as e:
        log.warning("init.path '%s' no longer reads as a model (%s); resuming from the checkpoint's model", cfg.init.path, e)
        return
    then = to_dict(saved)
    changed = sorted(k for k in then if k not in _NOT_ARCHITECTURE and k in now and now[k] != then[k])
    if changed:
        shown = ", ".join(f"{k}: checkpoint {then[k]!r}, init.path {now[k]!r}" for k in changed[:4])
        log.warning("init.path '%s' now describes a different model than the checkpoint (%s); resuming with the "
                    "checkpoint's model", cfg.init.path, shown)
        print(f"warning: init.path {cfg.init.path} differs from the checkpoint's model ({shown}); using the "
              "checkpoint's", flush=True)


# -- the tokenizer ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    """Where this run reads its tokenizer (``data``: a .model file or an HF directory, '' when
    every source is pre-tokenized) and which HF tokenizer directory its exports ship (``export``)."""

    data: str
    export: str | None


def tokenizer_files_for_start(cfg: TrainConfig, init_tokenizer_dir: str | None) -> TokenizerFiles:
    """A fresh run: data.tokenizer, else the init source's own tokenizer."""
    data = cfg.data.tokenizer or (cfg.init.path if cfg.init.source == "hf" else "") or (init_tokenizer_dir or "")
    if data:  # exports ship the tokenizer the model was trained with (a .model file is converted)
        return TokenizerFiles(data=data, export=data if Path(data).is_dir() else None)
    return TokenizerFiles(data="", export=init_tokenizer_dir)  # pre-tokenized data: the model's own


def tokenizer_files_for_resume(cfg: TrainConfig, stored: dict, scratch_dir: str | None = None) -> TokenizerFiles:
    """A resume: the configured tokenizer if it exists, else the checkpoint's copy.

    The checkpoint's copy is written to ``scratch_dir`` (a fresh temporary directory per
    process by default: on several hosts a shared run directory must not be written by all).
    """
    stored_data = stored.get("data_tokenizer")
    configured = cfg.data.tokenizer or (cfg.init.path if cfg.init.source == "hf" else "")
    scratch = Path(scratch_dir or tempfile.mkdtemp(prefix="jaxcpt-tokenizer-"))
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        data = cfg.data.tokenizer
    elif stored_data:
        data = str(_materialize(stored_data, scratch / "data"))
        if configured:
            print(f"tokenizer {configured} is gone; using the copy stored in the checkpoint", flush=True)
    elif configured and Path(configured).exists():
        data = configured
    elif configured:
        raise UserError(f"the tokenizer '{configured}' does not exist and the checkpoint holds no copy of it "
                        "(it was written by an older jaxcpt); set data.tokenizer to the run's tokenizer")
    else:
        data = ""
    export = None
    if stored.get("export_tokenizer"):
        export = str(decode_files(stored["export_tokenizer"], scratch / "export"))
    return TokenizerFiles(data=data, export=export)


def _materialize(stored: dict, directory: Path) -> Path:
    """A stored data tokenizer as a file (sentencepiece) or a directory (HF) under ``directory``."""
    if stored["kind"] == "file":
        decode_files(stored["files"], directory)
        return directory / stored["name"]
    return Path(str(decode_files(stored["files"], directory / stored["name"])))


def encode_tokenizers(files: TokenizerFiles) -> dict:
    """The ``files`` checkpoint item for ``files``: both tokenizers, as base64 file contents."""
    from jaxcpt.hf.convert import COMPANION_FILES

    out: dict = {}
    if files.data:
        path = Path(files.data)
        if path.is_file():
            out["data_tokenizer"] = {"kind": "file", "name": path.name, "files": encode_files({path.name: path})}
        else:
            names = sorted(p.name for p in path.iterdir() if p.is_file() and (p.name in COMPANION_FILES or "token" in p.name))
            out["data_tokenizer"] = {"kind": "dir", "name": path.name or "tokenizer",
                                     "files": encode_files({n: path / n for n in names})}
    if files.export and Path(files.export).is_dir():
        export = Path(files.export)
        out["export_tokenizer"] = encode_files({p.name: p for p in sorted(export.iterdir()) if p.is_file()})
    return out


def ship_export_tokenizer(files: TokenizerFiles, run_dir: epath.Path) -> str | None:
    """RUN/tokenizer, the HF tokenizer directory exports copy; made once from ``files``."""
    from jaxcpt.hf.convert import copy_companion_files
    from jaxcpt.hf.tokenizer import sentencepiece_to_hf

    target = run_dir / "tokenizer"
    if not target.exists():
        if files.export:
            copy_companion_files(files.export, str(target))
        elif files.data and Path(files.data).is_file():
            sentencepiece_to_hf(files.data, str(target))
    return str(target) if target.exists() else None


def hf_tokenizer_dir(files: TokenizerFiles) -> str | None:
    """An HF tokenizer directory for this process (the downstream harness reads one on every host):
    the export tokenizer, else a conversion of a sentencepiece data tokenizer into a temporary dir."""
    if files.export and Path(files.export).is_dir():
        return files.export
    if files.data and Path(files.data).is_file():
        from jaxcpt.hf.tokenizer import sentencepiece_to_hf

        return str(sentencepiece_to_hf(files.data, tempfile.mkdtemp(prefix="jaxcpt-hf-tokenizer-")))
    if files.data and Path(files.data).is_dir():
        return files.data
    return None


# -- evaluation history -----------------------------------------------------------------
def restore_eval_history(run_dir: epath.Path, history: list[dict]) -> None:
    """Put the checkpoint's evaluation records (held-out and downstream) back into RUN/metrics.jsonl
    where they are missing.

    Records already there (by kind and step) are kept; the others, the step-0 baseline among
    them, are written first, so the report of a run resumed into an empty directory is complete.
    """
    from jaxcpt.train.metrics import read_metrics_file, write_metrics_file

    path = run_dir / "metrics.jsonl"
    records = read_metrics_file(path)  # a torn last line is skipped with a warning
    present = {(r.get("kind"), r["step"]) for r in records}
    missing = [r for r in history if (r.get("kind"), r["step"]) not in present]
    if missing:
        write_metrics_file(path, missing + records)  # replaced whole: a crash here loses nothing

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
  ``files.export_tokenizer``: the HF tokenizer files every export ships; both as digests of
  copies kept once per run beside the steps (``jaxcpt.checkpoint_files``), tokenizer files only.
- ``data``: every host's data-iterator state (saved by the loop).

Which step a resume starts from is decided once, at start-up (``checkpoint.find_resume_point``:
the newest step whose data, meta and files items read on every host); its meta gives the model
config and the adaptation record, its files item the tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from etils import epath

from jaxcpt import checkpoint_files as files_lib
from jaxcpt.config import to_dict
from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.moe import BALANCING_FIELDS
from jaxcpt.model.persist import config_from_meta
from jaxcpt.train.config import ADDED_FIELDS, NUMERICS_FIELDS, TrainConfig

log = logging.getLogger("jaxcpt.train")


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
        from jaxcpt.model.rope_change import apply_rope_change

        now = to_dict(apply_rope_change(read_hf_config(cfg.init.path), cfg.model.rope))  # as the run started
    except UserError as e:
        log.warning("init.path '%s' no longer reads as a model (%s); resuming from the checkpoint's model", cfg.init.path, e)
        return
    then = to_dict(saved)
    for side in (now, then):  # the run's load-balancing choices are not the source's architecture
        if isinstance(side.get("moe"), dict):
            side["moe"] = {k: v for k, v in side["moe"].items() if k not in BALANCING_FIELDS}
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
    every source is pre-tokenized) and which HF tokenizer directory its exports ship (``export``).

    ``scratch``: the run's temporary directories (a tokenizer copied from a remote or old
    checkpoint, a converted one), removed when the run closes."""

    data: str
    export: str | None
    scratch: files_lib.ScratchDirs = dataclasses.field(default_factory=files_lib.ScratchDirs, compare=False,
                                                       repr=False)


def tokenizer_files_for_start(cfg: TrainConfig, init_tokenizer_dir: str | None,
                              scratch: files_lib.ScratchDirs | None = None) -> TokenizerFiles:
    """A fresh run: data.tokenizer, else the init source's own tokenizer."""
    scratch = scratch or files_lib.ScratchDirs()
    data = cfg.data.tokenizer or (cfg.init.path if cfg.init.source == "hf" else "") or (init_tokenizer_dir or "")
    if data:  # exports ship the tokenizer the model was trained with (a .model file is converted)
        return TokenizerFiles(data=data, export=data if Path(data).is_dir() else None, scratch=scratch)
    return TokenizerFiles(data="", export=init_tokenizer_dir, scratch=scratch)  # pre-tokenized data: the model's own


def tokenizer_files_for_resume(cfg: TrainConfig, stored: dict, checkpoint_dir: epath.Path,
                               scratch: files_lib.ScratchDirs | None = None) -> TokenizerFiles:
    """A resume: the configured tokenizer if it exists, else the checkpoint's copy.

    ``stored``: the resumed step's files item (already checked by ``find_resume_point``). A copy
    kept in a local checkpoint directory is read in place; one in a bucket, or in a checkpoint
    written before copies were kept once (base64 in the item), goes to a scratch directory per
    process (on several hosts a shared run directory must not be written by all).
    """
    scratch = scratch or files_lib.ScratchDirs()
    configured = cfg.data.tokenizer or (cfg.init.path if cfg.init.source == "hf" else "")
    current = stored.get("format") == files_lib.FILES_FORMAT

    def stored_copy(ref: dict, kind: str) -> Path:
        try:
            if current:
                return Path(str(files_lib.bundle_dir(checkpoint_dir, ref, scratch)))
            if kind == "export":  # the old export copy held the whole source directory: tokenizer files only
                return Path(str(files_lib.decode_legacy(ref, scratch.make(), only_tokenizer_files=True)))
            return Path(str(files_lib.decode_legacy(ref["files"], scratch.make(), only_tokenizer_files=False)))
        except files_lib.DamagedStoreError as e:
            raise UserError(f"the tokenizer copy kept with the checkpoints cannot be used: {e}. Set data.tokenizer to "
                            "the run's tokenizer (the same files) to resume") from None

    stored_data = stored.get("data_tokenizer")
    if cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        data = cfg.data.tokenizer
    elif stored_data:
        directory = stored_copy(stored_data, "data")
        data = str(directory / stored_data["name"] if stored_data["kind"] == "file" else directory)
        if configured:
            print(f"tokenizer {configured} is gone; using the copy stored with the checkpoints", flush=True)
    elif configured and Path(configured).exists():
        data = configured
    elif configured:
        raise UserError(f"the tokenizer '{configured}' does not exist and the checkpoint holds no copy of it "
                        "(it was written by an older jaxcpt); set data.tokenizer to the run's tokenizer")
    else:
        data = ""
    export = str(stored_copy(stored["export_tokenizer"], "export")) if stored.get("export_tokenizer") else None
    return TokenizerFiles(data=data, export=export, scratch=scratch)


def encode_tokenizers(files: TokenizerFiles) -> files_lib.FilesItem:
    """The ``files`` checkpoint item for ``files``: digests of both tokenizers' files, and the
    bundles to keep once beside the steps. Tokenizer files only (``TOKENIZER_FILES``): the
    directory of an HF start is the model's, weights included."""
    item: dict = {"format": files_lib.FILES_FORMAT}
    bundles = []
    if files.data:
        path = Path(files.data)
        if path.is_file():
            bundle = files_lib.bundle_of({path.name: path})
            item["data_tokenizer"] = {"kind": "file", "name": path.name, **bundle.reference()}
        else:
            names = files_lib.tokenizer_file_names(path)
            _warn_unstored(path, names)
            bundle = files_lib.bundle_of({n: path / n for n in names})
            item["data_tokenizer"] = {"kind": "dir", "name": path.name or "tokenizer", **bundle.reference()}
        bundles.append(bundle)
    if files.export and Path(files.export).is_dir():
        export = Path(files.export)
        bundle = files_lib.bundle_of({n: export / n for n in files_lib.tokenizer_file_names(export)})
        item["export_tokenizer"] = bundle.reference()
        bundles.append(bundle)
    return files_lib.FilesItem(item, bundles)


def _warn_unstored(directory: Path, stored: list[str]) -> None:
    """Files that look like the tokenizer's but are not TOKENIZER_FILES are not kept: say so, since a
    resume from the checkpoint alone would then read a tokenizer without them."""
    looks = [p.name for p in directory.iterdir()
             if p.is_file() and p.name not in stored and ("token" in p.name or p.name.startswith(("vocab", "merges")))]
    if looks:
        log.warning("tokenizer files %s in %s are not kept with the checkpoints (only %s are); a resume whose "
                    "tokenizer directory is gone reads the tokenizer without them", sorted(looks), directory,
                    ", ".join(files_lib.TOKENIZER_FILES))


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
    the export tokenizer, else a conversion of a sentencepiece data tokenizer into a scratch dir."""
    if files.export and Path(files.export).is_dir():
        return files.export
    if files.data and Path(files.data).is_file():
        from jaxcpt.hf.tokenizer import sentencepiece_to_hf

        return str(sentencepiece_to_hf(files.data, files.scratch.make()))
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

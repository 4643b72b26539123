"""A run's Hugging Face exports (``export.*``): RUN/hf/step_N, and for a LoRA run its PEFT adapter.

Every process calls these (arrays spanning hosts are gathered collectively); process 0 writes.

A LoRA run (``model.lora``) exports, following ``export.lora``:

    merged    RUN/hf/step_N            a plain HF directory: each adapter folded into its projection
    adapter   RUN/hf/step_N-adapter    a PEFT directory (adapter_config.json, adapter_model.safetensors)
    both      the two

A PEFT adapter names the model it applies to (``base_model_name_or_path``): the ``init.path``
of an HF start (the directory the run began from, unchanged by training) while it exists, else
RUN/hf/base, the run's frozen base written once beside the step exports.
"""

from __future__ import annotations

import json
import logging
import os
import re

from jaxcpt.model.lora import is_adapter
from jaxcpt.sharding.distributed import gather_json, is_writer
from jaxcpt.train import state as train_state

log = logging.getLogger("jaxcpt.train")


def export(run, step: int) -> list[str]:
    """Write step ``step``'s exports; returns their paths (recorded in ``run.exports``)."""
    from jaxcpt.hf.convert import save_hf

    setup, cfg = run.setup, run.setup.cfg
    root = (cfg.export.directory or str(setup.run_dir / "hf")).rstrip("/")
    weights = run.state["params"]
    if cfg.export.weights == "ema":  # the average of the trainable parameters; frozen ones are as they are
        weights = train_state.with_trainable(weights, run.state["ema"])
    model = train_state.model_of(setup.program.graphdef, weights)
    common = dict(tokenizer_dir=run.export_tokenizer, overwrite=True, extra_files=adaptation_file(setup.adaptation))
    lora = model.config.lora is not None
    written = []
    if not lora or cfg.export.lora in ("merged", "both"):
        target = f"{root}/step_{step}"
        save_hf(model, target, dtype=cfg.export.dtype, max_shard_size=cfg.export.max_shard_size, **common)
        written.append(target)
    if lora and cfg.export.lora in ("adapter", "both"):
        from jaxcpt.hf.peft_export import save_peft_adapter

        target = f"{root}/step_{step}-adapter"
        trained = tuple(key for key in setup.program.trainable.keys if not is_adapter(key))  # modules_to_save
        save_peft_adapter(model, target, base_model_name_or_path=_adapter_base(run, model, root, common),
                          trained=trained, dtype=cfg.export.dtype, overwrite=True,
                          tokenizer_dir=run.export_tokenizer)
        written.append(target)
    if cfg.export.keep_last and is_writer():
        prune_exports(root, cfg.export.keep_last)
    return written


_STEP_EXPORT = re.compile(r"step_(\d+)(-adapter)?")


def prune_exports(root: str, keep_last: int) -> list[str]:
    """Remove all but the newest ``keep_last`` steps' exports (step_N and step_N-adapter) under ``root``.

    Only directories named like a step export are touched: RUN/hf/base (a LoRA adapter's base)
    and anything else a user put there stay. Returns the removed paths.
    """
    from etils import epath

    directory = epath.Path(root)
    exports: dict[int, list] = {}
    for path in directory.iterdir() if directory.exists() else []:
        match = _STEP_EXPORT.fullmatch(path.name)
        if match and path.is_dir():
            exports.setdefault(int(match.group(1)), []).append(path)
    removed = []
    for step in sorted(exports)[:-keep_last]:
        for path in exports[step]:
            path.rmtree()
            removed.append(str(path))
            log.info("removed the export %s (export.keep_last=%d)", path, keep_last)
    return removed


def _adapter_base(run, model, root: str, common: dict) -> str:
    """The directory a PEFT export's adapters apply to: init.path of an HF start, else RUN/hf/base."""
    cfg = run.setup.cfg
    # Process 0 looks and every host follows (exports are collective).
    if cfg.init.source == "hf":
        path = cfg.init.path if "://" in cfg.init.path else os.path.abspath(cfg.init.path)
        if gather_json(_has_config(path) if is_writer() else None)[0]:
            return path
        # A resume from the checkpoint alone: the directory the run started from is gone, so the
        # adapter gets a base written beside it (the same frozen weights).
        log.warning("init.path %s is gone; the adapter export's base is %s/base instead", path, root)
    target = f"{root}/base"
    # The base is frozen, so one written by an earlier attempt of this run is the same model.
    present = gather_json(_has_config(target) if is_writer() else None)[0]
    if not present:
        from jaxcpt.hf.convert import save_hf
        from jaxcpt.model.persist import base_model

        save_hf(base_model(model), target, dtype=cfg.export.dtype, max_shard_size=cfg.export.max_shard_size, **common)
    return target


def _has_config(directory: str) -> bool:
    from etils import epath

    return (epath.Path(directory) / "config.json").exists()


def adaptation_file(adaptation: dict | None) -> dict[str, str] | None:
    """The starting model's adaptation record, shipped with every export (it describes the same shapes)."""
    return {"jaxcpt_adaptation.json": json.dumps(adaptation, indent=2) + "\n"} if adaptation else None

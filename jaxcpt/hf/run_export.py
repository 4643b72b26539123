"""A run's Hugging Face exports (``export.*``): RUN/hf/step_N, and for a LoRA run its PEFT adapter.

Every process calls these (arrays spanning hosts are gathered collectively); process 0 writes.
They take the model and the settings as arguments (the trainer passes its current weights;
nothing here reads the run's mutable state).

A LoRA run (``model.lora``) exports, following ``export.lora``:

    merged    RUN/hf/step_N            a plain HF directory: each adapter folded into its projection
    adapter   RUN/hf/step_N-adapter    a PEFT directory (adapter_config.json, adapter_model.safetensors)
    both      the two

A PEFT adapter names the model it applies to (``base_model_name_or_path``) by the one rule of
``jaxcpt.open_model.adapter_base``: the ``init.path`` of an HF start while it holds config.json,
else RUN/hf/base, the run's frozen base written once beside the step exports. ``jaxcpt export-hf
--lora adapter`` follows the same rule.
"""

from __future__ import annotations

import json
import logging
import re

from jaxcpt.model.lora import is_adapter
from jaxcpt.sharding.distributed import gather_json, is_writer

log = logging.getLogger("jaxcpt.train")


def export_step(model, step: int, *, export_cfg, root: str, tokenizer_dir: str | None, adaptation: dict | None,
                trained: tuple[str, ...], init: dict | None) -> list[str]:
    """Write step ``step``'s exports of ``model`` (the weights to export, EMA already applied) under
    ``root`` following ``export_cfg`` (``ExportConfig``); returns their paths.

    ``trained``: the parameter paths the run trains (those besides adapters are peft's
    modules_to_save); ``init``: the run's ``init`` settings as a dict (the adapter's base rule).
    """
    from jaxcpt.hf.convert import save_hf

    root = root.rstrip("/")
    lora = model.config.lora is not None
    written = []
    if not lora or export_cfg.lora in ("merged", "both"):
        target = f"{root}/step_{step}"
        save_hf(model, target, dtype=export_cfg.dtype, max_shard_size=export_cfg.max_shard_size,
                tokenizer_dir=tokenizer_dir, overwrite=True, extra_files=adaptation_file(adaptation))
        written.append(target)
    if lora and export_cfg.lora in ("adapter", "both"):
        from jaxcpt.hf.peft_export import save_peft_adapter

        base, write_base = _decided_by_writer(init, root)
        if write_base:
            write_adapter_base(model, base, dtype=export_cfg.dtype,
                               max_shard_size=export_cfg.max_shard_size, tokenizer_dir=tokenizer_dir,
                               adaptation=adaptation)
        target = f"{root}/step_{step}-adapter"
        save_peft_adapter(model, target, base_model_name_or_path=base,
                          trained=tuple(key for key in trained if not is_adapter(key)), dtype=export_cfg.dtype,
                          overwrite=True, tokenizer_dir=tokenizer_dir)
        written.append(target)
    if export_cfg.keep_last and is_writer():
        prune_exports(root, export_cfg.keep_last)
    return written


def write_adapter_base(model, target: str, *, dtype: str, max_shard_size, tokenizer_dir: str | None,
                       adaptation: dict | None) -> None:
    """RUN/hf/base: the model without its adapters (frozen, so written once per run)."""
    from jaxcpt.hf.convert import save_hf
    from jaxcpt.model.persist import base_model

    log.warning("the adapter export's base is %s (init.path is gone, or the run did not start from an HF "
                "directory)", target)
    save_hf(base_model(model), target, dtype=dtype, max_shard_size=max_shard_size, tokenizer_dir=tokenizer_dir,
            overwrite=True, extra_files=adaptation_file(adaptation))


def adapter_base_dir(location) -> tuple[str, bool]:
    """(the adapter's base, whether to write it) for a checkpoint opened by ``jaxcpt.open_model``:
    the rule of ``adapter_base`` with the run's own init settings and export directory."""
    run_config = location.meta.get("run_config") or {}
    root = (run_config.get("export") or {}).get("directory") or (f"{location.run_dir}/hf" if location.run_dir else None)
    if root is None:
        from jaxcpt.errors import UserError

        raise UserError(f"'{location.path}' is an HF directory, not a LoRA checkpoint; --lora adapter needs a run")
    return _decided_by_writer(run_config.get("init"), root)


def _decided_by_writer(init: dict | None, root: str) -> tuple[str, bool]:
    """Process 0 looks at the file system and every host follows (exports are collective)."""
    from jaxcpt.open_model import adapter_base

    return tuple(gather_json(list(adapter_base(init, root)) if is_writer() else None)[0])


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


def adaptation_file(adaptation: dict | None) -> dict[str, str] | None:
    """The starting model's adaptation record, shipped with every export (it describes the same shapes)."""
    return {"jaxcpt_adaptation.json": json.dumps(adaptation, indent=2) + "\n"} if adaptation else None

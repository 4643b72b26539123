"""``jaxcpt_adaptation.json``: what an adaptation step added to a model, written beside its weights.

Every directory that ``jaxcpt extend-vocab`` or ``jaxcpt expand-depth`` writes holds this
file. Training selectors such as "only the new embedding rows" or "only the new blocks"
read it, so it always describes the directory it sits in, after all the steps that led
there (a step applied to an already adapted model carries the earlier steps forward)::

    {
      "format": "jaxcpt-adaptation-v1",
      "base": "/models/Llama-3.2-1B",          # the original model of the first step
      "vocab_size": 130000,                     # of this directory's model
      "num_layers": 20,
      "new_token_ids": [128256, 130000],        # [start, end): rows/columns added to embedding and lm_head;
                                                # null when the vocabulary was never extended
      "inserted_layers": [4, 9, 14, 19],        # indices (in this model) of blocks added by expand-depth;
                                                # [] when none
      "history": [                              # one entry per step, oldest first
        {"operation": "extend-vocab", "source": "/models/Llama-3.2-1B", "method": "subword-mean",
         "new_token_ids": [128256, 130000], ...},
        {"operation": "expand-depth", "source": "runs/ext", "method": "zero",
         "inserted_layers": [4, 9, 14, 19], "copied_from": [3, 7, 11, 15], ...}
      ]
    }

``history`` entries keep the indices as they were right after their own step; the top-level
``new_token_ids`` and ``inserted_layers`` are kept current (inserting blocks renumbers the
blocks inserted earlier; extending the vocabulary twice widens one contiguous id range).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxcpt.errors import UserError

FILENAME = "jaxcpt_adaptation.json"
FORMAT = "jaxcpt-adaptation-v1"


def read_adaptation(directory: str | os.PathLike | None) -> dict | None:
    """The adaptation record of a model directory, or None when it has none."""
    if directory is None:
        return None
    path = Path(directory) / FILENAME
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e}); delete it or restore it from the step that wrote it") from None
    if record.get("format") != FORMAT:
        raise UserError(f"'{path}' has format {record.get('format')!r}, expected {FORMAT!r}")
    return record


def _fresh(source: str, vocab_size: int, num_layers: int) -> dict:
    return {"format": FORMAT, "base": source, "vocab_size": vocab_size, "num_layers": num_layers,
            "new_token_ids": None, "inserted_layers": [], "history": []}


def record_vocab_extension(previous: dict | None, *, source: str, old_vocab_size: int, new_vocab_size: int,
                           num_layers: int, details: dict) -> dict:
    """The record after adding ids [old_vocab_size, new_vocab_size)."""
    record = dict(previous) if previous else _fresh(source, old_vocab_size, num_layers)
    start = record["new_token_ids"][0] if record.get("new_token_ids") else old_vocab_size
    record.update(vocab_size=new_vocab_size, num_layers=num_layers, new_token_ids=[start, new_vocab_size])
    step = {"operation": "extend-vocab", "source": source, "new_token_ids": [old_vocab_size, new_vocab_size],
            **details}
    record["history"] = list(record.get("history", [])) + [step]
    return record


def record_depth_expansion(previous: dict | None, *, source: str, vocab_size: int, old_num_layers: int,
                           new_num_layers: int, inserted: list[int], copied_from: list[int], details: dict) -> dict:
    """The record after inserting blocks at (new) indices ``inserted``, copies of old blocks ``copied_from``."""
    record = dict(previous) if previous else _fresh(source, vocab_size, old_num_layers)
    renumbered = [_new_index(i, inserted) for i in record.get("inserted_layers", [])]
    record.update(vocab_size=vocab_size, num_layers=new_num_layers, inserted_layers=sorted(renumbered + inserted))
    step = {"operation": "expand-depth", "source": source, "inserted_layers": inserted, "copied_from": copied_from,
            "num_layers": [old_num_layers, new_num_layers], **details}
    record["history"] = list(record.get("history", [])) + [step]
    return record


def _new_index(old_index: int, inserted: list[int]) -> int:
    """Where an old block ends up once blocks are inserted at new indices ``inserted`` (sorted)."""
    index = old_index
    for position in inserted:
        if position <= index:
            index += 1
    return index


def write_adaptation(directory: str | os.PathLike, record: dict) -> Path:
    path = Path(directory) / FILENAME
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path

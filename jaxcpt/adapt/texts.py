"""Document texts of configured data sources, for training a tokenizer and measuring compression.

Everything is read through ``jaxcpt.data`` (file discovery, every input format, bad-input
counting, and the same held-out split as training), so a tokenizer is trained on exactly
the documents a run trains on and measured on the documents it evaluates on.

    sources = sources_from_args(config="run.yaml", names=["medical"], paths=[])
    for text in source_texts(sources[0], split="train", budget=Budget(documents=100_000)):
        ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from jaxcpt.config import ConfigError, from_dict, read_yaml
from jaxcpt.data.config import DataConfig, SourceConfig
from jaxcpt.data.documents import BadInputCounter, DocumentDataset, EpochEnd, first_document_hashes
from jaxcpt.data.sources import list_units, resolve_files
from jaxcpt.errors import UserError


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much of a source to read: at most ``documents`` documents and ``bytes`` UTF-8 bytes (0 = no limit)."""

    documents: int = 0
    bytes: int = 0

    def allows(self, documents: int, nbytes: int) -> bool:
        return (not self.documents or documents < self.documents) and (not self.bytes or nbytes < self.bytes)


def sources_from_args(config: str | None, names: list[str], paths: list[str], *, text_field: str = "text",
                      text_split: str = "per_file") -> list[SourceConfig]:
    """The sources named ``names`` of ``config``'s ``data.sources`` (all when none are named), or one
    source 'input' over ``paths``."""
    if config:
        raw = read_yaml(config)
        data = from_dict(DataConfig, raw.get("data", raw), prefix="data")
        by_name = {s.name: s for s in data.sources}
        if not by_name:
            raise ConfigError(f"{config} has no data.sources")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ConfigError(f"no source '{unknown[0]}' in {config}; sources: {sorted(by_name)}")
        chosen = [by_name[n] for n in names] if names else list(by_name.values())
        return chosen + ([_input_source(paths, text_field, text_split)] if paths else [])
    if not paths:
        raise UserError("give input files or patterns, or --config (and --source NAME to pick sources)")
    return [_input_source(paths, text_field, text_split)]


def _input_source(paths: list[str], text_field: str, text_split: str) -> SourceConfig:
    return from_dict(SourceConfig, {"name": "input", "paths": list(paths), "text_field": text_field,
                                    "text_split": text_split})


def source_texts(src: SourceConfig, *, split: str = "train", budget: Budget = Budget(), seed: int = 0,
                 shuffle_files: bool = True) -> Iterator[str]:
    """The texts of ``src``'s ``split`` ('train' skips held-out documents, 'eval' keeps only them), within
    ``budget``. Files are visited in an order shuffled by ``seed``, so a budget samples across files."""
    units = list_units(resolve_files(src.paths, src.name), src.format, src.text_field, src.name)
    if any(u.fmt == "tokenized" for u in units):
        raise UserError(f"source '{src.name}' is pre-tokenized; point it at the text it was tokenized from")
    counter = BadInputCounter(src.name, fatal=False, max_fraction=1.0, min_records=0, warn_seconds=60.0)
    eval_hashes = None
    if src.eval_documents:
        eval_hashes = frozenset(first_document_hashes(source=src.name, units=units, text_field=src.text_field,
                                                      text_split=src.text_split, count=src.eval_documents,
                                                      counter=counter))
    docs = DocumentDataset(source=src.name, units=units, text_field=src.text_field, text_split=src.text_split,
                           split=split, eval_fraction=src.eval_fraction, eval_hashes=eval_hashes, counter=counter,
                           repeat=False, seed=seed, shuffle_units=shuffle_files)
    count = nbytes = 0
    for doc in docs:
        if isinstance(doc, EpochEnd):
            continue
        if not budget.allows(count, nbytes):
            return
        count += 1
        nbytes += len(doc.encode("utf-8"))
        yield doc


def measurement_split(src: SourceConfig) -> str:
    """'eval' when the source holds documents out (the text a run evaluates on), else 'train'."""
    return "eval" if src.has_eval_split else "train"

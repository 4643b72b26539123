"""How many tokens one epoch of a source trains on: exact for token shards, sampled for text.

The unit is the trainer's: next-token positions of the training split, so a document of
``n`` tokens counts ``n + BOS + EOS - 1`` (``jaxcpt.data.packing.document_pieces``) and
held-out documents are left out.

- Pre-tokenized shards (``jaxcpt tokenize``) store every document's length and text hash,
  so the count, held-out split included, is exact.
- Text sources are sampled: the first documents of up to ``_SAMPLE_FILES`` files spread over
  the source are tokenized, and tokens per byte times the source's bytes (decompressed size
  of compressed files estimated from their first few MiB) gives the estimate. Parquet's
  metadata gives the exact document count, so there tokens per document are sampled instead.
- A source whose files or tokenizer cannot be read is *unknown*, with the reason; the plan
  still shows how many tokens it would draw from it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Callable

import numpy as np

from jaxcpt.data.config import DataConfig, SourceConfig
from jaxcpt.data.sources import (
    list_units,
    parse_record,
    read_tokenized_meta,
    read_unit,
    resolve_files,
)
from jaxcpt.errors import UserError

_SAMPLE_FILES = 32
_PREFIX_BYTES = 4 << 20  # compressed bytes read to estimate a compressed file's ratio


@dataclasses.dataclass(frozen=True)
class SourceCount:
    """One epoch of a source's training split (``positions`` None: unknown, ``how`` says why)."""

    name: str
    positions: float | None
    documents: float | None
    exact: bool
    how: str
    piece_lengths: np.ndarray | None = None  # [pieces] positions per packed piece, from the sample

    @property
    def known(self) -> bool:
        return self.positions is not None


def _pieces(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """[documents] positions -> [pieces] positions after splitting at seq_len (as document_pieces does)."""
    full = lengths // seq_len
    rest = lengths % seq_len
    return np.concatenate([np.full(int(full.sum()), seq_len), rest[rest > 0]]).astype(np.int64)


def count_source(src: SourceConfig, cfg: DataConfig, get_tokenizer: Callable[[], object], *, seq_len: int,
                 sample_documents: int = 2000) -> SourceCount:
    """Count (or estimate) one source; never raises for missing data, it reports it.

    ``get_tokenizer()`` returns the tokenizer, or the exception that says why there is none;
    it is called only for text sources.
    """
    try:
        files = resolve_files(src.paths, src.name, src.format)  # the same files the pipeline reads
        units = list_units(files, src.format, src.text_field, src.name)
    except (UserError, OSError) as e:
        return SourceCount(src.name, None, None, False, f"unknown: {e}")
    if units and all(u.fmt == "tokenized" for u in units):
        return _count_tokenized(src, cfg, files, seq_len)
    if any(u.fmt == "tokenized" for u in units):
        return SourceCount(src.name, None, None, False, "unknown: the source mixes token shards and text files")
    tokenizer = get_tokenizer()
    if isinstance(tokenizer, Exception):
        return SourceCount(src.name, None, None, False, f"unknown: cannot tokenize a sample ({tokenizer})")
    return _estimate_text(src, cfg, units, tokenizer, seq_len, sample_documents)


def _special(cfg: DataConfig, bos_id, eos_id, adds_bos: bool, adds_eos: bool) -> int:
    """BOS/EOS tokens added per document: data.add_bos / add_eos, or where null the tokenizer's own
    convention (as jaxcpt.data.pipeline resolves them)."""
    add_bos = adds_bos if cfg.add_bos is None else cfg.add_bos
    add_eos = adds_eos if cfg.add_eos is None else cfg.add_eos
    return int(bool(add_bos) and bos_id is not None) + int(bool(add_eos) and eos_id is not None)


def _count_tokenized(src: SourceConfig, cfg: DataConfig, files: list[str], seq_len: int) -> SourceCount:
    lengths, hashes = [], []
    special = None
    for meta_path in files:
        meta = read_tokenized_meta(os.path.dirname(meta_path))
        bos, eos = meta["bos_id"], meta["eos_id"]
        # Shards written before the tokenizer's convention was recorded: BOS and EOS where they exist.
        special = _special(cfg, bos, eos, meta.get("adds_bos", bos is not None), meta.get("adds_eos", eos is not None))
        for shard in meta["shards"]:
            stem = os.path.join(meta["directory"], shard["tokens"])
            offsets = np.load(stem.replace(".tokens.npy", ".offsets.npy"))  # [docs + 1]
            lengths.append(np.diff(offsets))
            hashes.append(np.load(stem.replace(".tokens.npy", ".hashes.npy")))  # [docs] uint64
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)  # [docs] tokens
    hashes = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
    held_out = np.zeros(len(hashes), bool)
    if src.eval_fraction > 0:  # the same rule as jaxcpt.data.documents: hash below fraction * 2**64
        held_out |= hashes < np.uint64(min(int(src.eval_fraction * 2**64), 2**64 - 1))
    if src.eval_documents > 0:
        held_out |= np.isin(hashes, hashes[: src.eval_documents])
    short = ~held_out & (lengths + special < src.min_doc_tokens)  # left out by data.sources[].min_doc_tokens
    positions = np.maximum(lengths[~held_out & ~short] + special - 1, 0)  # [train docs]
    return SourceCount(src.name, float(positions.sum()), float(len(positions)), True,
                       "exact: pre-tokenized shards" + (f", {int(held_out.sum())} held out" if held_out.any() else "")
                       + (f", {int(short.sum())} below min_doc_tokens" if short.any() else ""),
                       _pieces(positions, seq_len))


def _sample_files(units: list) -> list:
    if len(units) <= _SAMPLE_FILES:
        return units
    picks = np.linspace(0, len(units) - 1, _SAMPLE_FILES).round().astype(int)
    return [units[i] for i in sorted(set(picks.tolist()))]


def _decompressed_size(path: str) -> tuple[float, bool]:
    """(bytes after decompression, exact?) for plain, .gz and .zst files."""
    size = os.path.getsize(path)
    lower = path.lower()
    if not lower.endswith((".gz", ".zst", ".zstd")):
        return float(size), True
    with open(path, "rb") as f:
        prefix = f.read(_PREFIX_BYTES)
    if lower.endswith(".gz"):
        out = len(zlib.decompressobj(wbits=47).decompress(prefix))  # 47: gzip or zlib header
    else:
        import zstandard

        out = len(zstandard.ZstdDecompressor().decompressobj().decompress(prefix))
    if len(prefix) >= size:
        return float(out), True
    return out * size / max(len(prefix), 1), False


def _estimate_text(src: SourceConfig, cfg: DataConfig, units: list, tokenizer, seq_len: int,
                   sample_documents: int) -> SourceCount:
    facts = tokenizer.facts
    special = _special(cfg, facts.bos_id, facts.eos_id, *facts.document_convention)
    sampled = _sample_files(units)
    per_unit = max(1, math.ceil(sample_documents / len(sampled)))
    texts, sample_bytes, complete = [], 0, True
    for unit in sampled:
        taken, position = 0, 0
        for position, raw in read_unit(unit, 0, src.text_field, src.text_split):
            kind, text = parse_record(unit.fmt, raw, src.text_field)
            if kind == "doc":
                texts.append(text)
                taken += 1
            if taken >= per_unit:
                complete = False
                break
        if unit.fmt == "text" and src.text_split == "per_file":
            sample_bytes += os.path.getsize(unit.path) if taken else 0  # positions count files here, not bytes
        elif unit.fmt != "parquet":
            sample_bytes += position  # decompressed bytes read, up to the last record taken
    if not texts:
        return SourceCount(src.name, None, None, False, "unknown: the sample holds no readable document")
    ids = []
    for start in range(0, len(texts), 256):
        ids.extend(tokenizer.encode_batch(texts[start : start + 256]))
    positions = np.array([len(i) + special - 1 for i in ids], np.int64)  # [sampled docs]
    eval_note = ""
    parquet = all(u.fmt == "parquet" for u in units)
    if parquet:
        import pyarrow.parquet as pq

        documents = float(sum(pq.ParquetFile(p).metadata.num_rows for p in sorted({u.path for u in units})))
        total = documents * positions.mean()
        how = f"estimated: {len(texts):,} sampled documents x {documents:,.0f} rows"
    else:
        sizes = [_decompressed_size(p) for p in sorted({u.path for u in units})]
        source_bytes = sum(s for s, _ in sizes)
        if complete and len(sampled) == len(units):  # the sample is the whole source
            total, documents = float(positions.sum()), float(len(positions))
            how = f"counted: all {len(texts):,} documents tokenized"
        else:
            per_byte = positions.sum() / max(sample_bytes, 1)
            total = per_byte * source_bytes
            documents = source_bytes / max(sample_bytes, 1) * len(texts)
            exact = all(e for _, e in sizes)
            how = (f"estimated: {len(texts):,} sampled documents, {per_byte:.3f} tokens/byte x "
                   f"{source_bytes / 1e6:,.1f} MB" + ("" if exact else " (decompressed size estimated)"))
    if src.eval_documents > 0:
        total -= min(src.eval_documents, documents) * positions.mean()
        documents -= min(src.eval_documents, documents)
        eval_note = f", {src.eval_documents} held out"
    if src.eval_fraction > 0:
        total *= 1 - src.eval_fraction
        documents *= 1 - src.eval_fraction
        eval_note = f", {100 * src.eval_fraction:g}% held out"
    exact = how.startswith("counted") and src.eval_fraction == 0 and src.eval_documents == 0
    return SourceCount(src.name, max(total, 0.0), documents, exact, how + eval_note, _pieces(positions, seq_len))


def first_fit_fill(piece_lengths: np.ndarray, seq_len: int, bins: int) -> float:
    """Share of row positions that are real tokens under grain's first-fit packing, simulated on a sample.

    Grain keeps ``bins`` rows open, puts each piece in the first row with room, and emits all
    rows when a piece fits none; padding fills the rest.
    """
    if piece_lengths is None or len(piece_lengths) == 0:
        return 1.0
    free: list[int] = []
    rows = 0
    for length in piece_lengths.tolist():
        for i, room in enumerate(free):
            if room >= length:
                free[i] -= length
                break
        else:
            if len(free) == bins:
                rows += bins
                free = []
            free.append(seq_len - length)
    rows += len(free)
    return float(piece_lengths.sum()) / (rows * seq_len)


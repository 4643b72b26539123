"""Which reader reads what: a source's units cut into ranges when readers outnumber them, and the
share of each host and Grain worker.

Readers are hosts x workers. A source with at least as many units (files, Parquet row groups,
token shards) as readers hands each reader whole units. With fewer, ``split_units`` cuts every
splittable unit into ranges (``jaxcpt.data.sources``: byte ranges of uncompressed JSONL and
blank-line text, row ranges of a row group, document ranges of a token shard), about
``RANGES_PER_READER`` per reader in all, each unit in proportion to its size, so every reader
gets 4 or 5 ranges of similar size. Compressed files (.gz, .zst) cannot be entered in the
middle: when they leave a source with fewer units than readers, every reader decompresses every
file and keeps the records whose ordinal is its index modulo the reader count
(``share``), and a warning at build time names the files and the fix.
"""

from __future__ import annotations

import math

import numpy as np

from jaxcpt.data.remote import file_size, parquet_input
from jaxcpt.data.sources import Unit, describe_paths, is_compressed, warn_once

RANGES_PER_READER = 4  # with 4 or 5 ranges each, readers' shares differ by at most a quarter


def splittable(unit: Unit, text_split: str) -> bool:
    if unit.fmt == "parquet":
        return unit.part >= 0  # -1: a file whose footer cannot be read (list_units), so no row count
    if unit.fmt == "tokenized":
        return True
    if is_compressed(unit.path):
        return False
    return unit.fmt == "jsonl" or (unit.fmt == "text" and text_split == "blank_line")


def split_units(units: list[Unit], *, hosts: int, workers: int, text_split: str, source: str) -> list[Unit]:
    """``units``, with the splittable ones cut into ranges when there are fewer units than readers."""
    readers = hosts * workers
    if len(units) >= readers:
        return units
    sizes = _Sizes()
    weights = {u: sizes.weight(u) for u in units if splittable(u, text_split)}
    total = sum(weights.values())
    out: list[Unit] = []
    for unit in units:
        extent = sizes.extent(unit) if unit in weights else 0
        if extent <= 0:
            out.append(unit)
            continue
        pieces = min(extent, max(1, math.ceil(RANGES_PER_READER * readers * weights[unit] / max(total, 1))))
        bounds = [i * extent // pieces for i in range(pieces)] + [None]  # the last range runs to the end
        out.extend(unit._replace(begin=bounds[i], end=bounds[i + 1]) for i in range(pieces))
    if len(out) < readers:
        whole = [u.path for u in out if not splittable(u, text_split)]
        if any(is_compressed(p) for p in whole):
            warn_once(
                f"source '{source}' has {len(out)} unit(s) for {readers} readers ({hosts} host(s) x {workers} "
                f"worker(s)), and its compressed files ({describe_paths(whole)}) cannot be split by bytes: every reader decompresses "
                f"all of them and keeps one record in {readers}. Split the data into at least {readers} files, or "
                "tokenize it once with `jaxcpt tokenize` (token shards are split by document)."
            )
    return out


class _Sizes:
    """A unit's weight (bytes, to balance ranges across files) and extent (the coordinate its ranges cut)."""

    def __init__(self):
        self._parquet: dict[str, object] = {}

    def _row_group(self, unit: Unit):
        if unit.path not in self._parquet:
            import pyarrow.parquet as pq

            self._parquet[unit.path] = pq.ParquetFile(parquet_input(unit.path)).metadata
        return self._parquet[unit.path].row_group(unit.part)

    def weight(self, unit: Unit) -> int:
        if unit.fmt == "parquet":
            return self._row_group(unit).total_byte_size
        return file_size(unit.path)  # a token shard's tokens file, or the text file itself

    def extent(self, unit: Unit) -> int:
        if unit.fmt == "parquet":
            return self._row_group(unit).num_rows
        if unit.fmt == "tokenized":
            return len(np.load(unit.path.replace(".tokens.npy", ".offsets.npy"), mmap_mode="r")) - 1
        return file_size(unit.path)


def share(units: list[Unit], host: tuple[int, int], worker: tuple[int, int]) -> tuple[list[Unit], int, int]:
    """(units to read, record shard, record shard count): this host's and worker's part of a source.

    Hosts split first, then each host's workers split the host's part. Each level hands out
    whole units when there are enough, else records: those whose ordinal in the (shared) unit
    order is the shard index modulo the count.
    """
    (h, hosts), (w, workers) = host, worker
    if len(units) >= hosts:
        units = units[h::hosts]
        shard, count = 0, 1
    else:
        shard, count = h, hosts
    if count == 1 and len(units) >= workers:
        return units[w::workers], 0, 1
    # Records r with r % count == shard, split among workers: r % (count * workers) == shard + count * w.
    return units, shard + count * w, count * workers

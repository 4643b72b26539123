"""Reading one unit's raw records, in bounded memory, and saying where a damaged file broke.

Each reader yields ``(position after the record, raw record)`` (see ``jaxcpt.data.sources``
for units, ranges and positions). Besides the raw bytes / values a record may be:

- ``TooLarge``: a document above ``ReadLimits.max_document_bytes``, skipped WITHOUT holding
  it: a JSONL line or text line is read in 1 MiB pieces past the limit and dropped, a
  per-file text document is judged by its size (or by reading limit + 1 decompressed
  bytes), a Parquet value by its length before it becomes a Python string, a token-shard
  document by its token count x 4 bytes (its int32 size in the pipeline);
- ``Damaged``: the unit broke here (truncated or corrupt compressed stream, corrupt Parquet
  pages or footer, a token shard whose arrays cannot be read or do not agree). It is always
  the unit's last record; ``lost`` estimates the records the rest of the unit held (see
  ``_lost_bytes`` and the Parquet / shard readers), and the caller counts them as bad.

Parquet is read in batches of rows sized from the row group's metadata so that one batch
holds about ``ReadLimits.parquet_batch_bytes`` of text, never a whole row group at once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from jaxcpt.data.remote import file_size, parquet_input
from jaxcpt.data.streams import BOM, DamagedFile, DataStream, is_compressed, open_stream

if TYPE_CHECKING:
    from jaxcpt.data.sources import Unit

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ReadLimits:
    """Memory bounds of reading (``data.max_document_bytes``, ``data.parquet_batch_bytes``)."""

    max_document_bytes: int = 16 * MIB
    parquet_batch_bytes: int = 64 * MIB


class TooLarge(NamedTuple):
    size: int | None  # bytes (None: more than the limit; a compressed file is not read to its end to tell)
    limit: int


class Damaged(NamedTuple):
    where: str  # "decompressed byte 123 (compressed byte 45 of 678), line 9" | "row group 2, row 17" | ...
    reason: str
    lost: int  # records the rest of the unit is estimated to hold (>= 1)
    how: str  # how ``lost`` was estimated


class NotText(NamedTuple):
    column_type: str


def _skip_line(stream: DataStream) -> int:
    """Consume the rest of the current line in bounded pieces; the bytes consumed."""
    skipped = 0
    while True:
        piece = stream.readline(MIB)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _enter(stream: DataStream, unit: Unit, start: int) -> bool:
    """Position ``stream`` where reading ``unit`` from ``start`` begins; whether that is a record boundary.

    ``start`` > 0 is a saved position, always just after a record. ``start`` == 0 is the
    unit's beginning: a range starting inside the file skips the rest of the line its first
    byte belongs to (a line starting exactly at ``begin`` is kept: the skip starts one byte
    earlier), and does not know whether the line before was blank.
    """
    if start > 0:
        stream.seek(start)
        return True
    if unit.begin == 0:
        return True
    stream.seek(unit.begin - 1)  # ranges exist only for uncompressed files
    _skip_line(stream)
    return False


def _lost_bytes(unit: Unit, stream: DataStream, e: DamagedFile) -> float:
    """Decompressed bytes the rest of the unit is estimated to hold after the damage at ``e``.

    The file's decompressed size when it says it (``DataStream.decompressed_size``; a range's
    end), else the compressed bytes left times the file's compression ratio so far. A truncated
    file has nothing left to measure (0): what it lost cannot be known.
    """
    total = unit.end if unit.end is not None else stream.decompressed_size(e)
    if total is not None:
        return max(0, total - e.offset)
    consumed = max(1, e.compressed or stream.file_size)
    return max(0, stream.file_size - consumed) * e.offset / consumed


def _damaged(unit: Unit, stream: DataStream, e: DamagedFile, records: int, first: int, line: int | None) -> Damaged:
    where = f"decompressed byte {e.offset}"
    if e.compressed is not None:
        where += f" (compressed byte {e.compressed} of {stream.file_size})"
    if line is not None:
        where += f", line {line}"
    read = e.offset - first
    lost = _lost_bytes(unit, stream, e)
    estimate = max(1, round(records * lost / read)) if records and read > 0 else 1
    how = (f"{records} records in the {read} bytes read before it, scaled to ~{int(lost)} bytes after it"
           if records and read > 0 and lost else "at least one: what follows the damage cannot be measured")
    return Damaged(where, e.reason, estimate, how)


def read_jsonl(unit: Unit, start: int, limits: ReadLimits) -> Iterator[tuple[int, object]]:
    limit = limits.max_document_bytes
    with open_stream(unit.path) as stream:
        first, records, line_no = start, 0, None
        try:
            _enter(stream, unit, start)  # inside: a file damaged since its position was saved is met here
            first = stream.offset
            line_no = 0 if stream.offset == 0 else None  # line numbers only when read from the file's start
            while True:
                if unit.end is not None and stream.offset >= unit.end:
                    return  # this line starts in the next range
                line = stream.readline(limit + 1)
                if not line:
                    return
                line_no = None if line_no is None else line_no + 1
                if len(line) > limit and not line.endswith(b"\n"):  # longer than the limit: do not hold it
                    size = len(line) + _skip_line(stream)
                    records += 1
                    yield stream.offset, TooLarge(size, limit)
                elif line.strip():  # a blank line (e.g. a trailing newline) is no record
                    records += 1
                    yield stream.offset, line
        except DamagedFile as e:
            yield e.offset, _damaged(unit, stream, e, records, first, None if line_no is None else line_no + 1)


def read_blocks(unit: Unit, start: int, limits: ReadLimits) -> Iterator[tuple[int, object]]:
    """Blank-line separated blocks. A block's anchor is the blank line just before it (or the scan's
    start, when that is the file's start or a saved position); a range reads the blocks anchored in it.
    The position after a block is the start of the blank line that ends it: the next block's anchor
    (or one before it), so a resumed reader sees it. A block above the limit is dropped as it is read."""
    limit = limits.max_document_bytes
    with open_stream(unit.path) as stream:
        first, records, block, in_block, block_bytes = start, 0, [], False, 0

        def finished(end: int):
            text = b"".join(block).rstrip(b"\r\n")
            return (end, TooLarge(block_bytes, limit)) if block_bytes > limit else (end, text)

        try:
            after_blank = _enter(stream, unit, start)
            first = anchor = stream.offset
            while True:
                line_start = stream.offset
                line = stream.readline(limit + 1)
                if not line:
                    break
                overflow = len(line) > limit and not line.endswith(b"\n")
                size = len(line) + (_skip_line(stream) if overflow else 0)
                if line_start == 0 and line.startswith(BOM):
                    line = line[len(BOM):]
                past_end = unit.end is not None and line_start >= unit.end
                if past_end and not in_block and not (after_blank and anchor < unit.end):
                    return  # whatever starts here is anchored at or past the end: the next range's
                if not overflow and not line.strip():
                    if in_block:
                        records += 1
                        yield finished(line_start)
                        block, in_block, block_bytes = [], False, 0
                    anchor, after_blank = line_start, True
                    continue
                if not in_block:
                    if not after_blank:
                        continue  # the rest of a block anchored before this range
                    if unit.end is not None and anchor >= unit.end:
                        return  # anchored in the next range
                    after_blank, in_block = False, True
                block_bytes += size
                if block_bytes <= limit:
                    block.append(line)
                else:
                    block.clear()  # too large: counted as such at its end, never held
            if in_block:
                records += 1
                yield finished(stream.offset)
        except DamagedFile as e:
            yield e.offset, _damaged(unit, stream, e, records, first, None)


def read_whole_file(unit: Unit, start: int, limits: ReadLimits) -> Iterator[tuple[int, object]]:
    """``text_split: per_file``: the whole (decompressed) file is one record, at position 1."""
    if start != 0:
        return
    limit = limits.max_document_bytes
    if not is_compressed(unit.path) and file_size(unit.path) > limit:
        yield 1, TooLarge(file_size(unit.path), limit)
        return
    with open_stream(unit.path) as stream:
        try:
            data = stream.read(limit + 1)
        except DamagedFile as e:
            yield 1, _damaged(unit, stream, e, 0, 0, None)
            return
    yield 1, TooLarge(None, limit) if len(data) > limit else data.removeprefix(BOM)


def _batch_rows(row_group, columns: tuple[str, ...], batch_bytes: int) -> int:
    """Rows per batch so that one batch holds about ``batch_bytes`` of the columns read (uncompressed)."""
    sizes = [row_group.column(i).total_uncompressed_size for i in range(row_group.num_columns)
             if row_group.column(i).path_in_schema.split(".")[0] in columns]
    column_bytes = sum(sizes) if sizes else row_group.total_byte_size
    per_row = max(1, column_bytes // max(1, row_group.num_rows))
    return int(min(max(1, row_group.num_rows), max(1, batch_bytes // per_row)))


def read_parquet(unit: Unit, start: int, text_field: str, limits: ReadLimits,
                 columns: tuple[str, ...] | None = None) -> Iterator[tuple[int, object]]:
    """Rows of one row group: the ``text_field`` string of each, or with ``columns`` (instruction records:
    ``jaxcpt.data.sources.instruction_columns``) a dict of those columns per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    limit = limits.max_document_bytes
    row = start if start > 0 else unit.begin  # the next row to yield (index in the row group)
    last = None
    try:
        # buffer_size: read pages through a 1 MiB buffer instead of whole column chunks.
        pf = pq.ParquetFile(parquet_input(unit.path), pre_buffer=False, buffer_size=MIB)
        if unit.part < 0:  # list_units could not read the footer; it reads now: the row groups are still unknown
            raise OSError("the file's footer could not be read when the run was planned")
        meta = pf.metadata.row_group(unit.part)
        last = meta.num_rows if unit.end is None else min(unit.end, meta.num_rows)
        column_type = pf.schema_arrow.field(text_field).type if columns is None else None
        if columns is None and not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            for row in range(row, last):
                yield row + 1, NotText(str(column_type))
            return
        batch_start = 0
        batches = pf.iter_batches(
            batch_size=_batch_rows(meta, columns or (text_field,), limits.parquet_batch_bytes), row_groups=[unit.part],
            columns=list(columns or (text_field,)), use_threads=False,
        )
        for batch in batches:  # resuming decodes (and drops) the rows before ``row``: bounded, not free
            batch_start += batch.num_rows
            lo, hi = row - (batch_start - batch.num_rows), min(last, batch_start) - (batch_start - batch.num_rows)
            if hi > lo:
                batch = batch.slice(lo, hi - lo)
                records = _text_records(batch.column(0), limit) if columns is None else _dict_records(batch, limit)
                for value in records:
                    row += 1
                    yield row, value
            if batch_start >= last:
                break
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        lost = max(1, last - row) if last is not None else 1
        how = "rows left in the row group (its metadata)" if last is not None else "at least one: the rows are unknown"
        where = f"row group {unit.part}, row {row}" if unit.part >= 0 else "its footer"
        yield row, Damaged(where, f"{type(e).__name__}: {e}", lost, how)


def _text_records(column, limit: int) -> list:
    """A string column's values, those over ``limit`` bytes as TooLarge (never turned into Python strings)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lengths = pc.binary_length(column)  # [rows] bytes of each value (null stays null)
    big = pc.fill_null(pc.greater(lengths, limit), False)
    if not pc.any(big).as_py():
        return column.to_pylist()
    values = pc.if_else(big, pa.scalar(None, column.type), column).to_pylist()
    return [TooLarge(n, limit) if n is not None and n > limit else v for v, n in zip(values, lengths.to_pylist())]


def _dict_records(batch, limit: int) -> list:
    """Instruction rows as dicts of their columns; a row whose JSON is over ``limit`` bytes as TooLarge."""
    out = []
    for record in batch.to_pylist():
        size = len(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        out.append(TooLarge(size, limit) if size > limit else record)
    return out


def _shard_documents(unit: Unit) -> int | None:
    """Documents the shard holds by its directory's metadata (the shard's own arrays may be the damage)."""
    from jaxcpt.data.sources import TOKENIZED_META

    try:
        with open(os.path.join(os.path.dirname(unit.path), TOKENIZED_META)) as f:
            shards = json.load(f)["shards"]
        return next(int(s["num_documents"]) for s in shards if s["tokens"] == os.path.basename(unit.path))
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def _open_shard(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tokens = np.load(path, mmap_mode="r")  # [total_tokens] uint16 | int32
    offsets = np.load(path.replace(".tokens.npy", ".offsets.npy"))  # [docs + 1] int64
    hashes = np.load(path.replace(".tokens.npy", ".hashes.npy"))  # [docs] uint64, text_hash of each
    if tokens.ndim != 1 or offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0:
        raise ValueError("the arrays do not have a token shard's shapes")
    if offsets[-1] != len(tokens) or (len(offsets) > 1 and np.diff(offsets).min() < 0):
        raise ValueError(f"the document offsets (last {offsets[-1]}) do not fit the {len(tokens)} tokens")
    if len(hashes) != len(offsets) - 1:
        raise ValueError(f"{len(hashes)} document hashes for {len(offsets) - 1} documents")
    return tokens, offsets, hashes


def read_tokenized(unit: Unit, start: int, limits: ReadLimits) -> Iterator[tuple[int, object]]:
    first = start if start > 0 else unit.begin
    try:
        tokens, offsets, hashes = _open_shard(unit.path)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as e:
        documents = _shard_documents(unit)
        end = unit.end if unit.end is not None else documents
        lost = max(1, end - first) if end is not None else 1
        how = "documents left in the shard (jaxcpt_tokenized.json)" if end is not None else "at least one"
        yield first, Damaged(f"document {first} of the shard", f"{type(e).__name__}: {e}", lost, how)
        return
    max_tokens = limits.max_document_bytes // 4  # int32 in the pipeline
    last = len(offsets) - 1 if unit.end is None else min(unit.end, len(offsets) - 1)
    for doc in range(first, last):
        n = int(offsets[doc + 1] - offsets[doc])
        yield doc + 1, TooLarge(4 * n, limits.max_document_bytes) if n > max_tokens else (
            tokens[offsets[doc] : offsets[doc + 1]], int(hashes[doc]))

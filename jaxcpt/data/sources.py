"""Finding a source's files and reading their records, resumably and without loading a corpus.

A source is cut into *units*, the smallest pieces that can be handed to different hosts:
a file, a Parquet row group, or one shard of a pre-tokenized directory. ``read_unit``
streams one unit's records from a position (a decompressed byte offset, a row index or a
document index) and reports the position after each record, which is what a data
checkpoint stores: resuming seeks there (plain files) or decompresses up to it (.gz, .zst).

``parse_record`` turns a raw record into ``("doc", text)`` (``("doc", (tokens, text hash))``
for tokenized shards) or ``(bad kind, reason)`` with a kind from ``BAD_KINDS``; the caller
counts and skips bad records (``jaxcpt.data.documents``).
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError

BAD_KINDS = ("malformed_json", "missing_field", "non_string_field", "empty", "invalid_utf8")

TOKENIZED_META = "jaxcpt_tokenized.json"  # marks a directory written by `jaxcpt tokenize`
TOKENIZED_FORMAT = "jaxcpt-tokenized-v1"

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_COMPRESSED = (".gz", ".zst", ".zstd")
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", ".html", ".xml", ".csv", ".tsv")


class Unit(NamedTuple):
    """A piece of a source that one reader takes whole: a file, a Parquet row group, a token shard."""

    path: str  # file; for tokenized, the shard's tokens .npy
    fmt: str  # jsonl | parquet | text | tokenized
    part: int  # Parquet row group; -1 otherwise


def text_hash(data: bytes) -> int:
    """A stable 64-bit hash of a document's UTF-8 bytes (never Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def resolve_files(patterns: list[str], source: str) -> list[str]:
    """Expand files, directories (recursively) and globs into a sorted, duplicate-free list.

    Sorting makes the list, and so every host's share of it, independent of the file system's
    listing order. A pattern that matches nothing is an error naming the pattern.
    """
    files: list[str] = []
    for pattern in patterns:
        if "://" in pattern:
            raise ConfigError(
                f"source '{source}': '{pattern}' is a remote path; jaxcpt reads local files only, so mount the "
                "bucket (e.g. gcsfuse) or copy the data to local disk and use that path"
            )
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise ConfigError(f"source '{source}': the pattern '{pattern}' matches no file")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise ConfigError(f"source '{source}': '{pattern}' does not exist")
        for match in matches:
            if os.path.isdir(match):
                if os.path.isfile(os.path.join(match, TOKENIZED_META)):
                    files.append(os.path.join(match, TOKENIZED_META))
                    continue
                found = [
                    os.path.join(root, name)
                    for root, dirs, names in os.walk(match)
                    for name in names
                    if not name.startswith(".")
                ]
                if not found:
                    raise ConfigError(f"source '{source}': the directory '{match}' (from '{pattern}') holds no file")
                files.extend(found)
            else:
                files.append(match)
    return sorted(set(files))


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        if declared == "tokenized" and os.path.basename(path) != TOKENIZED_META:
            raise ConfigError(
                f"'{path}' is not a tokenized directory (no {TOKENIZED_META}); write one with `jaxcpt tokenize`"
            )
        return declared
    name = path.lower()
    if os.path.basename(name) == TOKENIZED_META:
        return "tokenized"
    for suffix in _COMPRESSED:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES) or "." not in os.path.basename(name):
        return "text"
    raise ConfigError(f"cannot tell the format of '{path}' from its extension; set the source's format")


def list_units(files: list[str], declared_format: str, text_field: str, source: str) -> list[Unit]:
    """The units of a source, in a fixed order (files sorted, then row groups / shards)."""
    units: list[Unit] = []
    for path in files:
        fmt = detect_format(path, declared_format)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.ParquetFile(path)
            if text_field not in meta.schema_arrow.names:
                raise ConfigError(
                    f"source '{source}': Parquet file '{path}' has no column '{text_field}' "
                    f"(columns: {meta.schema_arrow.names}); set the source's text_field"
                )
            units.extend(Unit(path, fmt, g) for g in range(meta.num_row_groups))
        elif fmt == "tokenized":
            meta = read_tokenized_meta(os.path.dirname(path))
            base = os.path.dirname(path)
            units.extend(Unit(os.path.join(base, s["tokens"]), fmt, -1) for s in meta["shards"])
        else:
            units.append(Unit(path, fmt, -1))
    return units


def read_tokenized_meta(directory: str) -> dict:
    path = os.path.join(directory, TOKENIZED_META)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read tokenized shards' metadata '{path}': {e}") from None
    if meta.get("format") != TOKENIZED_FORMAT:
        raise UserError(f"'{path}' has format {meta.get('format')!r}, expected {TOKENIZED_FORMAT!r}")
    meta["directory"] = directory
    return meta


def _open_binary(path: str):
    """A buffered binary stream of the file's decompressed bytes."""
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")
    if lower.endswith((".zst", ".zstd")):
        import zstandard

        raw = open(path, "rb")
        return io.BufferedReader(
            zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True), 1 << 20
        )
    return open(path, "rb", buffering=1 << 20)


def _seek(stream, offset: int, path: str) -> None:
    """Move to a decompressed byte offset: a real seek for plain files, read-and-drop for compressed ones."""
    if offset <= 0:
        return
    if not path.lower().endswith((".gz", ".zst", ".zstd")):
        stream.seek(offset)
        return
    remaining = offset
    while remaining > 0:
        chunk = stream.read(min(remaining, 1 << 22))
        if not chunk:
            break
        remaining -= len(chunk)


def _decode(raw: bytes) -> tuple[str, object]:
    """(kind, text or reason) for a text document's raw bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", f"{e.reason} at byte {e.start}"
    if not text.strip():
        return "empty", "empty document"
    return "doc", text


def _parse_json_line(line: bytes, text_field: str) -> tuple[str, object]:
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", f"{e.reason} at byte {e.start} of the line"
    try:
        record = json.loads(decoded)
    except ValueError as e:
        return "malformed_json", str(e)
    if not isinstance(record, dict):
        return "malformed_json", f"a JSON {type(record).__name__}, not an object"
    text = record.get(text_field)
    if text is None:
        return "missing_field", f"no '{text_field}' field"
    if not isinstance(text, str):
        return "non_string_field", f"'{text_field}' is a {type(text).__name__}"
    if not text.strip():
        return "empty", "empty text"
    return "doc", text


def _read_jsonl(path: str, start: int) -> Iterator[tuple[int, object]]:
    with _open_binary(path) as stream:
        _seek(stream, start, path)
        offset = start
        for line in stream:
            offset += len(line)
            if line.strip():  # a blank line (e.g. a trailing newline) is no record
                yield offset, line


def _read_text(path: str, start: int, split: str) -> Iterator[tuple[int, object]]:
    if split == "per_file":
        if start == 0:
            with open(path, "rb") as f:
                yield 1, f.read()
        return
    with _open_binary(path) as stream:
        _seek(stream, start, path)
        offset, block = start, []
        for line in stream:
            offset += len(line)
            if line.strip():
                block.append(line)
            elif block:  # a blank line ends a block; runs of blank lines separate nothing more
                yield offset, b"".join(block).rstrip(b"\r\n")
                block = []
        if block:
            yield offset, b"".join(block).rstrip(b"\r\n")


class _NotText(NamedTuple):
    column_type: str


def _read_parquet(path: str, row_group: int, start: int, text_field: str) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One row group in memory at a time: Parquet's unit of reading.
    column = pq.ParquetFile(path).read_row_group(row_group, columns=[text_field]).column(0)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        for row in range(start, len(column)):
            yield row + 1, _NotText(str(column.type))
        return
    values = column.to_pylist()
    for row in range(start, len(values)):
        yield row + 1, values[row]


def _read_tokenized(tokens_path: str, start: int) -> Iterator[tuple[int, object]]:
    tokens = np.load(tokens_path, mmap_mode="r")  # [total_tokens] uint16 | int32
    offsets = np.load(tokens_path.replace(".tokens.npy", ".offsets.npy"))  # [docs + 1] int64
    hashes = np.load(tokens_path.replace(".tokens.npy", ".hashes.npy"))  # [docs] uint64, text_hash of each
    for doc in range(start, len(offsets) - 1):
        yield doc + 1, (tokens[offsets[doc] : offsets[doc + 1]], int(hashes[doc]))


def parse_record(fmt: str, raw: object, text_field: str) -> tuple[str, object]:
    """``("doc", text | (tokens, hash))`` or ``(bad kind, reason)`` for one raw record of ``read_unit``.

    Kept apart from reading so a reader that skips other hosts' records never parses them.
    """
    if fmt == "jsonl":
        return _parse_json_line(raw, text_field)
    if fmt == "text":
        return _decode(raw)
    if fmt == "parquet":
        if isinstance(raw, _NotText):
            return "non_string_field", f"column '{text_field}' has type {raw.column_type}"
        if raw is None:
            return "missing_field", f"'{text_field}' is null"
        return ("doc", raw) if raw.strip() else ("empty", "empty text")
    return "doc", raw  # tokenized


def read_unit(unit: Unit, start: int, text_field: str, text_split: str) -> Iterator[tuple[int, object]]:
    """Raw records of one unit from position ``start``: ``(position after the record, raw record)``."""
    try:
        if unit.fmt == "jsonl":
            yield from _read_jsonl(unit.path, start)
        elif unit.fmt == "text":
            yield from _read_text(unit.path, start, text_split)
        elif unit.fmt == "parquet":
            yield from _read_parquet(unit.path, unit.part, start, text_field)
        elif unit.fmt == "tokenized":
            yield from _read_tokenized(unit.path, start)
        else:
            raise ValueError(f"unknown unit format {unit.fmt}")
    except FileNotFoundError:
        raise UserError(f"'{unit.path}' disappeared while the run was reading it") from None

"""Finding a source's files and reading their records, resumably and without loading a corpus.

A source is cut into *units*, the pieces that can be handed to different readers (hosts x
Grain workers): a file, a Parquet row group, or one shard of a pre-tokenized directory.
When a source has fewer units than readers, ``split_units`` cuts the splittable ones into
ranges, so that no two readers scan the same records: uncompressed JSONL and blank-line
text files by byte range, Parquet row groups by row range, token shards by document
range. A record belongs to the range its *anchor* falls in: a JSONL line's first byte, a
blank-line block's preceding blank line (or the file's first byte), a row's or a
document's index. The reader of a byte range that does not start at 0 therefore skips to
the first line that starts inside it, and every reader finishes the record it started
even past its range's end: each record is read by exactly one reader. Compressed files
cannot be entered in the middle; they stay whole units.

``read_unit`` streams one unit's records from a position (a decompressed byte offset, a
row index or a document index) and reports the position after each record, which is what
a data checkpoint stores: resuming seeks there (plain files) or decompresses up to it
(.gz, .zst).

``parse_record`` turns a raw record into ``("doc", text)`` (``("doc", (tokens, text hash))``
for tokenized shards) or ``(bad kind, reason)`` with a kind from ``BAD_KINDS``; the caller
counts and skips bad records (``jaxcpt.data.documents``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from typing import NamedTuple

from jaxcpt.config import ConfigError
from jaxcpt.data.readers import (
    Damaged,
    NotText,
    ReadLimits,
    TooLarge,
    read_blocks,
    read_jsonl,
    read_parquet,
    read_tokenized,
    read_whole_file,
)
from jaxcpt.data.remote import expand, is_remote, parquet_input
from jaxcpt.data.streams import BOM, COMPRESSED, is_compressed  # noqa: F401  (is_compressed: shares imports it from here)
from jaxcpt.errors import UserError

log = logging.getLogger(__name__)

# New kinds go at the end: saved data states list counts in this order (older states are padded).
BAD_KINDS = (
    "malformed_json", "missing_field", "non_string_field", "empty", "invalid_utf8",
    "too_large",  # above data.max_document_bytes, skipped unread
    "damaged_file",  # records lost to a truncated or corrupt file (estimated; jaxcpt.data.readers)
)

TOKENIZED_META = "jaxcpt_tokenized.json"  # marks a directory written by `jaxcpt tokenize`
TOKENIZED_FORMAT = "jaxcpt-tokenized-v1"

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".tex", ".html", ".xml", ".csv", ".tsv")


# Repository and dataset-card files that share a directory with data (README.md, LICENSE.txt ...).
_NOT_DATA = re.compile(
    r"^(readme|license|licence|copying|notice|authors|changelog|changes|contributing|citation|code_of_conduct"
    r"|security|manifest)(\.[^/]*)?$",
    re.IGNORECASE,
)


class Unit(NamedTuple):
    """A piece of a source that one reader takes whole: a file, a Parquet row group, a token shard,
    or a range of one (``split_units``)."""

    path: str  # file; for tokenized, the shard's tokens .npy
    fmt: str  # jsonl | parquet | text | tokenized
    part: int  # Parquet row group; -1 otherwise
    begin: int = 0  # the range: byte offset (jsonl, text), row (parquet) or document (tokenized) ...
    end: int | None = None  # ... up to here, exclusive; None = to the end of the file / row group / shard


def text_hash(data: bytes) -> int:
    """A stable 64-bit hash of a document's UTF-8 bytes (never Python's salted hash())."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def resolve_files(patterns: list[str], source: str, declared_format: str = "auto") -> list[str]:
    """Expand files, directories (recursively) and globs into a sorted, duplicate-free list.

    Sorting makes the list, and so every host's share of it, independent of the file system's
    listing order. A pattern that matches nothing is an error naming the pattern. Directories
    and globs yield only data files: never dotfiles or anything under a dot-directory (.git,
    .cache), never README / LICENSE / CHANGELOG-like files, and only files whose format the
    extension tells (with ``format: auto``) or does not contradict (with a declared format);
    what they skip is named in a warning. A file named explicitly is read whatever its name.
    """
    files: list[str] = []
    skipped: list[str] = []
    for pattern in patterns:
        if is_remote(pattern):  # gs://, s3://, hf://datasets/... through fsspec (jaxcpt.data.remote)
            files.extend(f for f in expand(pattern, source)
                         if not glob.has_magic(pattern) or _is_data_file(os.path.basename(f), declared_format))
            continue
        expanded = os.path.expanduser(pattern)
        is_glob = glob.has_magic(expanded)
        if is_glob:
            matches = sorted(glob.glob(expanded, recursive=True))
            if not matches:
                raise ConfigError(f"source '{source}': the pattern '{pattern}' matches no file")
        elif os.path.exists(expanded):
            matches = [expanded]
        else:
            raise ConfigError(f"source '{source}': '{pattern}' does not exist")
        found: list[str] = []
        not_data: list[str] = []
        for match in matches:
            if os.path.isdir(match):
                if os.path.isfile(os.path.join(match, TOKENIZED_META)):
                    found.append(os.path.join(match, TOKENIZED_META))
                    continue
                for root, dirs, names in os.walk(match):
                    dirs[:] = [d for d in dirs if not d.startswith(".")]
                    for name in names:
                        path = os.path.join(root, name)
                        (found if _is_data_file(name, declared_format) else not_data).append(path)
            elif is_glob and not _is_data_file(os.path.basename(match), declared_format):
                not_data.append(match)
            else:
                found.append(match)
        if not found:
            raise ConfigError(
                f"source '{source}': '{pattern}' holds no data file (skipped: {describe_paths(not_data)}); name the "
                "files explicitly, or set the source's format if their extension does not tell it"
            )
        files.extend(found)
        skipped.extend(not_data)
    if skipped:
        warn_once(
            f"source '{source}': skipped {len(skipped)} file(s) that are not data by their name or extension: "
            f"{describe_paths(skipped)}. Name a file explicitly in paths to read it anyway, or set the source's format."
        )
    return sorted(set(files))


def _is_data_file(name: str, declared_format: str) -> bool:
    if name.startswith(".") or _NOT_DATA.match(name):
        return False
    by_extension = _extension_format(name)
    if declared_format == "auto":
        return by_extension is not None
    return by_extension in (declared_format, None)  # e.g. format: text reads .py files, not .parquet ones


def describe_paths(paths: list[str], limit: int = 5) -> str:
    """The first few paths, quoted, and how many more."""
    shown = ", ".join(f"'{p}'" for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "") if paths else "nothing"


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log a build-time warning once per process: plans are made for training, evaluation and checks alike."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def _without_compression(name: str) -> str:
    for suffix in COMPRESSED:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _extension_format(path: str) -> str | None:
    """The format a file's name says (compression suffixes looked through); None when it says none."""
    name = _without_compression(os.path.basename(path).lower())
    if name == TOKENIZED_META:
        return "tokenized"
    if name.endswith(_JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(_TEXT_SUFFIXES):
        return "text"
    return None


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        if declared == "tokenized" and os.path.basename(path) != TOKENIZED_META:
            raise ConfigError(
                f"'{path}' is not a tokenized directory (no {TOKENIZED_META}); write one with `jaxcpt tokenize`"
            )
        return declared
    fmt = _extension_format(path)
    if fmt is not None:
        return fmt
    if "." not in _without_compression(os.path.basename(path)):
        return "text"  # a file named without an extension (explicitly: directories skip those)
    raise ConfigError(f"cannot tell the format of '{path}' from its extension; set the source's format")


def instruction_columns(instruction: str) -> tuple[str, ...] | None:
    """The Parquet columns an instruction source reads (None: a text source reads its text_field)."""
    return {"messages": ("messages",), "prompt_completion": ("prompt", "completion")}.get(instruction)


def list_units(files: list[str], declared_format: str, text_field: str, source: str,
               instruction: str = "none") -> list[Unit]:
    """The units of a source, in a fixed order (files sorted, then row groups / shards)."""
    units: list[Unit] = []
    for path in files:
        fmt = detect_format(path, declared_format)
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                meta = pq.ParquetFile(parquet_input(path))
            except (OSError, pa.ArrowException) as e:
                if isinstance(e, FileNotFoundError):
                    raise
                # A damaged footer: one unit that reads as damaged, counted as bad (not a crash at every start).
                log.warning("source '%s': cannot read the Parquet file '%s' (%s: %s); it counts as damaged",
                            source, path, type(e).__name__, e)
                units.append(Unit(path, fmt, -1))
                continue
            needed = instruction_columns(instruction)
            missing = [c for c in needed or (text_field,) if c not in meta.schema_arrow.names]
            if missing:
                what, fix = ((f"columns {missing}", f"instruction: {instruction} reads the columns {list(needed)}")
                             if needed else (f"column '{text_field}'", "set the source's text_field"))
                raise ConfigError(
                    f"source '{source}': Parquet file '{path}' has no {what} "
                    f"(columns: {meta.schema_arrow.names}); {fix}"
                )
            units.extend(Unit(path, fmt, g) for g in range(meta.num_row_groups))
        elif fmt == "tokenized":
            meta = read_tokenized_meta(os.path.dirname(path))
            if meta.get("storage", "npy") != "npy":
                raise ConfigError(
                    f"source '{source}': '{meta['directory']}' holds {meta['storage']} shards, which are read by "
                    "random access only: set data.elastic=true (or write .npy shards with `jaxcpt tokenize` without "
                    "--engine beam)")
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


def _decode(raw: bytes) -> tuple[str, object]:
    """(kind, text or reason) for a text document's raw bytes."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", f"{e.reason} at byte {e.start}"
    if not text.strip():
        return "empty", "empty document"
    return "doc", text


def _instruction_record(record: dict, instruction: str) -> tuple[str, object]:
    """An instruction record as canonical JSON text (hashed, held out and carried like a text document)."""
    if instruction == "messages":
        messages = record.get("messages")
        if messages is None:
            return "missing_field", "no 'messages' field"
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            return "non_string_field", "'messages' is not a non-empty list of {role: str, content: str}"
        if not any(m["role"] == "assistant" for m in messages):
            return "missing_field", "no assistant message: nothing to train on"
        doc = {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    else:
        for key in ("prompt", "completion"):
            if key not in record:
                return "missing_field", f"no '{key}' field"
            if not isinstance(record[key], str):
                return "non_string_field", f"'{key}' is a {type(record[key]).__name__}"
        if not record["completion"].strip():
            return "empty", "empty completion"
        doc = {"prompt": record["prompt"], "completion": record["completion"]}
    return "doc", json.dumps(doc, sort_keys=True, ensure_ascii=False)


def _parse_json_line(line: bytes, text_field: str, instruction: str = "none") -> tuple[str, object]:
    if line.startswith(BOM):  # a file (or a file concatenated into this one) saved with a byte-order mark
        line = line[len(BOM):]
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
    if instruction != "none":
        return _instruction_record(record, instruction)
    text = record.get(text_field)
    if text is None:
        return "missing_field", f"no '{text_field}' field"
    if not isinstance(text, str):
        return "non_string_field", f"'{text_field}' is a {type(text).__name__}"
    if not text.strip():
        return "empty", "empty text"
    return "doc", text


def parse_record(fmt: str, raw: object, text_field: str, instruction: str = "none") -> tuple[str, object]:
    """``("doc", text | (tokens, hash))`` or ``(bad kind, reason)`` for one raw record of ``read_unit``.

    Kept apart from reading so a reader that skips other hosts' records never parses them.
    """
    if isinstance(raw, TooLarge):
        size = f"{raw.size} bytes" if raw.size is not None else "more bytes"
        return "too_large", f"{size} than data.max_document_bytes={raw.limit}"
    if isinstance(raw, Damaged):
        return "damaged_file", f"damaged at {raw.where}: {raw.reason}"
    if fmt == "jsonl":
        return _parse_json_line(raw, text_field, instruction)
    if fmt == "text":
        return _decode(raw)
    if fmt == "parquet":
        if isinstance(raw, dict):  # an instruction row: its columns (readers.read_parquet)
            return _instruction_record(raw, instruction)
        if isinstance(raw, NotText):
            return "non_string_field", f"column '{text_field}' has type {raw.column_type}"
        if raw is None:
            return "missing_field", f"'{text_field}' is null"
        return ("doc", raw) if raw.strip() else ("empty", "empty text")
    return "doc", raw  # tokenized


def read_unit(
    unit: Unit, start: int, text_field: str, text_split: str, limits: ReadLimits = ReadLimits(),
    instruction: str = "none",
) -> Iterator[tuple[int, object]]:
    """Raw records of one unit from position ``start`` (0 = the unit's beginning, else a position it
    reported): ``(position after the record, raw record)``. A ``Damaged`` record ends the unit
    (``jaxcpt.data.readers``); a ``TooLarge`` one stands for a document skipped unread."""
    try:
        if unit.fmt == "jsonl":
            yield from read_jsonl(unit, start, limits)
        elif unit.fmt == "text":
            if text_split == "blank_line":
                yield from read_blocks(unit, start, limits)
            else:
                yield from read_whole_file(unit, start, limits)
        elif unit.fmt == "parquet":
            yield from read_parquet(unit, start, text_field, limits, instruction_columns(instruction))
        elif unit.fmt == "tokenized":
            yield from read_tokenized(unit, start, limits)
        else:
            raise ValueError(f"unknown unit format {unit.fmt}")
    except FileNotFoundError:
        raise UserError(f"'{unit.path}' disappeared while the run was reading it") from None

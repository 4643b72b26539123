"""``jaxcpt tokenize``: tokenize a source once into shards that training reads without a tokenizer.

    jaxcpt tokenize --tokenizer tok.model --output /data/pubmed_tok "/data/pubmed/*.jsonl.zst"
    jaxcpt tokenize --config run.yaml --source medical --output /data/pubmed_tok

The output directory holds ``shard-NNNNN.tokens.npy`` ([tokens] uint16, or uint32 for
vocabularies over 65,535), ``.offsets.npy`` ([documents + 1] int64, where each document
starts) and ``.hashes.npy`` ([documents] uint64, the blake2b hash of each document's text,
so held-out splits match those of the text source), and ``jaxcpt_tokenized.json`` (written
last: a directory without it is an interrupted run). Tokens carry no BOS/EOS: training
adds them as configured. Point a source's ``paths`` at the directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np

from jaxcpt.config import ConfigError, from_dict, read_yaml
from jaxcpt.data.config import DataConfig, SourceConfig
from jaxcpt.data.documents import BadInputCounter
from jaxcpt.data.readers import Damaged
from jaxcpt.data.sources import (
    TOKENIZED_FORMAT,
    TOKENIZED_META,
    Unit,
    list_units,
    parse_record,
    read_unit,
    resolve_files,
    text_hash,
)
from jaxcpt.data.tokenize import cached_tokenizer, load_tokenizer, tokenizer_fingerprint
from jaxcpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", help="files, directories or glob patterns (or use --config and --source)")
    parser.add_argument(
        "--output", required=True, help="directory to write the shards to (must not hold shards already)"
    )
    parser.add_argument("--tokenizer", help="sentencepiece .model file or Hugging Face tokenizer directory")
    parser.add_argument(
        "--config", help="a YAML config; with --source, take paths, format, text_field and tokenizer from it"
    )
    parser.add_argument("--source", help="name of the source in the config's data.sources")
    parser.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "text"])
    parser.add_argument("--text-field", default="text", help="JSONL field / Parquet column with the text")
    parser.add_argument("--text-split", default="per_file", choices=["per_file", "blank_line"])
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    parser.add_argument("--workers", type=int, default=0, help="tokenizer processes (0 = this process)")
    parser.add_argument(
        "--engine", default="local", choices=["local", "beam"],
        help="local: .npy shards written by this process (and --workers); beam: ArrayRecord shards written by an "
        "Apache Beam pipeline, one shard per input file or row group (jaxcpt[data]; read with data.elastic=true)",
    )
    parser.add_argument("--runner", default="direct",
                        help="beam: direct (several processes here, --workers of them, at least 1), or a Beam runner "
                        "name (DataflowRunner, FlinkRunner, SparkRunner)")
    parser.add_argument("--beam-args", default="", help="beam: Beam's own pipeline options, one quoted string "
                        "after '=' (--beam-args=\"--project=P --region=R --temp_location=gs://B/tmp\")")
    parser.add_argument(
        "--fatal-bad-input", action="store_true", help="stop at the first bad document instead of skipping it"
    )


def _source_from_args(args) -> tuple[SourceConfig, str]:
    if args.config:
        if not args.source:
            raise UserError("--config needs --source NAME")
        data = read_yaml(args.config)
        cfg = from_dict(DataConfig, data.get("data", data), prefix="data")
        by_name = {s.name: s for s in cfg.sources}
        if args.source not in by_name:
            raise ConfigError(f"no source '{args.source}' in {args.config}; sources: {sorted(by_name)}")
        return by_name[args.source], args.tokenizer or cfg.tokenizer
    if not args.inputs:
        raise UserError("give input files or patterns, or --config and --source")
    src = from_dict(
        SourceConfig,
        {
            "name": "input",
            "paths": args.inputs,
            "format": args.format,
            "text_field": args.text_field,
            "text_split": args.text_split,
        },
    )
    return src, args.tokenizer or ""


def unit_documents(unit: Unit, text_field: str, text_split: str, counter: BadInputCounter) -> Iterator[tuple[str, int]]:
    """(text, text hash) of every good document of one unit, in order; bad ones are counted in ``counter``.

    Both engines (this command's and ``jaxcpt.data.beam_tokenize``'s, one unit per Beam element) read
    documents through this, so they keep and skip the same ones.
    """
    for position, raw in read_unit(unit, 0, text_field, text_split):
        if isinstance(raw, Damaged):
            counter.damaged(unit.path, raw, max(1, raw.lost))
            continue
        kind, payload = parse_record(unit.fmt, raw, text_field)
        if kind == "doc":
            try:
                doc_hash = text_hash(payload.encode("utf-8"))
            except UnicodeEncodeError:
                kind, payload = "invalid_utf8", "unpaired surrogate"
        if kind != "doc":
            counter.bad(kind, payload, f"{unit.path} ({position})")
            continue
        counter.good()
        yield payload, doc_hash


def _documents(src: SourceConfig, units: list[Unit], counter: BadInputCounter) -> Iterator[tuple[str, int]]:
    """(text, text hash) of every good document, in sorted file order."""
    for unit in units:
        yield from unit_documents(unit, src.text_field, src.text_split, counter)


def tokenize_counter(src: SourceConfig, fatal: bool = False) -> BadInputCounter:
    """Bad records are skipped and counted (the index lists them), never a reason to stop unless ``fatal``."""
    return BadInputCounter(src.name, fatal=fatal, max_fraction=1.0, min_records=0, warn_seconds=60.0)


def source_units(src: SourceConfig) -> list[Unit]:
    """The units to tokenize (checked before anything is written): not already token shards."""
    units = list_units(resolve_files(src.paths, src.name, src.format), src.format, src.text_field, src.name)
    if any(u.fmt == "tokenized" for u in units):
        raise UserError(f"source '{src.name}' is already tokenized")
    return units


def index_header(src: SourceConfig, tokenizer: str, facts, dtype: str) -> dict:
    """What every token directory's jaxcpt_tokenized.json says about the tokenizer and the input."""
    return {
        "format": TOKENIZED_FORMAT,
        "tokenizer": os.path.abspath(tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": facts.num_ids,
        "bos_id": facts.bos_id,
        "eos_id": facts.eos_id,
        "pad_id": facts.pad_id,
        # the document convention, what data.add_bos / add_eos default to when there is no tokenizer
        "adds_bos": facts.document_convention[0],
        "adds_eos": facts.document_convention[1],
        "dtype": dtype,
        "inputs": list(src.paths),
        "text_field": src.text_field,
        "text_split": src.text_split,
    }


def token_dtype(facts) -> np.dtype:
    """uint16 ids where the vocabulary fits, else uint32."""
    return np.dtype(np.uint16 if facts.num_ids <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _batches(docs: Iterator[tuple[str, int]], size: int) -> Iterator[tuple[list[str], list[int]]]:
    batch: list[tuple[str, int]] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == size:
            yield [t for t, _ in batch], [h for _, h in batch]
            batch = []
    if batch:
        yield [t for t, _ in batch], [h for _, h in batch]


def _encode(item: tuple[str, list[str], list[int]]) -> tuple[list[list[int]], list[int]]:
    path, texts, hashes = item
    return cached_tokenizer(path).encode_batch(texts), hashes


class _ShardWriter:
    def __init__(self, directory: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._lengths: list[int] = []
        self._hashes: list[int] = []
        self._count = 0

    def add(self, ids: list[int], doc_hash: int) -> None:
        self._tokens.append(np.asarray(ids, dtype=self.dtype))
        self._lengths.append(len(ids))
        self._hashes.append(doc_hash)
        self._count += len(ids)
        if self._count >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._lengths:
            return
        stem = f"shard-{len(self.shards):05d}"
        tokens = np.concatenate(self._tokens) if self._tokens else np.zeros(0, self.dtype)  # [tokens]
        offsets = np.concatenate([[0], np.cumsum(self._lengths)]).astype(np.int64)  # [docs + 1]
        np.save(os.path.join(self.directory, f"{stem}.tokens.npy"), tokens)
        np.save(os.path.join(self.directory, f"{stem}.offsets.npy"), offsets)
        np.save(os.path.join(self.directory, f"{stem}.hashes.npy"), np.asarray(self._hashes, np.uint64))
        self.shards.append(
            {"tokens": f"{stem}.tokens.npy", "num_documents": len(self._lengths), "num_tokens": int(offsets[-1])}
        )
        self._reset()


def tokenize_source(
    src: SourceConfig,
    tokenizer: str,
    output: str,
    *,
    shard_tokens: int = 100_000_000,
    batch_size: int = 256,
    workers: int = 0,
    fatal_bad_input: bool = False,
    progress: bool = True,
) -> dict:
    """Write ``src`` as token shards into ``output``; returns the metadata written to jaxcpt_tokenized.json."""
    from tqdm import tqdm

    if os.path.exists(os.path.join(output, TOKENIZED_META)) or any(
        n.startswith("shard-") for n in (os.listdir(output) if os.path.isdir(output) else [])
    ):
        raise UserError(f"'{output}' already holds token shards; choose a new directory or delete them")
    units = source_units(src)  # inputs and tokenizer are checked before anything is written
    facts = load_tokenizer(tokenizer).facts
    os.makedirs(output, exist_ok=True)
    dtype = token_dtype(facts)
    counter = tokenize_counter(src, fatal_bad_input)
    writer = _ShardWriter(output, dtype, shard_tokens)
    items = ((tokenizer, texts, hashes) for texts, hashes in _batches(_documents(src, units, counter), batch_size))
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        encoded = pool.imap(_encode, items, chunksize=1) if pool else map(_encode, items)
        bar = tqdm(desc=f"tokenize {src.name}", unit=" doc", disable=not progress)
        num_tokens = 0
        for ids_batch, hashes in encoded:
            for ids, doc_hash in zip(ids_batch, hashes):
                writer.add(ids, doc_hash)
                num_tokens += len(ids)
            bar.update(len(hashes))
            bar.set_postfix(tokens=f"{num_tokens:,}")
        bar.close()
    finally:
        if pool:
            pool.terminate()
    writer.flush()
    meta = {
        **index_header(src, tokenizer, facts, dtype.name),
        "num_documents": sum(s["num_documents"] for s in writer.shards),
        "num_tokens": sum(s["num_tokens"] for s in writer.shards),
        "bad_documents": {k: v for k, v in counter.counts.items() if v},
        "shards": writer.shards,
    }
    tmp = os.path.join(output, TOKENIZED_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(output, TOKENIZED_META))  # last, atomically: its presence means complete
    return meta


def run(args) -> int:
    src, tokenizer = _source_from_args(args)
    if not tokenizer:
        raise UserError("no tokenizer: pass --tokenizer (or set data.tokenizer in the --config file)")
    if args.engine == "beam":
        from jaxcpt.data.beam_tokenize import run_beam

        meta = run_beam(src, tokenizer, args.output, runner=args.runner, workers=max(1, args.workers),
                        batch_size=args.batch_size, beam_args=args.beam_args)
        print(f"wrote {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {len(meta['shards'])} "
              f"ArrayRecord shard(s) to {args.output}" + (f"; skipped bad documents {meta['bad_documents']}"
                                                           if meta["bad_documents"] else ""))
        return 0
    meta = tokenize_source(
        src,
        tokenizer,
        args.output,
        shard_tokens=args.shard_tokens,
        batch_size=args.batch_size,
        workers=args.workers,
        fatal_bad_input=args.fatal_bad_input,
    )
    bad = sum(meta["bad_documents"].values())
    print(
        f"wrote {meta['num_documents']:,} documents, {meta['num_tokens']:,} tokens in {len(meta['shards'])} shard(s) "
        f"to {args.output}" + (f"; skipped {bad} bad documents {meta['bad_documents']}" if bad else "")
    )
    return 0

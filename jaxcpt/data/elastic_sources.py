"""What each source of the elastic reader (``jaxcpt.data.elastic``) trains on, decided from the index.

Per source: its shards (every source must be indexed), the documents held out for evaluation
(the union over all sources, as the streaming reader holds them out), and
``data.sources[].min_doc_tokens``: the documents shorter than that, BOS/EOS included (as the
streaming reader's ``DocumentSplit`` counts them), are left out of the source's training
documents and of its held-out rows. The decision reads only the index's lengths, so it is
deterministic and the same on every host, and it is made before the epoch's permutation: the
permutation, the epoch's size in pairs (``pass_tokens`` in ``jaxcpt.data.accounting``) and so
the source's ``epochs`` are those of the kept documents.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.data.config import DataConfig
from jaxcpt.data.documents import HeldOut
from jaxcpt.data.indexed import IndexedSource, SourceRows, training_documents
from jaxcpt.data.sources import TOKENIZED_META, read_tokenized_meta, resolve_files

log = logging.getLogger(__name__)


def check_config(cfg: DataConfig) -> None:
    cfg.validate()
    if not cfg.sources:
        raise ConfigError("data.sources is empty: add at least one source (name, paths)")
    if cfg.weights_count == "documents":
        raise ConfigError("data.elastic=true packs full rows, so weights count tokens (= rows); set "
                          "data.weights_count=tokens or rows")
    for s in cfg.sources:
        if s.instruction != "none":
            raise ConfigError(
                f"source '{s.name}' (instruction: {s.instruction}) cannot be read with data.elastic=true: the elastic "
                "reader reads token shards, and `jaxcpt tokenize` writes text documents' ids without the answer mask, so "
                "the loss would fall on every token. Set data.elastic=false (instruction records stream from JSONL or "
                "Parquet, resumable on the same host and worker counts)")


def indexed_sources(cfg: DataConfig) -> tuple[list[IndexedSource], HeldOut]:
    """Each source's index, and the held-out documents of all sources."""
    from jaxcpt.data.plan import _special_tokens, excluded_hashes  # what every stream shares

    files = [resolve_files(s.paths, s.name, s.format) for s in cfg.sources]
    for s, fs in zip(cfg.sources, files):
        streaming = [f for f in fs if os.path.basename(f) != TOKENIZED_META]
        if streaming:
            raise ConfigError(
                f"source '{s.name}' reads {streaming[0]!r}, a streaming file: data.elastic=true needs every source "
                "pre-tokenized (`jaxcpt tokenize` writes the directory to list), or set data.elastic=false, whose "
                "streaming reader cannot be resumed on another host or worker count")
    bos, eos, _ = _special_tokens(cfg, files)
    sources = [IndexedSource(s.name, [read_tokenized_meta(os.path.dirname(f)) for f in fs], bos_id=bos, eos_id=eos)
               for s, fs in zip(cfg.sources, files)]
    eval_hashes = set()
    for s, src in zip(cfg.sources, sources):
        eval_hashes.update(int(h) for h in src.hashes[: s.eval_documents])  # the first ones in index order
    held_out = HeldOut(threshold=max(int(s.eval_fraction * 2**64) for s in cfg.sources),
                       hashes=frozenset(eval_hashes) | excluded_hashes(cfg))
    return sources, held_out


def long_enough(source: IndexedSource, docs: np.ndarray, min_tokens: int) -> np.ndarray:
    """The documents of ``docs`` [docs] with at least ``min_tokens`` tokens, BOS/EOS included (0: all)."""
    return docs[source.lengths[docs] + source.extra >= min_tokens] if min_tokens else docs  # [kept docs]


def training_rows(cfg: DataConfig, sources: list[IndexedSource], held_out: HeldOut,
                  longest: np.ndarray) -> list[SourceRows]:
    """Each source's rows over its kept training documents; ``longest`` [sources]: the longest row each source is
    drawn for (``stage_shapes.longest_drawn_rows``), which its epoch must fill at least once."""
    rows = []
    for s, src, need in zip(cfg.sources, sources, longest):
        train = training_documents(src, held_out)
        kept = long_enough(src, train, s.min_doc_tokens)
        r = SourceRows(src, kept, cfg.seed)
        if s.min_doc_tokens:
            log.info("source '%s': min_doc_tokens=%d keeps %d of its %d training documents (%d next-token pairs an "
                     "epoch)", s.name, s.min_doc_tokens, len(kept), len(train), r.pairs_per_epoch)
        if r.pairs_per_epoch < need:
            short = (f" of documents of at least min_doc_tokens={s.min_doc_tokens} tokens ({len(kept)} of "
                     f"{len(train)} documents)" if s.min_doc_tokens else "")
            raise ConfigError(f"source '{s.name}' trains on {r.pairs_per_epoch} tokens{short}, fewer than one row of "
                              f"seq_len={need} at a step where it has weight; add documents, lower seq_len"
                              + (" or min_doc_tokens" if s.min_doc_tokens else ""))
        rows.append(r)
    return rows


def held_out_documents(s, src: IndexedSource) -> np.ndarray:
    """[docs] a source's held-out documents in index order: the first ``eval_documents``, or those whose text hash
    falls below ``eval_fraction`` (the streaming reader's rules), without those below ``min_doc_tokens``."""
    if s.eval_documents:
        docs = np.arange(min(s.eval_documents, src.num_documents), dtype=np.int64)
    else:
        docs = np.flatnonzero(src.hashes < np.uint64(int(s.eval_fraction * 2**64))).astype(np.int64)
    return long_enough(src, docs, s.min_doc_tokens)


def build_position_batches(cfg: DataConfig, *, length: int, min_pairs: int, rows: int, batch_size: int,
                           host: tuple[int, int]) -> dict[str, list[dict]]:
    """``eval.position_buckets``' rows for indexed sources (``jaxcpt.eval.position_loss``, whose rules these are):
    per source the first ``rows`` held-out documents, in index order, with more than ``min_pairs`` next-token pairs
    (and at least min_doc_tokens tokens), each ONE document's first ``length`` pairs from its first token."""
    from jaxcpt.data.packing import stack_rows

    check_config(cfg)
    sources, _ = indexed_sources(cfg)
    out = {}
    for i, (s, src) in enumerate(zip(cfg.sources, sources)):
        if not s.has_eval_split:
            continue
        docs = held_out_documents(s, src)
        need = max(min_pairs, s.min_doc_tokens - 1)  # as position_loss.FirstPiece is given it
        docs = docs[src.lengths[docs] + src.extra - 1 > need][:rows]  # [<= rows]
        if len(docs) < rows:
            log.warning("source '%s': %d held-out documents longer than %d tokens for the position buckets "
                        "(eval.position_rows=%d)", s.name, len(docs), min_pairs, rows)
        found = []
        for doc in docs:
            tokens = src.tokens(int(doc))  # [n]
            n = min(len(tokens) - 1, length)
            row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}  # [T]
            row["inputs"][:n], row["targets"][:n] = tokens[:n], tokens[1 : n + 1]
            row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
            found.append({**row, "source": i})  # stack_rows sets loss_mask = segment_ids > 0
        if not found:
            continue
        mine = found[host[0] :: host[1]]
        num_batches = math.ceil(math.ceil(len(found) / host[1]) / batch_size)  # every host the same count
        out[s.name] = [stack_rows(mine[b * batch_size : (b + 1) * batch_size], batch_size, length)
                       for b in range(num_batches)]
    return out

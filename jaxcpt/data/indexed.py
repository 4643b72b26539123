"""Pre-tokenized sources read by random access, and packed rows computed by index arithmetic.

An *indexed* source is a directory with ``jaxcpt_tokenized.json`` whose shards can be read
at any document: the ``.npy`` shards ``jaxcpt tokenize`` writes (memory-mapped), or
ArrayRecord shards (``"storage": "array_record"``; one record per document, its token ids
as little-endian bytes of the index's dtype), read through Grain's ``ArrayRecordDataSource``.
Both keep each document's length and text hash beside the tokens, so the training set (every
document that is not held out and has a next-token pair) is known without reading tokens.

Packing is concat-then-split, computed rather than streamed. Epoch ``e`` of a source orders
its training documents by a permutation seeded by (data.seed, source, e) -- a global shuffle,
no shuffle buffer -- and concatenates their next-token pairs (a document of ``n`` tokens,
BOS/EOS added, gives ``n - 1`` pairs). A row of ``seq_len`` is the pairs ``[offset, offset +
seq_len)`` of that concatenation, so a position in a source is ``(epoch, offset)`` in pairs:
it does not depend on the host count, the worker count or even seq_len. The pairs past the
last whole row of an epoch are dropped (the next epoch starts a new permutation). Within a
row, each document's slice is its own segment with positions from 0, as in
``jaxcpt.data.packing``'s concat_split; the loss mask is ``segment_ids > 0`` (rows are full).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.data.documents import HeldOut, stable_seed
from jaxcpt.data.sources import TOKENIZED_FORMAT, TOKENIZED_META, text_hash

ARRAY_RECORD = "array_record"


class IndexedSource:
    """One source's documents by index (picklable: shards are opened lazily in each process)."""

    def __init__(self, name: str, metas: list[dict], *, bos_id: int | None, eos_id: int | None):
        self.name = name
        storages = {m.get("storage", "npy") for m in metas}
        if len(storages) > 1:
            raise ConfigError(f"source '{name}' mixes .npy and ArrayRecord token directories; give each its own source")
        self.storage = storages.pop()
        self.fingerprint = "+".join(m.get("source_fingerprint") or _shards_fingerprint(m) for m in metas)
        self.extra = int(bos_id is not None) + int(eos_id is not None)  # tokens added to every document
        self.bos_id, self.eos_id = bos_id, eos_id
        self._stems, self._dtypes, lengths, hashes = [], [], [], []
        for meta in metas:
            for shard in meta["shards"]:
                stem = os.path.join(meta["directory"], shard.get("stem") or shard["tokens"][: -len(".tokens.npy")])
                if self.storage == "npy":
                    lengths.append(np.diff(np.load(f"{stem}.offsets.npy")))
                else:
                    lengths.append(np.load(f"{stem}.lengths.npy"))
                hashes.append(np.load(f"{stem}.hashes.npy"))
                if len(lengths[-1]) != shard["num_documents"] or len(hashes[-1]) != shard["num_documents"]:
                    raise ConfigError(f"source '{name}': shard '{stem}' does not hold the {shard['num_documents']} "
                                      "documents its index says; re-run `jaxcpt tokenize` into a new directory")
                self._stems.append(stem)
                self._dtypes.append(np.dtype(meta["dtype"]).newbyteorder("<"))
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)  # [docs]
        self.hashes = np.concatenate(hashes).astype(np.uint64) if hashes else np.zeros(0, np.uint64)  # [docs]
        self.shard_starts = np.concatenate([[0], np.cumsum([len(x) for x in lengths])]).astype(np.int64)  # [shards+1]
        self._open = None

    def __getstate__(self):
        return {**self.__dict__, "_open": None}

    @property
    def num_documents(self) -> int:
        return len(self.lengths)

    def _opened(self):
        if self._open is None:
            if self.storage == ARRAY_RECORD:
                from grain.sources import ArrayRecordDataSource

                self._open = ArrayRecordDataSource([f"{s}.array_record" for s in self._stems])
            else:
                self._open = [(np.load(f"{s}.tokens.npy", mmap_mode="r"), np.load(f"{s}.offsets.npy"))
                              for s in self._stems]
        return self._open

    def tokens(self, doc: int) -> np.ndarray:
        """[n] int32: document ``doc`` with BOS/EOS added."""
        opened = self._opened()
        shard = int(np.searchsorted(self.shard_starts, doc, side="right")) - 1
        if self.storage == ARRAY_RECORD:
            ids = np.frombuffer(opened[int(doc)], dtype=self._dtypes[shard])  # one source over all shards
        else:
            tokens, offsets = opened[shard]
            local = doc - self.shard_starts[shard]
            ids = tokens[offsets[local] : offsets[local + 1]]
        out = np.empty(len(ids) + self.extra, np.int32)  # [n]
        start = 0
        if self.bos_id is not None:
            out[0], start = self.bos_id, 1
        out[start : start + len(ids)] = ids
        if self.eos_id is not None:
            out[-1] = self.eos_id
        return out


def _shards_fingerprint(meta: dict) -> str:
    """What the documents' order depends on: the shards' names, document and token counts."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for s in meta["shards"]:
        digest.update(f"{s.get('stem') or s['tokens']}|{s['num_documents']}|{s['num_tokens']}\n".encode())
    return digest.hexdigest()


class SourceRows:
    """Packed rows of one source at (epoch, offset), by index arithmetic (see the module docstring)."""

    def __init__(self, source: IndexedSource, train_docs: np.ndarray, seed: int | None):
        self.source, self.seed = source, seed  # seed None: documents in index order (evaluation rows)
        self.train_docs = train_docs  # [train docs] int64, ascending document indices
        pairs = source.lengths[train_docs] + source.extra - 1  # [train docs]
        self.pairs_per_epoch = int(np.maximum(pairs, 0).sum())  # the same in every epoch: a permutation

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(documents in epoch order [docs], their pair offsets [docs + 1])."""
        return _epoch_order(self, epoch)

    def row(self, epoch: int, offset: int, seq_len: int) -> dict[str, np.ndarray]:
        """The row of pairs [offset, offset + seq_len) of epoch ``epoch``: inputs, targets, segment_ids,
        positions, each [seq_len] int32."""
        docs, starts = self._epoch(epoch)
        row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
        i = int(np.searchsorted(starts, offset, side="right")) - 1
        filled, segment = 0, 0
        while filled < seq_len and i < len(docs):
            a = offset + filled - int(starts[i])  # first pair of this document in the row
            b = min(int(starts[i + 1] - starts[i]), a + seq_len - filled)  # end, exclusive
            if b > a:
                tokens = self.source.tokens(int(docs[i]))  # [n]
                segment += 1
                n = b - a
                row["inputs"][filled : filled + n] = tokens[a:b]
                row["targets"][filled : filled + n] = tokens[a + 1 : b + 1]
                row["segment_ids"][filled : filled + n] = segment
                row["positions"][filled : filled + n] = np.arange(n)
                filled += n
            i += 1
        return row


@functools.lru_cache(maxsize=8)
def _epoch_order(rows: SourceRows, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    docs = rows.train_docs  # [docs]
    if rows.seed is not None:
        rng = np.random.default_rng(stable_seed(rows.seed, rows.source.name, "epoch", epoch))
        docs = docs[rng.permutation(len(docs))]
    pairs = np.maximum(rows.source.lengths[docs] + rows.source.extra - 1, 0)  # [docs]
    return docs, np.concatenate([[0], np.cumsum(pairs)]).astype(np.int64)  # [docs], [docs + 1]


def training_documents(source: IndexedSource, held_out: HeldOut) -> np.ndarray:
    """Ascending indices of the documents a source trains on: not held out by any source."""
    hashes = source.hashes
    keep = hashes >= np.uint64(min(held_out.threshold, 2**64 - 1)) if held_out.threshold else np.ones(len(hashes), bool)
    if held_out.hashes:
        keep &= ~np.isin(hashes, np.fromiter(held_out.hashes, np.uint64, len(held_out.hashes)))
    return np.flatnonzero(keep).astype(np.int64)


def write_array_record_shard(directory: str, stem: str, ids: list, hashes: list[int], dtype: str) -> None:
    """One shard: ``{stem}.array_record`` (one record per document, group size 1 so a record is read alone,
    ids as little-endian bytes of ``dtype``), ``{stem}.lengths.npy`` and ``{stem}.hashes.npy``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    little = np.dtype(dtype).newbyteorder("<")
    writer = ArrayRecordWriter(os.path.join(directory, f"{stem}.array_record"), "group_size:1")
    for doc in ids:
        writer.write(np.asarray(doc, little).tobytes())
    writer.close()
    np.save(os.path.join(directory, f"{stem}.lengths.npy"), np.array([len(doc) for doc in ids], np.int64))
    np.save(os.path.join(directory, f"{stem}.hashes.npy"), np.array(hashes, np.uint64))


def write_array_record_shards(
    directory: str,
    documents: list[tuple[list[int], str]],
    *,
    tokenizer_meta: dict,
    docs_per_shard: int,
    source_fingerprint: str,
) -> dict:
    """Write (token ids, text) documents as ArrayRecord shards plus their index; returns the index.

    Shard ``k`` holds documents ``[k * docs_per_shard, ...)`` in the given order (one record each,
    group size 1 so a record is read alone), with ``.lengths.npy`` and ``.hashes.npy`` beside it.
    ``jaxcpt_tokenized.json`` is written last, atomically: its presence means complete.
    """
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, TOKENIZED_META)):
        raise ConfigError(f"'{directory}' already holds token shards; choose a new directory or delete them")
    shards = []
    for k, first in enumerate(range(0, max(len(documents), 1), docs_per_shard)):
        part = documents[first : first + docs_per_shard]
        if not part:
            break
        stem = f"shard-{k:05d}"
        write_array_record_shard(directory, stem, [ids for ids, _ in part], [text_hash(text.encode()) for _, text in part],
                                 tokenizer_meta["dtype"])
        shards.append({"stem": stem, "num_documents": len(part), "num_tokens": int(sum(len(i) for i, _ in part))})
    meta = {
        "format": TOKENIZED_FORMAT,
        "storage": ARRAY_RECORD,
        **tokenizer_meta,
        "source_fingerprint": source_fingerprint,
        "num_documents": sum(s["num_documents"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "shards": shards,
    }
    import json

    tmp = os.path.join(directory, TOKENIZED_META + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(directory, TOKENIZED_META))
    return meta

"""Packing documents into fixed-length rows, and rows into batches.

Next-token pairs are made per document BEFORE packing: a document ``d`` (BOS/EOS added)
becomes ``inputs = d[:-1]``, ``targets = d[1:]``, cut into pieces of at most ``seq_len``.
Packing then only moves whole pairs, so no target is ever the first token of another
document, every non-padding position has a real target, and the loss mask is simply
``segment_ids > 0``. A piece of a split document is its own segment (positions restart at
0), like the rest of its document it cannot attend across the row boundary anyway.

Two packers, both Grain's (they emit ``*_segment_ids`` 1, 2, 3 ... per piece in a row, 0 on
padding, and ``*_positions`` restarting at 0 per piece):

- ``first_fit``: ``FirstFitPackIterDataset`` places whole pieces in the first of
  ``packing_bins`` rows with room, padding the rest. Documents longer than a row are split.
- ``concat_split``: ``ConcatThenSplitIterDataset`` concatenates and cuts at row boundaries:
  no padding, but most documents are split across rows. Its checkpoint state holds tuples,
  which JSON turns into lists; ``jaxcpt.data.pipeline`` encodes states so they survive.
"""

from __future__ import annotations

import grain
import grain.experimental as gx
import numpy as np

ROW_KEYS = ("inputs", "targets", "segment_ids", "positions")  # each [seq] int32


def document_pieces(tokens: np.ndarray, mask: np.ndarray | None = None, *, seq_len: int) -> list[dict[str, np.ndarray]]:
    """tokens [n] int32 (one document, BOS/EOS added) -> pieces {"inputs": [<=seq], "targets": [<=seq]}.

    With ``mask`` [n] (instruction documents: 1 on answer tokens), pieces also carry "loss_mask" [<=seq],
    the mask of each target token.
    """
    n = len(tokens) - 1  # next-token pairs in the document
    pieces = []
    for start in range(0, n, seq_len):
        end = min(start + seq_len, n)
        piece = {"inputs": tokens[start:end], "targets": tokens[start + 1 : end + 1]}
        if mask is not None:
            piece["loss_mask"] = mask[start + 1 : end + 1]  # [<=seq]: does the target train?
        pieces.append(piece)
    return pieces


class DocumentSplit:
    """``document_pieces`` at ``seq_len`` for documents of at least ``min_tokens`` tokens; shorter ones give none.

    ``data.sources[].min_doc_tokens`` (ProLong-style long-document sources). A source whose last
    ``max_short`` documents were all too short stops the run instead of spinning on it forever
    (data.max_documents_without_tokens; 0 = no check). Picklable: Grain workers receive it.
    """

    def __init__(self, seq_len: int, min_tokens: int = 0, *, source: str = "", max_short: int = 0):
        self.seq_len, self.min_tokens, self.source, self.max_short = seq_len, min_tokens, source, max_short
        self._short = 0  # consecutive documents below min_tokens

    def __call__(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        if len(tokens) < self.min_tokens:
            self._short += 1
            if self.max_short and self._short >= self.max_short:
                from jaxcpt.errors import UserError

                raise UserError(f"source '{self.source}': the last {self._short} documents are all shorter than "
                                f"min_doc_tokens={self.min_tokens}, so the source yields no rows; lower "
                                "data.sources[].min_doc_tokens or point the source at longer documents "
                                "(data.max_documents_without_tokens sets this limit)")
            return []
        self._short = 0
        return document_pieces(tokens, mask, seq_len=self.seq_len)


def _finish_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if "loss_mask" in packed:  # instruction rows: the answer tokens' mask (0 on padding, as packed)
        return {**_finish_row({k: v for k, v in packed.items() if k != "loss_mask"}),
                "loss_mask": packed["loss_mask"].astype(np.float32, copy=False)}  # [seq]
    return {
        "inputs": packed["inputs"].astype(np.int32, copy=False),  # [seq]
        "targets": packed["targets"].astype(np.int32, copy=False),  # [seq]
        "segment_ids": packed["inputs_segment_ids"].astype(np.int32, copy=False),  # [seq], 0 = padding
        "positions": packed["inputs_positions"].astype(np.int32, copy=False),  # [seq]
    }


def pack(
    pieces: grain.IterDataset, *, packing: str, seq_len: int, bins: int, seed: int, shuffle_bins: bool,
    masked: bool = False,
) -> grain.IterDataset:
    """Pieces -> rows {inputs, targets, segment_ids, positions}, each [seq_len] int32 (+ loss_mask when masked)."""
    lengths = {"inputs": seq_len, "targets": seq_len, **({"loss_mask": seq_len} if masked else {})}
    if packing == "first_fit":
        rows = gx.FirstFitPackIterDataset(
            pieces, length_struct=lengths, num_packing_bins=bins, seed=seed, shuffle_bins=shuffle_bins
        )
    elif packing == "concat_split":
        rows = gx.ConcatThenSplitIterDataset(pieces, length_struct=lengths)
    else:
        raise ValueError(f"unknown packing {packing!r}")
    return rows.map(_finish_row)


def row_weight_count(segment_ids: np.ndarray, mode: str) -> int:
    """What one row adds to its source's share: non-padding tokens, document pieces, or 1 row."""
    if mode == "tokens":
        return int(np.count_nonzero(segment_ids))
    if mode == "documents":
        return int(segment_ids.max(initial=0))  # segment ids run 1..k in a row
    return 1


def stack_rows(rows: list[dict], batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Rows -> the trainer's batch; rows missing at the end of a finite stream are all padding.

    The mixer's bookkeeping rides along: ``_worker`` (int), ``_bad`` and ``_pass_tokens`` (the last row's).
    """
    batch = {k: np.zeros((batch_size, seq_len), np.int32) for k in ROW_KEYS}  # each [batch, seq]
    source = np.zeros((batch_size,), np.int32)  # [batch]; a padding row says 0 but has no loss
    batch["loss_mask"] = np.zeros((batch_size, seq_len), np.float32)  # [batch, seq]
    for i, row in enumerate(rows):
        for k in ROW_KEYS:
            batch[k][i] = row[k]
        source[i] = row["source"]
        # Text rows train on every token; instruction rows carry their answer mask (jaxcpt.data.chat).
        batch["loss_mask"][i] = row["loss_mask"] if "loss_mask" in row else (row["segment_ids"] > 0)
    batch["source"] = source
    if rows and "_bad" in rows[-1]:
        batch["_worker"] = np.int64(rows[-1]["_worker"])
        batch["_bad"] = rows[-1]["_bad"]  # [sources, kinds + 1]
        batch["_pass_tokens"] = rows[-1]["_pass_tokens"]  # [sources]
    return batch

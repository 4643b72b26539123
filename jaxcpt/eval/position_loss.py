"""Held-out loss by position: what a long-context stage buys and what it costs, at every evaluation.

A context extension should lower the loss on the late positions of long documents (the
model now uses the far context) without raising it on the early ones (short-context
forgetting). The plain held-out loss averages both away, so with ``eval.position_buckets``
every evaluation also measures, per source, the mean next-token loss over positions
``[0, e1), [e1, e2), ..., [e_k, L)`` of long held-out documents, where ``e1 < e2 < ...`` are
the configured edges below ``L``, the longest row the run trains (over every data stage).
The defaults (4k, 16k, 32k, 64k) fit an 8k -> 32k or 64k extension; a demo uses small edges.

The rows: each is the first ``L`` tokens of ONE held-out document (BOS included; not packed,
so position p is the document's p-th token), taken from the source's held-out split in file
order among the documents long enough to reach past the first edge; a shorter one is padded
and counts only in the buckets it reaches (``tokens`` says how many positions each bucket
averaged). The same rows every evaluation, so the values compare over steps and against step 0
(``jaxcpt report``).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcpt.train.loss import model_token_loss_sums

log = logging.getLogger(__name__)
SCAN_DOCUMENTS_PER_ROW = 100  # held-out documents read per wanted row before giving up on finding long ones


def bucket_ranges(edges: list[int], length: int) -> list[tuple[int, int]]:
    """[(lo, hi)] position ranges: edges below ``length`` cut [0, length)."""
    cuts = [0, *sorted(e for e in set(edges) if 0 < e < length), length]
    return list(zip(cuts[:-1], cuts[1:]))


def _short(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def bucket_name(lo: int, hi: int) -> str:
    """'0-4k', '4k-16k', ...: the key in metrics.jsonl and TensorBoard (eval/positions/SOURCE/NAME/loss)."""
    return f"{_short(lo)}-{_short(hi)}"


def position_eval_step(params, batch, *, graphdef, chunk_size: int, ranges: tuple[tuple[int, int], ...]):
    """(loss sums [K], tokens [K]) over the K position ranges of ``batch`` ([B, T] arrays, T = the last hi).

    One forward pass; the output projection and loss run on each static slice of positions
    once, so the cost is that of a plain evaluation.
    """
    model = nnx.merge(graphdef, params)
    hidden, _ = model.hidden_states_and_router(batch["inputs"], batch["segment_ids"], batch["positions"])  # [B, T, E]
    losses, tokens = [], []
    for lo, hi in ranges:
        mask = batch["loss_mask"][:, lo:hi]  # [B, hi - lo]
        loss_rows, _ = model_token_loss_sums(model, hidden[:, lo:hi], batch["targets"][:, lo:hi], mask,
                                             chunk_size=chunk_size)  # [B]
        losses.append(loss_rows.sum())
        tokens.append(mask.astype(jnp.float32).sum())
    return jnp.stack(losses), jnp.stack(tokens)  # [K], [K]


class _ScanDone(Exception):
    """Raised by FirstPiece after its document limit: ends the search for long held-out documents."""


class FirstPiece:
    """A document's first ``length`` next-token pairs, if it has more than ``min_pairs`` of them; else nothing.

    Raises ``_ScanDone`` at the ``limit``-th document (0 = no limit): a held-out split of short
    documents is not read to its end.
    """

    def __init__(self, length: int, min_pairs: int, limit: int = 0):
        self.length, self.min_pairs, self.limit, self.seen = length, min_pairs, limit, 0

    def __call__(self, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[dict]:
        self.seen += 1
        if self.limit and self.seen > self.limit:
            raise _ScanDone
        if len(tokens) - 1 <= self.min_pairs:
            return []
        end = min(len(tokens) - 1, self.length)
        piece = {"inputs": tokens[:end], "targets": tokens[1 : end + 1]}
        if mask is not None:
            piece["loss_mask"] = mask[1 : end + 1]
        return [piece]


def _row(piece: dict, length: int, source: int) -> dict[str, np.ndarray]:
    n = len(piece["inputs"])
    row = {k: np.zeros(length, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}  # each [T]
    row["inputs"][:n], row["targets"][:n] = piece["inputs"], piece["targets"]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["loss_mask"] = np.zeros(length, np.float32)  # [T]
    row["loss_mask"][:n] = piece.get("loss_mask", np.ones(n, np.float32))
    row["source"] = source
    return row


def build_position_batches(data_cfg, *, length: int, min_pairs: int, rows: int, batch_size: int,
                           process_index: int | None = None, process_count: int | None = None) -> dict[str, list[dict]]:
    """{source: batches of [batch_size, length]} of long held-out documents (see the module docstring).

    Sources without a held-out split, or without a document longer than ``min_pairs`` among the
    first ``SCAN_DOCUMENTS_PER_ROW * rows`` held-out ones, are absent (with a warning).
    """
    from jaxcpt.data import pipeline

    if data_cfg.elastic:  # indexed sources: the same rows, read from the index
        from jaxcpt.data.elastic_sources import build_position_batches as from_index

        return from_index(data_cfg, length=length, min_pairs=min_pairs, rows=rows, batch_size=batch_size,
                          host=pipeline._host(process_index, process_count))
    plan = pipeline._plan(data_cfg, length, process_index, process_count)
    out = {}
    for i, src in enumerate(data_cfg.sources):
        if not src.has_eval_split:
            continue
        pieces_ds = pipeline._source_rows(plan, i, split="eval", seed=data_cfg.seed,
                                          counter=pipeline._counter(data_cfg, src.name), host=(0, 1),
                                          pieces=FirstPiece(length, max(min_pairs, src.min_doc_tokens - 1),
                                                            limit=SCAN_DOCUMENTS_PER_ROW * rows))
        found = []
        try:
            for piece in itertools.islice(pieces_ds.__iter__(), rows):
                found.append(_row(piece, length, i))
        except _ScanDone:  # the splitter read its limit of held-out documents
            pass
        if len(found) < rows:
            log.warning("source '%s': %d held-out documents longer than %d tokens for the position buckets "
                        "(eval.position_rows=%d)", src.name, len(found), min_pairs, rows)
        if not found:
            continue
        mine = found[plan.process_index :: plan.process_count]
        num_batches = math.ceil(math.ceil(len(found) / plan.process_count) / batch_size)
        out[src.name] = [pipeline.stack_rows(mine[b * batch_size : (b + 1) * batch_size], batch_size, length)
                         for b in range(num_batches)]
    return out


class PositionEval:
    """The bucketed evaluation of a run: its rows, ranges and jitted step (built once at set-up)."""

    def __init__(self, batches: dict[str, list[dict]], ranges: list[tuple[int, int]], step_fn):
        self.batches, self.ranges, self.step_fn = batches, ranges, step_fn
        self.names = [bucket_name(lo, hi) for lo, hi in ranges]

    def evaluate(self, params, to_global) -> dict[str, dict[str, dict]]:
        """{source: {bucket: {loss, tokens}}} (every host calls it; the sums are global)."""
        results = {}
        for source, batches in self.batches.items():
            loss = np.zeros(len(self.ranges))
            tokens = np.zeros(len(self.ranges))
            for batch in batches:
                batch_loss, batch_tokens = self.step_fn(params, to_global(batch))
                loss += np.asarray(jax.device_get(batch_loss), np.float64)
                tokens += np.asarray(jax.device_get(batch_tokens), np.float64)
            results[source] = {name: {"loss": float(l / t), "tokens": int(t)}
                               for name, l, t in zip(self.names, loss, tokens) if t > 0}
        return results


def build_position_eval(cfg, program, data_cfg, shapes) -> PositionEval | None:
    """eval.position_buckets for this run, or None when off (no edge below the longest trained row, or no split)."""
    edges = list(cfg.eval.position_buckets)
    seq_lens = shapes.seq_lens() if shapes is not None else [cfg.data.seq_len]
    length = max(seq_lens)
    ranges = bucket_ranges(edges, length)
    if not edges or len(ranges) < 2 or not any(s.has_eval_split for s in data_cfg.sources):
        return None
    rows_at_length = max((shape.rows for _, shape in shapes.changes if shape.seq_len == length),
                         default=cfg.train.batch_size) if shapes is not None else cfg.train.batch_size
    batch_size = max(1, rows_at_length // jax.process_count())
    batches = build_position_batches(data_cfg, length=length, min_pairs=ranges[0][1], rows=cfg.eval.position_rows,
                                     batch_size=batch_size)
    if not batches:
        return None
    shardings = program.batch_shardings
    step_fn = jax.jit(functools.partial(position_eval_step, graphdef=program.graphdef,
                                        chunk_size=cfg.train.loss_chunk_size, ranges=tuple(ranges)),
                      in_shardings=(program.state_shardings["params"], shardings))
    return PositionEval(batches, ranges, step_fn)

"""Rows whose length follows the step (``data.stages[].seq_len``), and batches whose shape does.

``StagedSourceRows`` is one source's packed rows when a stage changes the sequence length.
Within a stage it is the usual chain (documents -> ``TokenizeDataset`` cutting pieces of at most
seq_len -> Grain's first-fit packer). The mixer tells it the step of the next row
(``prepare(step)``); when that step's seq_len differs from the current one, the source *repacks
from where it stands*:

1. the rows of the packer's current round that were not handed out yet are taken apart into
   their pieces (one per segment id), in order;
2. then the pieces the tokenizer had cut but the packer had not read (the rest of its batch);
3. these carried pieces come first in the new packer (cut again if longer than the new row);
   the documents after them are tokenized and cut at the new length.

So no document is lost or repeated, and a document already cut at the old length keeps its
cuts. Why not Grain's packer alone: it has one row length for its lifetime and no way to
hand back what it holds; why not our own packer: Grain's first-fit is the one every other run
uses, so a staged run's rows within a stage are exactly an unstaged run's.

Resume: the state is ``{seq_len, boundary, rows}``; ``boundary`` is the previous segment's own
state at the switch (None for the first), from which the carried pieces are rebuilt
deterministically (steps 1-2 replayed), so a checkpoint holds no token arrays.

``StepBatches`` groups the mixer's rows into the batch of their step (the mixer marks each
row with ``_step``): ``rows(step) / hosts`` rows of ``seq_len(step)`` tokens.
"""

from __future__ import annotations

import grain
import numpy as np

from jaxcpt.data.packing import stack_rows
from jaxcpt.data.stage_shapes import ShapeSchedule


def row_pieces(row: dict) -> list[dict]:
    """A packed row -> its pieces {inputs, targets[, loss_mask]}, one per segment id, in packing order."""
    segments = row["segment_ids"]  # [seq], 1..k, 0 = padding
    keys = ("inputs", "targets", "loss_mask") if "loss_mask" in row else ("inputs", "targets")
    pieces = []
    for s in range(1, int(segments.max(initial=0)) + 1):
        where = np.flatnonzero(segments == s)  # contiguous: the packer writes a piece in one run
        if where.size:
            dtype = {"loss_mask": np.float32}  # as the tokenizer cut them (jaxcpt.data.chat: a float mask)
            pieces.append({k: row[k][where[0] : where[-1] + 1].astype(dtype.get(k, np.int32)) for k in keys})
    return pieces


def cut_pieces(pieces: list[dict], seq_len: int) -> list[dict]:
    """Pieces longer than ``seq_len`` (a stage that shortens rows) cut into consecutive pieces that fit."""
    out = []
    for piece in pieces:
        n = len(piece["inputs"])
        out += [{k: v[a : a + seq_len] for k, v in piece.items()} for a in range(0, n, seq_len)] if n > seq_len else [piece]
    return out


class _CarriedPieces(grain.IterDataset):
    """``carried`` pieces first, then the tokenizer's; state {carried: next index, tokens: tokenizer state}."""

    def __init__(self, tokens: grain.IterDataset, carried: list[dict]):
        super().__init__(tokens)
        self.carried = carried

    def __iter__(self):
        return _CarriedIterator(self._parent.__iter__(), self.carried)


class _CarriedIterator(grain.DatasetIterator):
    def __init__(self, parent, carried: list[dict]):
        super().__init__(parent)
        self._carried, self._next = carried, 0

    def __next__(self):
        if self._next < len(self._carried):
            self._next += 1
            return self._carried[self._next - 1]
        return next(self._parent)

    def get_state(self) -> dict:
        return {"carried": self._next, "tokens": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._next = int(state["carried"])
        self._parent.set_state(state["tokens"])

    def take_rest(self) -> tuple[list[dict], dict]:
        """Every piece already read but not yet handed out, and the documents' position after them."""
        rest, self._next = self._carried[self._next :], len(self._carried)
        pieces, docs_state = self._parent.take_buffered()
        return rest + pieces, docs_state


class StagedSourceRows(grain.IterDataset):
    """One source's rows of ``shapes.at(step).seq_len`` tokens (see the module docstring).

    ``tokenize(docs, split_fn)`` and ``split(seq_len)`` build the tokenizer stage; ``pack(pieces,
    seq_len=)`` the packer (functools.partials of module-level callables: Grain pickles this
    dataset into its worker processes).
    """

    def __init__(self, docs: grain.IterDataset, *, tokenize, split, pack, shapes: ShapeSchedule, first_step: int):
        super().__init__(docs)  # the documents are a parent, so Grain's worker slicing reaches them
        self.tokenize, self.split, self.pack = tokenize, split, pack
        self.shapes, self.first_step = shapes, first_step

    def __iter__(self):
        return _StagedIterator(self)

    def __str__(self) -> str:
        return f"StagedSourceRows(seq_lens={self.shapes.seq_lens()})"


class _StagedIterator(grain.DatasetIterator):
    def __init__(self, ds: StagedSourceRows):
        super().__init__()
        self._ds = ds
        self._open(ds.shapes.at(ds.first_step).seq_len, boundary=None, carried=[], docs_state=None)

    def _chain(self, seq_len: int, carried: list[dict]):
        """(pieces dataset, rows dataset) of one segment: carried pieces, then documents cut at ``seq_len``."""
        ds = self._ds
        pieces = _CarriedPieces(ds.tokenize(ds._parent, split_fn=ds.split(seq_len)), carried)
        return pieces, ds.pack(pieces, seq_len=seq_len)

    def _open(self, seq_len: int, *, boundary: dict | None, carried: list[dict], docs_state: dict | None) -> None:
        _, rows = self._chain(seq_len, carried)
        self._rows = rows.__iter__()
        if docs_state is not None:  # the new segment starts where the old one's documents stood
            self._rows.set_state({"parent": {"carried": 0, "tokens": {"parent": docs_state, "next": 0}},
                                  "next_row": 0, "counter": 0})
        self._seq_len, self._boundary = seq_len, boundary

    def _carried(self, state: dict, seq_len: int) -> tuple[list[dict], dict]:
        """What a segment in ``state`` holds but has not handed out, cut for ``seq_len``; and the documents' position."""
        carried = [] if state["boundary"] is None else self._carried(state["boundary"], state["seq_len"])[0]
        pieces_ds, rows_ds = self._chain(state["seq_len"], carried)
        rows = rows_ds.__iter__()
        rows.set_state(state["rows"])
        pieces = []
        while rows.get_state()["next_row"]:  # the packer's current round: rows not handed out yet
            try:
                pieces += row_pieces(next(rows))
            except StopIteration:
                break
        rest = pieces_ds.__iter__()
        rest.set_state(rows.get_state()["parent"])  # where the packer's next round starts
        more, docs_state = rest.take_rest()
        return cut_pieces(pieces + more, seq_len), docs_state

    def prepare(self, step: int) -> None:
        """Called by the mixer before it reads this source's row for ``step``."""
        seq_len = self._ds.shapes.at(step).seq_len
        if seq_len != self._seq_len:
            boundary = self.get_state()
            carried, docs_state = self._carried(boundary, seq_len)
            self._open(seq_len, boundary=boundary, carried=carried, docs_state=docs_state)

    def __next__(self):
        return next(self._rows)

    def get_state(self) -> dict:
        return {"seq_len": self._seq_len, "boundary": self._boundary, "rows": self._rows.get_state()}

    def set_state(self, state: dict) -> None:
        carried = [] if state["boundary"] is None else self._carried(state["boundary"], int(state["seq_len"]))[0]
        self._open(int(state["seq_len"]), boundary=state["boundary"], carried=carried, docs_state=None)
        self._rows.set_state(state["rows"])


class LocalRows:
    """Rows this host feeds at a step: global rows / hosts (picklable, for the mixer in Grain workers)."""

    def __init__(self, shapes: ShapeSchedule, process_count: int):
        self.shapes, self.process_count = shapes, process_count

    def __call__(self, step: int) -> int:
        return self.shapes.at(step).rows // self.process_count


class StepBatches(grain.IterDataset):
    """The mixer's rows (each marked ``_step``) stacked into that step's batch of ``rows_at(step)`` rows."""

    def __init__(self, rows: grain.IterDataset, shapes: ShapeSchedule, process_count: int):
        super().__init__(rows)
        self.rows_at, self.shapes = LocalRows(shapes, process_count), shapes

    def __iter__(self):
        return _StepBatchIterator(self._parent.__iter__(), self)


class _StepBatchIterator(grain.DatasetIterator):
    def __init__(self, parent, ds: StepBatches):
        super().__init__(parent)
        self._ds = ds

    def __next__(self):
        first = next(self._parent)
        step = int(first["_step"])
        rows, count = [first], self._ds.rows_at(step)
        while len(rows) < count:
            try:
                row = next(self._parent)
            except StopIteration:  # a finite stream's last batch: the missing rows are padding
                break
            assert int(row["_step"]) == step, (row["_step"], step)
            rows.append(row)
        return stack_rows(rows, count, self._ds.shapes.at(step).seq_len)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)

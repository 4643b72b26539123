"""Mixture weights over training, and the token-weighted interleaver of per-source rows.

Each source is packed on its own, so every row comes from one source (and says which:
the trainer can report loss per source). For each next row, ``MixtureDataset`` picks the
source with the largest *credit*: after a row of ``n`` counted units (non-padding tokens
by default), every source ``s`` earns ``w_s * n`` and the chosen one pays ``n``. With
fixed weights the credit of ``s`` is exactly ``w_s * total - realised_s``, so this is
deficit scheduling: the realised shares stay within about one row of the targets at every
point of the stream, in tokens, however unequal the rows. Unlike cumulative deficits,
credits forget the past when the weights change (a source whose weight is 0 holds none),
so after a stage change the new weights hold from its first step rather than the stream
"catching up" on the old mixture. Grain's own ``mix`` counts elements, not tokens.

Rows map to optimizer steps by position: row ``r`` of the host's stream is in batch
``r // batch_size``. Batches are assembled where the mixer runs; with Grain workers,
worker ``w`` of ``W`` makes batches ``w, w + W, ...`` (Grain's multiprocess prefetch takes
from workers round-robin), so each worker knows the step of each of its rows and applies
the stage in effect there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grain
import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.data.config import DataConfig
from jaxcpt.data.documents import BadInputCounter, DocumentDataset
from jaxcpt.data.packing import row_weight_count
from jaxcpt.data.watch import ACTIVITY

log = logging.getLogger(__name__)


def first_step_below(lr_schedule: Callable, fraction: float, total_steps: int) -> int | None:
    """The first step after the learning-rate peak where ``lr < fraction * peak``; None if never.

    "After the peak" matters: during warmup the rate is also below any fraction of its peak.
    Optax schedules take an array of steps, so the whole schedule is evaluated in one call;
    other callables are evaluated step by step.
    """
    steps = np.arange(total_steps)
    try:
        lrs = np.asarray(lr_schedule(steps), dtype=np.float64)  # [total_steps]
        if lrs.shape != steps.shape:
            raise TypeError("not vectorised")
    except Exception:  # noqa: BLE001 - any scalar-only callable
        lrs = np.array([float(lr_schedule(int(s))) for s in steps], dtype=np.float64)
    peak_step = int(np.argmax(lrs))
    below = np.flatnonzero(lrs[peak_step:] < fraction * lrs[peak_step])
    return peak_step + int(below[0]) if below.size else None


def resolve_stage_steps(cfg: DataConfig, lr_schedule: Callable | None, total_steps: int | None) -> list[int | None]:
    """The start step of each of ``cfg.stages`` (None: an lr_below stage the schedule never reaches)."""
    starts: list[int | None] = []
    for i, stage in enumerate(cfg.stages):
        if stage.step is not None:
            starts.append(stage.step)
            continue
        if lr_schedule is None or total_steps is None:
            raise ConfigError(
                f"data.stages[{i}] starts at lr_below={stage.lr_below}, which needs the learning-rate schedule: "
                "pass lr_schedule= and total_steps= to build_train_iterator"
            )
        start = first_step_below(lr_schedule, stage.lr_below, total_steps)
        if start is None:
            log.warning(
                "data.stages[%d]: the learning rate never falls below %s of its peak; the stage never starts",
                i,
                stage.lr_below,
            )
        starts.append(start)
    return starts


def _normalised(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)  # [sources]
    return w / w.sum()


class WeightSchedule:
    """Normalised mixture weights as a function of the optimizer step (picklable, pure)."""

    def __init__(self, base: Sequence[float], stages: Sequence[tuple[int, int, Sequence[float]]]):
        self.base = _normalised(base)
        # Stable sort by start: stages given out of order still apply in time order.
        self.stages = [(int(s), int(r), _normalised(w)) for s, r, w in sorted(stages, key=lambda st: st[0])]
        # The mixture each stage ramps from: what the earlier stages give at its start.
        self._from = []
        for i, (start, _, _) in enumerate(self.stages):
            self._from.append(self._at(start, i))
        self._cache = (None, None)

    @classmethod
    def from_config(cls, cfg: DataConfig, stage_starts: list[int | None]) -> WeightSchedule:
        names = [s.name for s in cfg.sources]
        stages = [
            (start, stage.ramp_steps, [stage.weights.get(n, 0.0) for n in names])
            for stage, start in zip(cfg.stages, stage_starts)
            if start is not None and stage.weights  # a shape-only stage (no weights) keeps the mixture
        ]
        return cls([s.weight for s in cfg.sources], stages)

    def _at(self, step: int, num_stages: int) -> np.ndarray:
        weights = self.base
        for i in range(num_stages):
            start, ramp, target = self.stages[i]
            if step < start:
                break
            if ramp > 0 and step < start + ramp:
                weights = self._from[i] + (target - self._from[i]) * ((step - start) / ramp)
            else:
                weights = target
        return weights

    def at(self, step: int) -> np.ndarray:
        """[sources] weights summing to 1 at optimizer step ``step``."""
        if self._cache[0] != step:
            self._cache = (step, self._at(step, len(self.stages)))
        return self._cache[1]


def slice_document_datasets(ds: grain.IterDataset, sl: slice) -> None:
    """Hand a Grain worker slice to every DocumentDataset below ``ds``."""
    if isinstance(ds, DocumentDataset):
        ds.set_slice(sl)
        return
    for parent in ds.parents:
        slice_document_datasets(parent, sl)


class MixtureDataset(grain.IterDataset):
    """Rows of several per-source row datasets, interleaved by credit (see the module docstring).

    Each row gains ``source`` (int), ``_worker`` (the Grain worker that made it), ``_pass_tokens``
    ([sources], the tokens of one pass over that worker's share: jaxcpt.data.accounting) and ``_bad``
    ([sources, kinds + 1] int64, that worker's bad-input counts so far), which the training
    iterator strips. A source that is exhausted (``repeat: false``) ends the stream.
    """

    def __init__(
        self,
        parents: list[grain.IterDataset],
        *,
        schedule: WeightSchedule,
        count_mode: str,
        batch_size: int,
        counters: list[BadInputCounter],
        first_step: int = 0,
        stall_seconds: float = 0.0,
        rows_at: Callable[[int], int] | None = None,
    ):
        super().__init__(parents)
        self.rows_at = rows_at  # rows per step on this host when data.stages change the batch (jaxcpt.data.staged_rows)
        self.stall_seconds = stall_seconds  # data.stall_warn_seconds, for the watch in each worker process
        self.schedule = schedule
        self.count_mode = count_mode
        self.batch_size = batch_size
        self.counters = counters
        self.first_step = first_step
        self.worker_index, self.worker_count = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by Grain's multiprocess prefetch in each worker (see the module docstring)."""
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1
        for parent in self.parents:
            slice_document_datasets(parent, sl)

    def __iter__(self):
        return _MixtureIterator([p.__iter__() for p in self.parents], self)

    def __str__(self) -> str:
        return f"MixtureDataset(sources={len(self.parents)}, count={self.count_mode})"


class _MixtureIterator(grain.DatasetIterator):
    def __init__(self, parents: list[grain.DatasetIterator], ds: MixtureDataset):
        super().__init__(parents)
        self._ds = ds
        self._rows = 0  # rows this iterator has produced
        self._credit = np.zeros(len(parents))  # [sources]
        self._done = False
        self._cursor: tuple[int, int] | None = None  # (first row, step) of a batch, for rows_at

    def _step_of_next_row(self) -> int:
        ds = self._ds
        if ds.rows_at is None:
            return ds.first_step + ds.worker_index + ds.worker_count * (self._rows // ds.batch_size)
        # Rows per step vary (jaxcpt.data.stage_shapes): walk this worker's batches from its first one.
        row, step = self._cursor or (0, ds.first_step + ds.worker_index)
        while self._rows >= row + ds.rows_at(step):
            row, step = row + ds.rows_at(step), step + ds.worker_count
        self._cursor = (row, step)
        return step

    def __next__(self):
        ds = self._ds
        if self._done:
            raise StopIteration
        step = self._step_of_next_row()
        weights = ds.schedule.at(step)  # [sources]
        # Largest credit among sources with weight; argmax takes the lowest index on ties.
        source = int(np.argmax(np.where(weights > 0, self._credit, -np.inf)))
        ACTIVITY.begin("a row of the mixture", ds.stall_seconds)  # the outermost call in a Grain worker
        try:
            prepare = getattr(self._parents[source], "prepare", None)  # a seq_len stage (jaxcpt.data.staged_rows)
            if prepare is not None:
                prepare(step)
            row = next(self._parents[source])
        except StopIteration:
            self._done = True
            raise
        finally:
            ACTIVITY.end()
        n = row_weight_count(row["segment_ids"], ds.count_mode)
        self._credit += weights * n
        self._credit[source] -= n
        self._credit[weights == 0] = 0.0
        self._rows += 1
        row["source"] = source
        row["_worker"] = ds.worker_index
        row["_bad"] = np.array([c.snapshot() for c in ds.counters], np.int64)  # [sources, kinds + 1]
        row["_pass_tokens"] = np.array([c.pass_tokens for c in ds.counters], np.int64)  # [sources], 0: not known yet
        if ds.rows_at is not None:
            row["_step"] = step  # for jaxcpt.data.staged_rows.StepBatches
        return row

    def get_state(self) -> dict:
        return {
            "rows": self._rows,
            "credit": [float(c) for c in self._credit],
            "done": self._done,
            "sources": [p.get_state() for p in self._parents],
        }

    def set_state(self, state: dict) -> None:
        self._rows = int(state["rows"])
        self._cursor = None
        self._credit = np.array(state["credit"], dtype=np.float64)
        self._done = bool(state["done"])
        for parent, parent_state in zip(self._parents, state["sources"]):
            parent.set_state(parent_state)

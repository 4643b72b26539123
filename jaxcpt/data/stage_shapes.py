"""Sequence length and batch rows as part of a data stage: the shape of each step's batch.

A long-context stage trains longer rows from some step on (8k -> 32k), usually with fewer
rows per step::

    data:
      seq_len: 8192
      stages:
        - {step: 3000, seq_len: 32768, batch_size: 8}     # train.batch_size 32: tokens per step kept
        - {step: 3000, seq_len: 32768, batch_size: 32}    # or: rows kept (4x the tokens per step)

A stage that sets ``seq_len`` must also set ``batch_size`` (global rows per step): keeping the
tokens per step or the rows is the user's choice, and it changes what a step means, so it is
never guessed. ``ShapeSchedule`` gives (seq_len, rows) per optimizer step.

What stays the same across a shape change:

- **The learning-rate schedule counts optimizer steps**, not tokens: a stage that keeps the
  tokens per step keeps the two equal; one that changes them does not stretch the schedule.
- **The data position.** Each source repacks from where it stands (``jaxcpt.data.staged_rows``):
  the pieces already packed into rows of the old length but not yet trained, and the rest of
  the tokenizer's batch, are carried into the new packer first; the documents after them are
  then cut at the new length. No document is lost or repeated. A document that was already cut
  at the old length keeps those cuts (its pieces train as separate segments, positions
  restarting at 0); the documents read after the boundary are cut at the new length.
- **Resume.** A checkpoint inside either stage resumes exactly (the saved data state holds the
  old stream's position at the boundary, from which the carried pieces are rebuilt).

The elastic reader (``data.elastic: true``, ``jaxcpt.data.elastic``) needs none of this
repacking: its rows are windows of each source's concatenated next-token pairs, its position is
a count of pairs, so the first row of a new length starts at the pair after the last row of the
old one (a document cut there continues as a new segment) and the shape of step ``t`` is
``ShapeSchedule.at(t)``, like the mixture a function of the step; a resume may land on any step
and any host count whose share divides every stage's rows.

The train step compiles once per distinct shape (jit caches by shape). Checks at set-up:
every stage's rows split over hosts, micro-batches and the batch mesh axes; a ``context`` mesh
axis divides every stage's seq_len; a stage longer than the RoPE was trained for, with no
``model.rope`` change, gets a warning with the numbers.
"""

from __future__ import annotations

import bisect
import dataclasses

from jaxcpt.config import ConfigError
from jaxcpt.data.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Shape:
    seq_len: int  # tokens per row
    rows: int  # global rows per optimizer step

    @property
    def tokens(self) -> int:
        return self.seq_len * self.rows


class ShapeSchedule:
    """(seq_len, global rows) as a function of the optimizer step; piecewise constant, pure and picklable."""

    def __init__(self, base: Shape, changes: list[tuple[int, Shape]]):
        self.base = base
        self.changes = sorted(changes, key=lambda c: c[0])  # [(start step, shape from there on)]
        self._starts = [start for start, _ in self.changes]

    def at(self, step: int) -> Shape:
        i = bisect.bisect_right(self._starts, step)
        return self.base if i == 0 else self.changes[i - 1][1]

    @property
    def varies(self) -> bool:
        return any(shape != self.base for _, shape in self.changes)

    def segments(self, total_steps: int) -> list[tuple[int, int, Shape]]:
        """[(first step, end step, shape)] covering [0, total_steps), merged where the shape does not change."""
        edges = [0] + [s for s in self._starts if 0 < s < total_steps] + [total_steps]
        out: list[tuple[int, int, Shape]] = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            shape = self.at(lo)
            if out and out[-1][2] == shape:
                out[-1] = (out[-1][0], hi, shape)
            else:
                out.append((lo, hi, shape))
        return out

    def seq_lens(self) -> list[int]:
        return sorted({self.base.seq_len, *(shape.seq_len for _, shape in self.changes)})

    def describe(self) -> dict:
        """JSON for a data state's fingerprint: a saved stream fits only the same shapes."""
        return {"base": [self.base.seq_len, self.base.rows],
                "changes": [[start, shape.seq_len, shape.rows] for start, shape in self.changes]}


def stage_label(cfg: DataConfig, index: int) -> str:
    return f"data.stages[{index}]"


def resolve_shapes(cfg: DataConfig, *, batch_size: int, seq_len: int | None, stage_starts: list[int | None]) -> ShapeSchedule:
    """The shape schedule of ``cfg.stages`` (``stage_starts`` from ``mixture.resolve_stage_steps``).

    ``batch_size``: global rows per step before any stage (train.batch_size); ``seq_len``: the
    tokens per row before any stage (default data.seq_len).
    """
    base = Shape(cfg.seq_len if seq_len is None else int(seq_len), int(batch_size))
    timed = sorted(((start, i) for i, start in enumerate(stage_starts) if start is not None), key=lambda t: t[0])
    changes, current = [], base
    for start, i in timed:
        stage = cfg.stages[i]
        if not stage.changes_shape:
            continue
        if stage.seq_len is not None and stage.batch_size is None:
            keep_tokens = current.tokens / stage.seq_len
            hint = (f"batch_size: {int(keep_tokens)} keeps the {current.tokens:,} tokens per step "
                    f"({current.rows} x {current.seq_len}), " if keep_tokens.is_integer() and keep_tokens >= 1 else "")
            raise ConfigError(
                f"{stage_label(cfg, i)} sets seq_len: {stage.seq_len} but not batch_size: say how the batch follows "
                f"the new length ({hint}batch_size: {current.rows} keeps the rows). The learning-rate schedule counts "
                "steps either way")
        current = Shape(stage.seq_len or current.seq_len, stage.batch_size or current.rows)
        changes.append((start, current))
    return ShapeSchedule(base, changes)


def stage_seq_lens(cfg: DataConfig, seq_len: int | None = None) -> dict[str, int]:
    """{'data.seq_len': n, 'data.stages[i].seq_len': m, ...}: every row length a run may train, by config key."""
    out = {"data.seq_len": cfg.seq_len if seq_len is None else int(seq_len)}
    for i, stage in enumerate(cfg.stages):
        if stage.seq_len is not None:
            out[f"{stage_label(cfg, i)}.seq_len"] = stage.seq_len
    return out


def check_context_split(cfg: DataConfig, context: int, seq_len: int | None = None) -> None:
    """Every row length must split into 2 x context equal chunks (context parallelism's mirrored layout)."""
    if context <= 1:
        return
    multiple = 2 * context
    for key, length in stage_seq_lens(cfg, seq_len).items():
        if length % multiple:
            from jaxcpt.errors import UserError

            raise UserError(
                f"the 'context' mesh axis ({context}) does not divide {key}={length}: context parallelism cuts each "
                f"row into 2 x {context} = {multiple} equal chunks (two mirrored chunks per device, for causal load "
                f"balance); set {key} to a multiple of {multiple} (e.g. {-(-length // multiple) * multiple}) or change "
                "mesh.context")


def longest_drawn_rows(shapes: ShapeSchedule, schedule, total_steps: int | None):
    """[sources] the longest seq_len of a step at which each source has weight (0: never drawn).

    ``schedule``: the run's ``mixture.WeightSchedule``; ``total_steps`` None: past the last change of
    shape or weights, both go on as they are.
    """
    import numpy as np

    last = [start for start, _ in shapes.changes] + [start + ramp for start, ramp, _ in schedule.stages]
    end = total_steps or max(last + [0]) + 1
    longest = np.zeros(len(schedule.base), np.int64)  # [sources]
    for lo, hi, shape in shapes.segments(end):
        # Weights are linear between these steps (ramps), so a weight > 0 inside the stretch is > 0 at one of them.
        steps = {lo, hi - 1, *(t for start, ramp, _ in schedule.stages for t in (start, start + ramp) if lo <= t < hi)}
        drawn = np.any([schedule.at(t) > 0 for t in steps], axis=0)  # [sources]
        longest = np.where(drawn, np.maximum(longest, shape.seq_len), longest)
    return longest


def check_supported(cfg: DataConfig, shapes: ShapeSchedule) -> None:
    """Shape stages need a stream that can hand its unpacked pieces to a new packer (the streaming reader;
    the elastic one cuts its rows from a position in pairs, so any shape follows: jaxcpt.data.elastic)."""
    if len(shapes.seq_lens()) > 1 and cfg.packing != "first_fit":
        raise ConfigError(f"data.stages[].seq_len needs data.packing=first_fit (the repacking at a stage boundary "
                          f"carries first-fit rows' pieces over); this run has packing={cfg.packing}")


def check_host_split(cfg: DataConfig, shapes: ShapeSchedule, process_count: int) -> None:
    """Each host feeds an equal share of every step's rows."""
    for start, shape in shapes.changes:
        if shape.rows % process_count:
            raise ConfigError(f"a data stage at step {start} trains {shape.rows} rows per step, not a multiple of the "
                              f"{process_count} hosts (each feeds an equal share); set its batch_size to a multiple "
                              f"of {process_count}")


def check_stage_batches(shapes: ShapeSchedule, check_batch_split) -> None:
    """``check_batch_split(rows)`` (jaxcpt.sharding.layout, bound to the mesh) for every stage's rows, naming the stage."""
    from jaxcpt.errors import UserError

    for start, shape in shapes.changes:
        try:
            check_batch_split(shape.rows)
        except UserError as e:
            raise UserError(f"the data stage starting at step {start} (batch_size {shape.rows}): {e}") from None

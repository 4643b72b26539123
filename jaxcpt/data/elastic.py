"""The elastic training stream (``data.elastic: true``): the data position is the step number.

Every source is indexed (``jaxcpt.data.indexed``): its rows are a pure function of
(seed, source, epoch, offset, seq_len). The mixture is decided row by row for the GLOBAL batch
of each step by a deterministic credit rule (each row goes to the source with the largest
credit among those with weight; every source then gains its weight and the chosen one loses
1), so step ``t``'s batch is a function of the mixture state at ``t``: per source the position
``(epoch, offset)`` and the credit. Host ``h`` of ``H`` takes rows ``[h*B/H, (h+1)*B/H)`` of
the global batch ``B``; Grain worker ``w`` of ``W`` builds the steps ``t`` with ``(t - first)
% W == w`` (each worker walks the cheap allocation of every step and reads only its own rows).

A checkpoint holds that small global state (the same on every host), never a reader's
position, so a run resumes on any number of hosts or workers, with another seq_len, with
changed weights or stages, or with a source added:

- *Without repeating or skipping*: each source continues at its saved (epoch, offset).
  Within an epoch a source's rows are disjoint, consecutive windows of one permutation of its
  documents, so the rows trained before and after a resume are, per source, one unbroken run
  of windows from the start of epoch 0: no row is read twice and none is passed over before
  the source's epoch ends. Changing weights changes only how fast each source's position
  advances from the resume step on; it never moves a position.
- A source added on resume starts at epoch 0, offset 0 (its credit 0).
- A source removed from data.sources keeps its saved position in every later checkpoint
  (with a warning), so adding it back later continues where it stopped; a weight of 0 in a
  stage pauses a source the same way without removing it.
- A source whose shards changed (another fingerprint) or another data.seed cannot continue:
  an error names it; data.resume_mismatch=restart starts that source (every source, for a
  new seed) at epoch 0 and says that documents may repeat.

Row shape stages (``data.stages[].seq_len`` / ``batch_size``, ``jaxcpt.data.stage_shapes``):
step ``t`` has ``B(t)`` global rows of ``L(t)`` tokens, both read from the shape schedule, so a
shape is a function of the step like the mixture. Positions count next-token pairs, so a
source's first row of a new length starts at exactly the pair after its last row of the old
length: nothing is repacked and nothing is carried. A document that straddles that point trains
its pairs before it in the old-length row and the rest at the start of the new-length row (as
its own segment, positions from 0), as any document straddling a row boundary does within a
stage. The only pairs not trained are an epoch's tail shorter than one row of the length in
force when the source reaches it (the rule without stages too).

Which documents each source trains on (held out, ``data.sources[].min_doc_tokens``) is decided
from the index before the permutation: ``jaxcpt.data.elastic_sources``.

Streaming sources (JSONL, text, Parquet read in order) cannot be resumed elastically: they use
``jaxcpt.data.pipeline``'s checkpointed reader state, tied to the host and worker counts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import grain
import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.data.batches import eval_batches
from jaxcpt.data.config import DataConfig
from jaxcpt.data.elastic_sources import check_config, held_out_documents, indexed_sources, training_rows
from jaxcpt.data.indexed import SourceRows
from jaxcpt.data.mixture import WeightSchedule, resolve_stage_steps
from jaxcpt.data.packing import stack_rows
from jaxcpt.data.stage_shapes import ShapeSchedule, check_host_split, longest_drawn_rows, resolve_shapes
from jaxcpt.data.tokenize import token_byte_lengths
from jaxcpt.data.watch import ACTIVITY, InputWaitInterrupted

log = logging.getLogger(__name__)

STATE_FORMAT = "jaxcpt-elastic-data-v1"


@dataclasses.dataclass
class Position:
    """Where one source stands: its next row is pairs [offset, offset + seq_len) of epoch ``epoch``
    (seq_len: the step's, which data.stages may change)."""

    epoch: int = 0
    offset: int = 0  # next-token pairs into the epoch's concatenation
    credit: float = 0.0  # the mixture's running deficit for this source (in rows)
    rows: int = 0  # rows trained so far (all hosts)
    tokens: int = 0  # tokens trained so far = positions with loss (rows are full)
    fingerprint: str = ""  # the shards this position is into


class Allocator:
    """Decides every row of every global batch from the mixture state; deterministic and picklable."""

    def __init__(self, names: list[str], pairs_per_epoch: list[int], repeat: list[bool], schedule: WeightSchedule,
                 shapes: ShapeSchedule, positions: list[Position], step: int):
        self.names, self.pairs_per_epoch, self.repeat = names, pairs_per_epoch, repeat
        self.schedule, self.shapes = schedule, shapes  # weights and (seq_len, global rows) per step
        self.positions, self.step = positions, step
        self.exhausted: str | None = None  # the source (repeat: false) that ran out

    def next_step(self) -> list[tuple[int, int, int]] | None:
        """[(source, epoch, offset)] for each row of the global batch of ``self.step``; None at the end."""
        if self.exhausted:
            return None
        weights = self.schedule.at(self.step)  # [sources], sums to 1
        shape = self.shapes.at(self.step)
        credit = np.array([p.credit for p in self.positions])  # [sources]
        rows = []
        for _ in range(shape.rows):
            s = int(np.argmax(np.where(weights > 0, credit, -np.inf)))  # lowest index on ties
            pos = self.positions[s]
            if pos.offset + shape.seq_len > self.pairs_per_epoch[s]:  # the rest of the epoch is not a whole row
                if not self.repeat[s]:
                    self.exhausted = self.names[s]
                    return None
                pos.epoch, pos.offset = pos.epoch + 1, 0
            rows.append((s, pos.epoch, pos.offset))
            pos.offset += shape.seq_len  # the next row of this source starts at the next pair, whatever its length
            pos.rows += 1
            pos.tokens += shape.seq_len
            credit += weights
            credit[s] -= 1.0
            credit[weights == 0] = 0.0
        for pos, c in zip(self.positions, credit):
            pos.credit = float(c)
        self.step += 1
        return rows


def _assemble(rows: list[SourceRows], chosen: list[tuple[int, int, int]], seq_len: int) -> dict[str, np.ndarray]:
    """The batch of rows ``chosen`` [(source, epoch, offset)], stacked as the streaming reader stacks its rows."""
    return stack_rows([{**rows[s].row(epoch, offset, seq_len), "source": s} for s, epoch, offset in chosen],
                      len(chosen), seq_len)


class ElasticBatches(grain.IterDataset):
    """This host's batches from ``allocator``'s state on; Grain's multiprocess prefetch slices it by step."""

    def __init__(self, rows: list[SourceRows], allocator: Allocator, host: tuple[int, int]):
        super().__init__()
        self.rows, self.allocator, self.host = rows, allocator, host
        self.worker_index, self.worker_count = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1

    def __iter__(self):
        return _ElasticIterator(self)

    def __str__(self) -> str:
        return f"ElasticBatches(sources={len(self.rows)}, host={self.host})"


class _ElasticIterator(grain.DatasetIterator):
    def __init__(self, ds: ElasticBatches):
        super().__init__()
        self._ds = ds
        self._alloc = copy.deepcopy(ds.allocator)
        self._first = self._alloc.step

    def __next__(self):
        ds, alloc = self._ds, self._alloc
        h, hosts = ds.host
        while True:
            step = alloc.step
            shape = alloc.shapes.at(step)  # this step's (seq_len, global rows)
            chosen = alloc.next_step()
            if chosen is None:
                raise StopIteration
            if (step - self._first) % ds.worker_count == ds.worker_index:
                local = shape.rows // hosts  # check_host_split: every stage's rows split over the hosts
                return _assemble(ds.rows, chosen[h * local : (h + 1) * local], shape.seq_len)

    def get_state(self) -> dict:
        return {"step": self._alloc.step}  # the trainer's state is the allocator's (ElasticTrainIterator)

    def set_state(self, state: dict) -> None:
        raise NotImplementedError("an elastic stream is restored by rebuilding it from the mixture state")


def _ensure_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class ElasticTrainIterator:
    """The training batches of an elastic stream, with the TrainIterator interface the trainer uses."""

    def __init__(self, cfg: DataConfig, rows: list[SourceRows], schedule: WeightSchedule, stage_steps: list,
                 *, shapes: ShapeSchedule, host: tuple[int, int]):
        self.cfg, self.rows, self.schedule, self.stage_steps = cfg, rows, schedule, stage_steps
        self.shapes, self.host = shapes, host  # (seq_len, global rows) per step
        self.source_names = [s.name for s in cfg.sources]
        self.retired: dict[str, dict] = {}  # saved positions of sources no longer configured
        positions = [Position(fingerprint=r.source.fingerprint) for r in rows]
        self._start(positions, step=0)

    def _allocator(self, positions: list[Position], step: int) -> Allocator:
        return Allocator(self.source_names, [r.pairs_per_epoch for r in self.rows], [s.repeat for s in self.cfg.sources],
                         self.schedule, self.shapes, positions, step)

    def _start(self, positions: list[Position], step: int) -> None:
        self._alloc = self._allocator(positions, step)  # advanced in step with the batches handed out
        ds: grain.IterDataset = ElasticBatches(self.rows, self._allocator(copy.deepcopy(positions), step), self.host)
        if self.cfg.num_workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.num_workers,
                                                             per_worker_buffer_size=self.cfg.worker_buffer_size))
        self._batches = ds.__iter__()
        self._interrupted = self._waiting = False

    @property
    def step(self) -> int:
        return self._alloc.step

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            raise ValueError("this ElasticTrainIterator was closed")
        if self._interrupted:
            raise InputWaitInterrupted("the input pipeline was interrupted by a stop signal; save and stop")
        ACTIVITY.begin(f"the elastic batch for step {self.step + 1}", self.cfg.stall_warn_seconds)
        try:
            self._waiting = True
            raw = next(self._batches)
        except StopIteration:
            log.info("source '%s' (repeat: false) has no whole row left: the training stream ends", self._alloc.exhausted)
            raise
        except InputWaitInterrupted:
            self._interrupted = True
            raise
        finally:
            self._waiting = False
            ACTIVITY.end()
        self._alloc.next_step()
        return {k: np.array(v) if type(v) is not np.ndarray else v for k, v in raw.items()}

    def interrupt_if_waiting(self) -> None:
        if getattr(self, "_waiting", False) and self.host[1] == 1:
            raise InputWaitInterrupted(f"stop signal while waiting for the input pipeline: saving at step {self.step}")

    def bad_input_report(self) -> dict:
        return {}  # indexed shards were checked when they were written

    def bad_input_counts(self) -> dict[str, dict[str, int]]:
        return {name: {} for name in self.source_names}

    def documents_read(self) -> dict[str, int]:
        return {name: 0 for name in self.source_names}

    def accounting(self) -> dict[str, dict]:
        """{source: {rows, tokens_seen, tokens_trained, epochs}} trained so far over all hosts
        (``jaxcpt.data.accounting``): rows are full text rows, so every token seen is trained on;
        epochs are the exact fraction of the source's epochs. Removed sources keep their counts."""
        out = {name: {"rows": p["rows"], "tokens_seen": p["tokens"], "tokens_trained": p["tokens"],
                      "epochs": float(p["epoch"])} for name, p in self.retired.items()}
        for name, pos, r in zip(self.source_names, self._alloc.positions, self.rows):
            out[name] = {"rows": pos.rows, "tokens_seen": pos.tokens, "tokens_trained": pos.tokens,
                         "epochs": pos.epoch + pos.offset / max(r.pairs_per_epoch, 1), "pass_tokens": r.pairs_per_epoch}
        return out

    def get_state(self) -> dict:
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "seed": self.cfg.seed,
            # informative, the next step's shape: positions count pairs, so another seq_len or stage continues
            "seq_len": self.shapes.at(self.step).seq_len,
            "global_batch": self.shapes.at(self.step).rows,  # informative: any host count continues
            "sources": {**self.retired, **{n: dataclasses.asdict(p) for n, p in zip(self.source_names,
                                                                                    self._alloc.positions)}},
            "accounting": self.accounting(),  # global (the same on every host): jaxcpt.data.accounting
        }
        return json.loads(json.dumps(state))

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            if self.cfg.resume_mismatch != "restart":
                raise ConfigError(
                    f"the checkpoint's data state is {state.get('format')!r}, a streaming reader's position, which "
                    "data.elastic=true cannot continue (it is tied to the files each host read). Resume with "
                    "data.elastic=false, or set data.resume_mismatch=restart to start every source from its first "
                    "row at the saved step (documents may repeat)")
            step = int(state.get("step", 0))
            log.warning("streaming data state restored into an elastic stream: every source (and its accounting) starts "
                        "over at step %d",
                        step)
            self.close()
            # Counts start over too: a streaming state holds one host's counts, an elastic one is global.
            self._start([Position(fingerprint=r.source.fingerprint) for r in self.rows], step)
            return
        step, saved = int(state["step"]), dict(state["sources"])
        restart = self.cfg.resume_mismatch == "restart"
        if int(state["seed"]) != self.cfg.seed and not restart:
            raise ConfigError(f"the checkpoint's data order was drawn with data.seed={state['seed']}, this run has "
                              f"{self.cfg.seed}: another seed is another permutation, so positions do not carry over. "
                              "Resume with the saved seed, or set data.resume_mismatch=restart (documents may repeat)")
        positions = []
        for name, r in zip(self.source_names, self.rows):
            pos = saved.pop(name, None)
            if pos is None:
                log.info("source '%s' is new in this run: it starts at its first row at step %d", name, step)
                positions.append(Position(fingerprint=r.source.fingerprint))
                continue
            pos = Position(**pos)
            if pos.fingerprint != r.source.fingerprint or int(state["seed"]) != self.cfg.seed:
                if not restart:
                    raise ConfigError(
                        f"source '{name}': its shards changed since the checkpoint (fingerprint {pos.fingerprint} -> "
                        f"{r.source.fingerprint}), so its saved position (epoch {pos.epoch}, pair {pos.offset}) means "
                        "other documents. Point it at the saved shards, give the new shards another source name, or "
                        "set data.resume_mismatch=restart to start this source over (documents may repeat)")
                log.warning("source '%s': shards or seed changed; it starts over at its first row (documents may "
                            "repeat)", name)
                pos = Position(rows=pos.rows, tokens=pos.tokens, fingerprint=r.source.fingerprint)
            positions.append(pos)
        for name, pos in saved.items():
            log.warning("source '%s' is in the checkpoint (epoch %d, pair %d) but not in data.sources: its rows stop; "
                        "its position stays in later checkpoints, so adding it back continues there", name,
                        pos["epoch"], pos["offset"])
        self.retired = saved
        self.close()
        self._start(positions, step)

    def close(self) -> None:
        batches, self._batches = getattr(self, "_batches", None), None
        close = getattr(batches, "close", None)
        if close is not None:
            close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_elastic_train_iterator(cfg: DataConfig, *, batch_size: int, seq_len: int, lr_schedule=None,
                                 total_steps: int | None = None, host: tuple[int, int]) -> ElasticTrainIterator:
    check_config(cfg)
    sources, held_out = indexed_sources(cfg)
    stage_steps = resolve_stage_steps(cfg, lr_schedule, total_steps)
    schedule = WeightSchedule.from_config(cfg, stage_steps)
    shapes = resolve_shapes(cfg, batch_size=batch_size * host[1], seq_len=seq_len, stage_starts=stage_steps)
    check_host_split(cfg, shapes, host[1])
    rows = training_rows(cfg, sources, held_out, longest_drawn_rows(shapes, schedule, total_steps))
    return ElasticTrainIterator(cfg, rows, schedule, stage_steps, shapes=shapes, host=host)


def build_elastic_eval_batches(cfg: DataConfig, *, batch_size: int, seq_len: int,
                               host: tuple[int, int]) -> dict[str, list[dict[str, np.ndarray]]]:
    """{source: batches}: the first data.eval_rows rows of each held-out split, in index order, dealt to hosts."""
    check_config(cfg)
    sources, _ = indexed_sources(cfg)
    byte_lengths = token_byte_lengths(cfg.tokenizer) if cfg.tokenizer else None
    out = {}
    for i, (s, src) in enumerate(zip(cfg.sources, sources)):
        if not s.has_eval_split:
            continue
        rows = SourceRows(src, held_out_documents(s, src), seed=None)  # min_doc_tokens applied
        count = min(cfg.eval_rows, rows.pairs_per_epoch // seq_len)
        if count < cfg.eval_rows:
            log.warning("source '%s': the held-out split fills only %d of data.eval_rows=%d rows", s.name, count,
                        cfg.eval_rows)
        out[s.name] = eval_batches([{**rows.row(0, r * seq_len, seq_len), "source": i} for r in range(count)],
                                   batch_size=batch_size, seq_len=seq_len, host=host, byte_lengths=byte_lengths)
    return out

"""The training and evaluation data streams: sources -> documents -> tokens -> rows -> mixture -> batches.

Per source (``jaxcpt.data.documents``, ``tokenize``, ``packing``)::

    DocumentDataset (this host's / worker's share, epochs, held-out split, bad input)
      -> WindowShuffleDataset (shuffle_buffer documents, seeded per source)
      -> TokenizeDataset (batched tokenizer calls, BOS/EOS, next-token pieces <= seq_len)
      -> first-fit or concat-then-split packing into rows of seq_len

then ``MixtureDataset`` interleaves the sources' rows by token credit
(``jaxcpt.data.mixture``), optionally inside Grain worker processes (``num_workers``), and
stacks rows into batches there; ``TrainIterator`` hands them to the trainer, counting per source
the rows, tokens seen and trained on, and epochs (``jaxcpt.data.accounting``). What a stream
needs resolved first (files, special tokens, held-out documents, fingerprint) is ``jaxcpt.data.plan``.

Determinism and resume. Every shuffle is seeded from ``data.seed`` and the source name, so
the same config gives the same batches. ``get_state()`` is a small JSON-serialisable dict
(Grain's state with tuples and non-string keys tagged, so a JSON round trip restores it
exactly; see FACTS.md on ConcatThenSplit) plus a fingerprint of everything the stream
depends on. ``set_state()`` checks that fingerprint: a state from another host count,
worker count, file list, seed, seq_len, batch size or tokenizer does not fit this run. By
default that is an error naming what changed (each host's files, and the positions in
them, are a function of the host count, so no position maps onto a different split);
``data.resume_mismatch: restart`` instead starts a fresh stream shuffled by (seed, saved
step) at the saved step, so the mixture stages continue where they were.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Callable

import grain
import numpy as np

from jaxcpt.config import ConfigError
from jaxcpt.data.accounting import HostAccounting
from jaxcpt.data.batches import eval_batches
from jaxcpt.data.config import DataConfig
from jaxcpt.data.documents import BadInputCounter, DocumentDataset, pad_bad_counts, stable_seed
from jaxcpt.data.mixture import MixtureDataset, WeightSchedule, resolve_stage_steps
from jaxcpt.data.packing import DocumentSplit, document_pieces, pack, stack_rows
from jaxcpt.data.plan import _counter, _host, _limits, _plan, _Plan
from jaxcpt.data.plan import resolved_special_tokens  # noqa: F401  (the trainer imports it from here)
from jaxcpt.data.shuffle import WindowShuffleDataset
from jaxcpt.data.sources import BAD_KINDS
from jaxcpt.data.stage_shapes import ShapeSchedule, check_host_split, check_supported, resolve_shapes
from jaxcpt.data.staged_rows import LocalRows, StagedSourceRows, StepBatches
from jaxcpt.data.state import decode_state, encode_state, fingerprint_diff
from jaxcpt.data.tokenize import TokenizeDataset, token_byte_lengths
from jaxcpt.data.watch import ACTIVITY, InputWaitInterrupted

log = logging.getLogger(__name__)

STATE_FORMAT = "jaxcpt-data-state-v1"


def _source_rows(
    plan: _Plan, index: int, *, split: str, seed: int, counter: BadInputCounter, host: tuple[int, int],
    shapes=None, first_step: int = 0, pieces: Callable | None = None,
) -> grain.IterDataset:
    """One source's packed rows {inputs, targets, segment_ids, positions}, each [seq_len] int32.

    ``shapes``: the seq_len schedule of data.stages (rows follow the step). ``pieces``: a split
    function whose pieces are returned unpacked (jaxcpt.eval.position_loss).
    """
    cfg, src = plan.cfg, plan.cfg.sources[index]
    train = split == "train"
    docs: grain.IterDataset = DocumentDataset(
        source=src.name,
        units=plan.units[index],
        text_field=src.text_field,
        text_split=src.text_split,
        split=split,
        eval_fraction=src.eval_fraction,
        eval_hashes=plan.eval_hashes[index],
        held_out_anywhere=plan.held_out_anywhere,
        counter=counter,
        repeat=src.repeat,
        seed=seed,
        shuffle_units=cfg.shuffle_files,
        host_index=host[0],
        host_count=host[1],
        limits=_limits(cfg),
        instruction=src.instruction,
    )
    if train and cfg.shuffle_buffer > 1:
        docs = WindowShuffleDataset(docs, window_size=cfg.shuffle_buffer, seed=stable_seed(seed, src.name, "documents"))
    tokenize = functools.partial(
        TokenizeDataset,
        tokenizer_path=cfg.tokenizer,
        bos_id=plan.bos_id,
        eos_id=plan.eos_id,
        batch_size=cfg.tokenize_batch_size,
        source=src.name,
        max_without_tokens=cfg.max_documents_without_tokens,
        instruction=src.instruction,
        loss_on=src.loss_on,
        counter=counter if train else None,  # publishes the size of a pass (jaxcpt.data.accounting)
    )
    cut = functools.partial(DocumentSplit, min_tokens=src.min_doc_tokens, source=src.name,
                            max_short=cfg.max_documents_without_tokens)
    packer = functools.partial(
        pack,
        packing=cfg.packing,
        bins=cfg.packing_bins,
        seed=stable_seed(seed, src.name, "bins"),
        shuffle_bins=train,
        masked=src.instruction != "none",
    )
    if pieces is not None:
        return tokenize(docs, split_fn=pieces)
    if shapes is not None and len(shapes.seq_lens()) > 1:  # rows whose length follows the step
        return StagedSourceRows(docs, tokenize=tokenize, split=cut, pack=packer, shapes=shapes, first_step=first_step)
    split_fn = (functools.partial(document_pieces, seq_len=plan.seq_len) if not src.min_doc_tokens
                else cut(plan.seq_len))
    return packer(tokenize(docs, split_fn=split_fn), seq_len=plan.seq_len)


def _ensure_absl_flags_parsed() -> None:
    # Grain's worker processes read absl flags; an application that never ran absl.app would
    # fail with UnparsedFlagAccessError, so take the defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class TrainIterator:
    """Batches of the training stream; ``next(it)`` is a dict of numpy arrays (see ``packing.stack_rows``).

    ``step`` counts batches produced. ``get_state()`` / ``set_state()`` save and restore the
    exact position (JSON-serialisable). ``close()`` stops worker processes.
    """

    def __init__(self, plan: _Plan, *, batch_size: int, schedule: WeightSchedule, stage_steps: list[int | None],
                 shapes: ShapeSchedule | None = None):
        self._plan = plan
        self.batch_size = batch_size
        self.schedule = schedule
        self.stage_steps = stage_steps  # resolved start step of each data.stages entry
        # (seq_len, global rows) per step when data.stages change them (jaxcpt.data.stage_shapes), else None
        self.shapes = shapes if shapes is not None and shapes.varies else None
        self.source_names = [s.name for s in plan.cfg.sources]
        self._fingerprint = {**plan.fingerprint, "batch_size": batch_size,
                             **({"shapes": self.shapes.describe()} if self.shapes else {})}
        # Per-source accounting of the batches handed out (jaxcpt.data.accounting); kept across restarts.
        self._acct = HostAccounting(self.source_names, workers=max(1, plan.cfg.num_workers))
        self._start(seed=plan.cfg.seed, step=0)

    def _start(self, *, seed: int, step: int) -> None:
        plan, cfg = self._plan, self._plan.cfg
        self._counters = [_counter(cfg, name) for name in self.source_names]
        host = (plan.process_index, plan.process_count)
        rows = [
            _source_rows(plan, i, split="train", seed=seed, counter=c, host=host, shapes=self.shapes, first_step=step)
            for i, c in enumerate(self._counters)
        ]
        ds: grain.IterDataset = MixtureDataset(
            rows,
            schedule=self.schedule,
            count_mode=cfg.weights_count,
            batch_size=self.batch_size,
            counters=self._counters,
            first_step=step,
            stall_seconds=cfg.stall_warn_seconds,
            rows_at=LocalRows(self.shapes, plan.process_count) if self.shapes else None,
        )
        # Whole batches leave the worker: one transfer per step instead of one per row.
        if self.shapes:  # each step's own shape
            ds = StepBatches(ds, self.shapes, plan.process_count)
        else:
            ds = ds.batch(
                self.batch_size, batch_fn=functools.partial(stack_rows, batch_size=self.batch_size, seq_len=plan.seq_len)
            )
        if cfg.num_workers > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer_size)
            )
        self._seed = seed
        self._stream_start = step  # the step this stream's first batch was for (not 0 after a restart)
        self._batches = ds.__iter__()
        self._bad: dict[int, np.ndarray] = {}  # worker -> [sources, kinds + 1], its latest counts
        self.step = step
        self._before: dict | None = None  # the pipeline's state before the batch being waited for
        self._interrupted = self._waiting = False

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches is None:
            raise ValueError("this TrainIterator was closed")
        if self._interrupted:
            raise InputWaitInterrupted("the input pipeline was interrupted by a stop signal; save and stop")
        workers = self._plan.cfg.num_workers
        label = f"the batch for step {self.step + 1}" + (
            f" from Grain worker {(self.step - self._stream_start) % workers} of {workers} (which logs what it reads "
            "when it stalls)" if workers else "")
        self._before = self._batches.get_state()  # what a checkpoint holds if a signal ends this wait
        ACTIVITY.begin(label, self._plan.cfg.stall_warn_seconds)
        try:
            self._waiting = True
            raw = next(self._batches)
        except InputWaitInterrupted:
            self._interrupted = True
            raise
        finally:
            self._waiting = False
            ACTIVITY.end()
        # Plain copies: from workers, arrays live in Grain's shared memory, whose cleanup at
        # interpreter exit fails noisily if a trainer still holds a batch (a few us per batch).
        batch = {k: np.array(v) if type(v) is not np.ndarray else v for k, v in raw.items()}
        worker = batch.pop("_worker")
        self._bad[int(worker)] = batch.pop("_bad").astype(np.int64)  # [sources, kinds + 1]
        self._acct.add(batch, int(worker), batch.pop("_pass_tokens"))
        self.step += 1
        return batch

    def interrupt_if_waiting(self) -> None:
        """Called by the trainer's signal handler: end a wait for data, which no step boundary would end.

        Only with one process: several must agree on the step they stop at (jaxcpt.train.signals),
        and one host leaving a stalled wait alone would leave the others in a collective.
        """
        if getattr(self, "_waiting", False) and self._plan.process_count == 1:
            raise InputWaitInterrupted(
                f"stop signal while waiting for the input pipeline ({ACTIVITY.stalled_for():.0f} s): saving at step "
                f"{self.step}")

    def accounting(self) -> dict[str, dict]:
        """{source: {rows, tokens_seen, tokens_trained, epochs, pass_tokens}} of this host's batches so far."""
        return self._acct.totals()

    def bad_input_report(self) -> dict[str, dict[str, int]]:
        """{source: {"records": read, kind: count, ...}} for sources with bad input, this host (kinds > 0 only)."""
        counts = self._counts()
        return {name: {"records": int(counts[i, -1]), **{k: int(v) for k, v in zip(BAD_KINDS, counts[i, :-1]) if v}}
                for i, name in enumerate(self.source_names) if counts[i, :-1].any()}

    def _counts(self) -> np.ndarray:
        """[sources, kinds + 1]: bad documents per kind, then records read, summed over workers."""
        zeros = np.zeros((len(self.source_names), len(BAD_KINDS) + 1), np.int64)
        return sum(self._bad.values(), zeros)

    def bad_input_counts(self) -> dict[str, dict[str, int]]:
        """{source: {kind: skipped documents}} over this host's stream so far (all workers)."""
        counts = self._counts()
        return {name: dict(zip(BAD_KINDS, map(int, counts[i, :-1]))) for i, name in enumerate(self.source_names)}

    def documents_read(self) -> dict[str, int]:
        """{source: records read, good and bad} on this host so far (records read ahead included)."""
        return {name: int(n) for name, n in zip(self.source_names, self._counts()[:, -1])}

    def get_state(self) -> dict:
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "seed": self._seed,
            "stream_start": self._stream_start,
            "fingerprint": self._fingerprint,
            "bad": {str(w): counts.tolist() for w, counts in self._bad.items()},
            **self._acct.get_state(),  # this host's counts; jaxcpt.data.accounting.from_states sums the hosts
            "pipeline": encode_state(self._before if self._interrupted else self._batches.get_state()),
        }
        return json.loads(json.dumps(state))  # a plain copy: later steps never mutate a saved state

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a jaxcpt data state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        removed = [s.get("name") for s in state["fingerprint"].get("sources", [])
                   if s.get("name") not in self.source_names]
        if removed and self._plan.cfg.resume_mismatch == "error":
            raise ConfigError(
                f"source(s) {removed} are in the checkpoint, read part-way, but not in data.sources. A streaming data "
                "state is one position of all sources together, so it cannot continue without them. Keep them in "
                "data.sources (a stage weight of 0 stops their rows and keeps their position), or set "
                "data.resume_mismatch=restart to start a fresh stream of the remaining sources at the saved step "
                "(their documents may repeat; the removed sources' counts stay in the accounting), or train with "
                "data.elastic=true, where a removed source keeps its position for when it comes back")
        diffs = fingerprint_diff(state["fingerprint"], self._fingerprint)
        if diffs:
            what = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in diffs)
            if self._plan.cfg.resume_mismatch == "error":
                raise ConfigError(
                    f"the saved data state does not fit this run ({what}). Resume with the saved setting, or set "
                    "data.resume_mismatch=restart to start a fresh data stream at the saved step (documents may repeat)"
                )
            step = int(state["step"])
            log.warning("data state does not fit this run (%s); starting a fresh stream at step %d", what, step)
            self.close()
            self._start(seed=stable_seed(self._plan.cfg.seed, "restart", step), step=step)
            if state["fingerprint"].get("process_count") == self._plan.process_count:
                self._acct.set_state(state, restarted=True)
            else:  # each host saved its own counts, and this run splits the data over another number of hosts
                log.warning("per-source accounting starts over at step %d: the saved counts are per host and the "
                            "host count changed (data.elastic=true keeps global counts across host counts)", step)
            return
        if (int(state["seed"]), int(state["stream_start"])) != (self._seed, self._stream_start):
            self.close()  # the saved stream was itself restarted: rebuild it as it was
            self._start(seed=int(state["seed"]), step=int(state["stream_start"]))
        self._batches.set_state(decode_state(state["pipeline"]))
        self.step = int(state["step"])
        self._bad = {int(w): pad_bad_counts(np.asarray(c, np.int64)) for w, c in state["bad"].items()}
        self._acct.set_state(state, restarted=False)

    def close(self) -> None:
        """Stop worker processes now (not at interpreter exit, when Grain's cleanup fails noisily)."""
        batches, self._batches = self._batches, None
        close = getattr(batches, "close", None)
        if close is not None:
            close()
        del batches

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_train_iterator(
    cfg: DataConfig,
    *,
    batch_size: int,
    seq_len: int | None = None,
    lr_schedule: Callable | None = None,
    total_steps: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> TrainIterator:
    """This host's training batches of ``batch_size`` rows of ``seq_len`` tokens (default ``cfg.seq_len``).

    ``lr_schedule(step) -> lr`` and ``total_steps`` are needed only by ``lr_below`` stages.
    ``process_index`` / ``process_count`` default to JAX's.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.elastic:  # random access by index arithmetic: jaxcpt.data.elastic
        from jaxcpt.data.elastic import build_elastic_train_iterator

        return build_elastic_train_iterator(cfg, batch_size=batch_size, seq_len=seq_len or cfg.seq_len,
                                            lr_schedule=lr_schedule, total_steps=total_steps,
                                            host=_host(process_index, process_count))
    cfg.validate()
    plan = _plan(cfg, seq_len, process_index, process_count)
    stage_steps = resolve_stage_steps(cfg, lr_schedule, total_steps)
    schedule = WeightSchedule.from_config(cfg, stage_steps)
    shapes = resolve_shapes(cfg, batch_size=batch_size * plan.process_count, seq_len=plan.seq_len,
                            stage_starts=stage_steps)
    check_supported(cfg, shapes)
    check_host_split(cfg, shapes, plan.process_count)
    return TrainIterator(plan, batch_size=batch_size, schedule=schedule, stage_steps=stage_steps, shapes=shapes)


def build_eval_batches(
    cfg: DataConfig,
    *,
    batch_size: int,
    seq_len: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict[str, list[dict[str, np.ndarray]]]:
    """{source: batches} of the first ``cfg.eval_rows`` rows of each held-out split; the same every call.

    Rows are read in file order without shuffling, then dealt to hosts round-robin; every
    host gets the same number of batches (missing rows are all padding, loss_mask 0), so a
    multi-host evaluation step never waits on a host with fewer batches. Sources without a
    held-out split are absent.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if cfg.elastic:
        from jaxcpt.data.elastic import build_elastic_eval_batches

        return build_elastic_eval_batches(cfg, batch_size=batch_size, seq_len=seq_len or cfg.seq_len,
                                          host=_host(process_index, process_count))
    cfg.validate()
    plan = _plan(cfg, seq_len, process_index, process_count)
    out = {}
    for i, src in enumerate(cfg.sources):
        if not src.has_eval_split:
            continue
        rows_ds = _source_rows(plan, i, split="eval", seed=cfg.seed, counter=_counter(cfg, src.name), host=(0, 1))
        rows = list(itertools.islice(rows_ds.__iter__(), cfg.eval_rows))
        if len(rows) < cfg.eval_rows:
            log.warning(
                "source '%s': the held-out split fills only %d of data.eval_rows=%d rows",
                src.name,
                len(rows),
                cfg.eval_rows,
            )
        for row in rows:
            row["source"] = i
        # Bytes of text each target token spells, so held-out loss is also reported in bits per byte
        # (zeros, and no bits per byte, for token shards read without their tokenizer).
        out[src.name] = eval_batches(rows, batch_size=batch_size, seq_len=plan.seq_len,
                                     host=(plan.process_index, plan.process_count),
                                     byte_lengths=token_byte_lengths(cfg.tokenizer) if cfg.tokenizer else None)
    return out

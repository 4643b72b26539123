"""The training and evaluation data streams: sources -> documents -> tokens -> rows -> mixture -> batches.

Per source (``jaxcpt.data.documents``, ``tokenize``, ``packing``)::

    DocumentDataset (this host's / worker's share, epochs, held-out split, bad input)
      -> WindowShuffleDataset (shuffle_buffer documents, seeded per source)
      -> TokenizeDataset (batched tokenizer calls, BOS/EOS, next-token pieces <= seq_len)
      -> first-fit or concat-then-split packing into rows of seq_len

then ``MixtureDataset`` interleaves the sources' rows by token credit
(``jaxcpt.data.mixture``), optionally inside Grain worker processes (``num_workers``), and
stacks rows into batches there; ``TrainIterator`` hands them to the trainer.

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

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Callable

import grain
import numpy as np

from jaxcpt.config import ConfigError, to_dict
from jaxcpt.data.config import DataConfig
from jaxcpt.data.documents import (
    BadInputCounter,
    DocumentDataset,
    HeldOut,
    first_document_hashes,
    pad_bad_counts,
    stable_seed,
)
from jaxcpt.data.mixture import MixtureDataset, WeightSchedule, resolve_stage_steps
from jaxcpt.data.packing import DocumentSplit, document_pieces, pack, stack_rows
from jaxcpt.data.readers import ReadLimits
from jaxcpt.data.remote import file_size
from jaxcpt.data.shares import split_units
from jaxcpt.data.shuffle import WindowShuffleDataset
from jaxcpt.data.sources import (
    BAD_KINDS,
    TOKENIZED_META,
    Unit,
    list_units,
    read_tokenized_meta,
    resolve_files,
)
from jaxcpt.data.stage_shapes import ShapeSchedule, check_elastic, check_host_split, check_supported, resolve_shapes
from jaxcpt.data.staged_rows import LocalRows, StagedSourceRows, StepBatches
from jaxcpt.data.state import decode_state, encode_state, fingerprint_diff
from jaxcpt.data.tokenize import TokenizeDataset, token_byte_lengths, tokenizer_facts, tokenizer_fingerprint
from jaxcpt.data.watch import ACTIVITY, InputWaitInterrupted

log = logging.getLogger(__name__)

STATE_FORMAT = "jaxcpt-data-state-v1"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a stream needs, resolved once at build time (files, held-out hashes, special tokens)."""

    cfg: DataConfig
    seq_len: int
    process_index: int
    process_count: int
    units: list[list[Unit]]  # per source
    eval_hashes: list[frozenset[int] | None]  # per source; set for eval_documents splits
    held_out_anywhere: HeldOut  # every source's held-out documents: no source trains on them
    bos_id: int | None
    eos_id: int | None
    fingerprint: dict


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only when not injected: tests and tools simulate hosts without jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    return process_index, process_count


def _counter(cfg: DataConfig, name: str) -> BadInputCounter:
    return BadInputCounter(
        name,
        fatal=cfg.fatal_bad_input,
        max_fraction=cfg.max_bad_fraction,
        min_records=cfg.bad_input_min_documents,
        warn_seconds=cfg.bad_input_warn_seconds,
    )


def _limits(cfg: DataConfig) -> ReadLimits:
    return ReadLimits(max_document_bytes=cfg.max_document_bytes, parquet_batch_bytes=cfg.parquet_batch_bytes)


def _special_tokens(cfg: DataConfig, files: list[list[str]]) -> tuple[int | None, int | None, str]:
    """(BOS id to add, EOS id to add, tokenizer fingerprint): BOS as the tokenizer adds it and EOS
    where it has one, unless data.add_bos / add_eos say otherwise. Without a tokenizer, the facts
    come from the token shards."""
    metas = [
        read_tokenized_meta(os.path.dirname(f)) for fs in files for f in fs if os.path.basename(f) == TOKENIZED_META
    ]
    has_text = any(os.path.basename(f) != TOKENIZED_META for fs in files for f in fs)
    if cfg.tokenizer:
        facts = tokenizer_facts(cfg.tokenizer)
        bos, eos, adds = facts.bos_id, facts.eos_id, facts.document_convention
        fingerprint, where = tokenizer_fingerprint(cfg.tokenizer), f"tokenizer '{cfg.tokenizer}'"
        for meta in metas:
            if meta["tokenizer_fingerprint"] != fingerprint:
                raise ConfigError(
                    f"token shards '{meta['directory']}' were written with tokenizer '{meta['tokenizer']}', not "
                    f"data.tokenizer '{cfg.tokenizer}'; re-run `jaxcpt tokenize` or point data.tokenizer at it"
                )
    elif has_text or not metas:
        raise ConfigError(
            "data.tokenizer is empty but some sources hold text (or there is no source); set it to a sentencepiece "
            ".model file or a tokenizer directory"
        )
    else:
        fingerprints = {m["tokenizer_fingerprint"] for m in metas}
        if len(fingerprints) > 1:
            raise ConfigError(
                f"token shards of different tokenizers are mixed: {sorted(m['directory'] for m in metas)}"
            )
        meta = metas[0]
        bos, eos, fingerprint = meta["bos_id"], meta["eos_id"], meta["tokenizer_fingerprint"]
        # Shards written before the tokenizer's convention was recorded: BOS and EOS where they exist.
        adds = (meta.get("adds_bos", bos is not None), meta.get("adds_eos", eos is not None))
        where = f"tokenizer '{meta['tokenizer']}' (of the shards in '{meta['directory']}')"
    added = []
    for flag, token, default, name in ((cfg.add_bos, bos, adds[0], "bos"), (cfg.add_eos, eos, adds[1], "eos")):
        if flag and token is None:
            raise ConfigError(
                f"data.add_{name}=true, but the {where} has no {name.upper()} token; set data.add_{name}=false, or "
                "leave it unset (null) to follow the tokenizer"
            )
        added.append(token if (default if flag is None else flag) else None)
    return added[0], added[1], fingerprint


def resolved_special_tokens(cfg: DataConfig) -> tuple[int | None, int | None]:
    """The (BOS, EOS) ids the pipeline adds to every document (None: not added), after
    data.add_bos / add_eos fall back to the tokenizer's convention (or the shards' without one)."""
    files = [resolve_files(s.paths, s.name, s.format) for s in cfg.sources]
    bos, eos, _ = _special_tokens(cfg, files)
    return bos, eos


def _units_fingerprint(units: list[Unit]) -> str:
    root = os.path.commonpath([u.path for u in units]) if len(units) > 1 else os.path.dirname(units[0].path)
    digest = hashlib.blake2b(digest_size=8)
    for unit in units:  # relative paths and sizes: moving the corpus keeps positions valid, editing it does not
        line = f"{os.path.relpath(unit.path, root)}|{unit.part}|{file_size(unit.path)}"
        if (unit.begin, unit.end) != (0, None):  # a range (split_units): another split is another stream
            line += f"|{unit.begin}:{unit.end}"
        digest.update(f"{line}\n".encode())
    return digest.hexdigest()


def excluded_hashes(cfg: DataConfig) -> frozenset[int]:
    """data.exclude_documents: text hashes no source trains on (jaxcpt decontaminate --write-hashes)."""
    if not cfg.exclude_documents:
        return frozenset()
    try:
        with open(cfg.exclude_documents) as f:
            data = json.load(f)
        if data.get("format") != "jaxcpt-exclude-v1":
            raise ValueError(f"format {data.get('format')!r}, expected 'jaxcpt-exclude-v1'")
        return frozenset(int(h, 16) for h in data["text_hashes"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"data.exclude_documents '{cfg.exclude_documents}' cannot be read ({e}); write it with "
                          "`jaxcpt decontaminate --write-hashes FILE`") from None


def _default_instruction(key: str, value) -> bool:
    """Instruction keys at their defaults stay out of the fingerprint: states saved before they existed still fit."""
    return (key, value) in (("instruction", "none"), ("loss_on", "answer"), ("min_doc_tokens", 0))


def _check_instruction_sources(cfg: DataConfig, units: list[list[Unit]]) -> None:
    for s, u in zip(cfg.sources, units):
        if s.instruction == "none":
            continue
        other = sorted({x.fmt for x in u} - {"jsonl"})
        if other:
            raise ConfigError(f"source '{s.name}' (instruction: {s.instruction}) reads {other} files; instruction "
                              "records are read from JSONL only")
        if s.instruction == "messages":
            from jaxcpt.data.chat import require_chat_template
            from jaxcpt.data.tokenize import cached_tokenizer

            require_chat_template(cached_tokenizer(cfg.tokenizer), cfg.tokenizer, s.name)


def _plan(cfg: DataConfig, seq_len: int | None, process_index: int | None, process_count: int | None) -> _Plan:
    if not cfg.sources:
        raise ConfigError("data.sources is empty: add at least one source (name, paths)")
    seq_len = cfg.seq_len if seq_len is None else int(seq_len)
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    process_index, process_count = _host(process_index, process_count)
    files = [resolve_files(s.paths, s.name, s.format) for s in cfg.sources]
    units = [
        split_units(
            list_units(f, s.format, s.text_field, s.name),
            hosts=process_count,
            workers=max(1, cfg.num_workers),
            text_split=s.text_split,
            source=s.name,
        )
        for f, s in zip(files, cfg.sources)
    ]
    bos, eos, tok_fingerprint = _special_tokens(cfg, files)
    _check_instruction_sources(cfg, units)
    eval_hashes = []
    for s, u in zip(cfg.sources, units):
        if s.eval_documents > 0:
            kw = dict(source=s.name, units=u, text_field=s.text_field, text_split=s.text_split, count=s.eval_documents,
                      instruction=s.instruction)
            hashes = first_document_hashes(**kw, counter=_counter(cfg, s.name), limits=_limits(cfg))
            eval_hashes.append(frozenset(hashes))
        else:
            eval_hashes.append(None)
    held_out_anywhere = HeldOut(
        threshold=max(int(s.eval_fraction * 2**64) for s in cfg.sources),
        hashes=frozenset().union(*(h for h in eval_hashes if h is not None), excluded_hashes(cfg)),
    )
    stream_keys = (
        "packing",
        "packing_bins",
        "seed",
        "shuffle_buffer",
        "shuffle_files",
        "num_workers",
        "tokenize_batch_size",
    )
    fingerprint = {
        **{k: getattr(cfg, k) for k in stream_keys},
        "add_bos": bos is not None,  # resolved: an unset flag and the tokenizer's convention are the same stream
        "add_eos": eos is not None,
        "seq_len": seq_len,
        "process_count": process_count,
        "process_index": process_index,
        "tokenizer": tok_fingerprint,
        **({"excluded": len(held_out_anywhere.hashes)} if cfg.exclude_documents else {}),
        "sources": [
            {**{k: v for k, v in to_dict(s).items()
                if k not in ("paths", "weight", "loss_weight") and not _default_instruction(k, v)},
             "files": _units_fingerprint(u)}
            for s, u in zip(cfg.sources, units)
        ],
    }
    return _Plan(
        cfg, seq_len, process_index, process_count, units, eval_hashes, held_out_anywhere, bos, eos, fingerprint
    )


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
        self._bad[int(batch.pop("_worker"))] = batch.pop("_bad").astype(np.int64)  # [sources, kinds + 1]
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
            "pipeline": encode_state(self._before if self._interrupted else self._batches.get_state()),
        }
        return json.loads(json.dumps(state))  # a plain copy: later steps never mutate a saved state

    def set_state(self, state: dict) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ConfigError(f"not a jaxcpt data state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
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
            return
        if (int(state["seed"]), int(state["stream_start"])) != (self._seed, self._stream_start):
            self.close()  # the saved stream was itself restarted: rebuild it as it was
            self._start(seed=int(state["seed"]), step=int(state["stream_start"]))
        self._batches.set_state(decode_state(state["pipeline"]))
        self.step = int(state["step"])
        self._bad = {int(w): pad_bad_counts(np.asarray(c, np.int64)) for w, c in state["bad"].items()}

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
        check_elastic(cfg)
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
        mine = rows[plan.process_index :: plan.process_count]
        num_batches = math.ceil(math.ceil(len(rows) / plan.process_count) / batch_size)
        out[src.name] = [
            stack_rows(mine[b * batch_size : (b + 1) * batch_size], batch_size, plan.seq_len)
            for b in range(num_batches)
        ]
        # Bytes of text each target token spells, so held-out loss is also reported in bits per byte
        # (zeros, and no bits per byte, for token shards read without their tokenizer).
        byte_lengths = token_byte_lengths(cfg.tokenizer) if cfg.tokenizer else None
        for batch in out[src.name]:
            batch["target_bytes"] = (np.zeros(batch["targets"].shape, np.float32) if byte_lengths is None else
                                     (byte_lengths[batch["targets"]] * (batch["loss_mask"] > 0)).astype(np.float32))
    return out

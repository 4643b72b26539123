"""The documents of one source, for one host and worker: epochs, held-out split, bad-input counting.

``DocumentDataset`` is a Grain ``IterDataset`` whose iterator yields document texts (or
token arrays for pre-tokenized shards), with an ``EpochEnd`` marker between epochs, and
whose state is a few integers: epoch, unit position, offset in the unit, record count,
bad-input counts.

Sharding (``jaxcpt.data.shares``). Hosts split a source first, then each host's Grain
workers split the host's part. Each level hands out whole units (files, row groups, token
shards, or ranges of them) when there are at least as many as readers, and otherwise
records: every reader of the level reads the same units and keeps the records whose ordinal
within the epoch is its index modulo the reader count (it does not parse the others). Either
way the shares are disjoint and cover the source.

Epochs. With ``repeat`` the source starts over when exhausted, with the unit order
reshuffled from (seed, source name, epoch); the epoch number is part of the state.

Held-out split. A source's own held-out documents are those whose blake2b text hash is
below ``eval_fraction * 2**64``, or is among the hashes of its first ``eval_documents``
documents; its eval split keeps only them. The training split of every source skips every
document held out by ANY source (``HeldOut``: the largest of the sources' hash thresholds,
and the union of their eval_documents hashes), so a document that two sources share is never
trained on when one of them holds it out. Pre-tokenized shards store each document's text
hash, so the split is the same.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import grain
import numpy as np

from jaxcpt.data.readers import Damaged, ReadLimits
from jaxcpt.data.shares import share
from jaxcpt.data.sources import BAD_KINDS, Unit, parse_record, read_unit, text_hash
from jaxcpt.data.watch import ACTIVITY
from jaxcpt.errors import UserError

log = logging.getLogger(__name__)


class EpochEnd:
    """Yielded by a repeating DocumentDataset between epochs, so a shuffle window never mixes two
    epochs (a small source under a large window would otherwise repeat documents within one
    window). Later stages drop it. Compared by type: Grain workers unpickle their own copies."""

    def __repr__(self) -> str:
        return "EpochEnd"


class BadInputError(UserError):
    """A source holds bad documents and the config says to stop (fatal_bad_input or max_bad_fraction)."""


class BadInputCounter:
    """Per-source counts of skipped bad records, with throttled warnings and the fatal checks.

    One object per source, shared by the source's reader and the mixer that reports the counts
    (inside one process: a Grain worker unpickles both together, so they stay shared).
    """

    def __init__(self, source: str, *, fatal: bool, max_fraction: float, min_records: int, warn_seconds: float):
        self.source = source
        self.fatal = fatal
        self.max_fraction = max_fraction
        self.min_records = min_records
        self.warn_seconds = warn_seconds
        self.counts = dict.fromkeys(BAD_KINDS, 0)
        self.records = 0  # every record read, good or bad: the denominator of max_fraction
        # Next-token pairs of one pass over this reader's share, 0 until known: set by the tokenizer stage, read
        # by the mixer with the counts (jaxcpt.data.accounting: epochs).
        self.pass_tokens = 0
        self._last_warning = -float("inf")
        self._damaged_warned: set[str] = set()  # files whose damage was named (the first time, always)

    def good(self) -> None:
        self.records += 1

    def damaged(self, path: str, damage: Damaged, lost: int) -> None:
        """The rest of ``path`` is unreadable: warn naming it and where it broke, count ``lost`` records as bad."""
        if self.fatal:
            raise BadInputError(
                f"source '{self.source}': '{path}' is damaged at {damage.where} ({damage.reason}); "
                "set data.fatal_bad_input=false to count the rest of a damaged file as bad and go on"
            )
        if path not in self._damaged_warned:
            self._damaged_warned.add(path)
            log.warning(
                "source '%s': '%s' is damaged at %s (%s); skipped the rest of the file, counted as %d bad "
                "document(s) (estimate: %s). The run goes on while the bad fraction stays within "
                "data.max_bad_fraction=%g; replace the file to get those documents back",
                self.source, path, damage.where, damage.reason, lost, damage.how, self.max_fraction,
            )
        self.bad("damaged_file", f"{damage.reason} at {damage.where}", path, count=lost, warn=False)

    def bad(self, kind: str, reason: str, where: str, *, count: int = 1, warn: bool = True) -> None:
        if self.fatal:
            raise BadInputError(
                f"source '{self.source}': bad document ({kind}: {reason}) in {where}; "
                "set data.fatal_bad_input=false to count and skip bad documents"
            )
        self.records += count
        self.counts[kind] += count
        total_bad = sum(self.counts.values())
        now = time.monotonic()
        if warn and now - self._last_warning >= self.warn_seconds:
            self._last_warning = now
            log.warning(
                "source '%s': skipped %d bad of %d documents so far (%s); latest: %s: %s in %s",
                self.source,
                total_bad,
                self.records,
                ", ".join(f"{k}={v}" for k, v in self.counts.items() if v),
                kind,
                reason,
                where,
            )
        if self.records >= self.min_records and total_bad > self.max_fraction * self.records:
            raise BadInputError(
                f"source '{self.source}': {total_bad} of {self.records} documents are bad ({self.counts}), more than "
                f"data.max_bad_fraction={self.max_fraction} (latest: {kind} in {where}); check the source's paths, "
                "format and text_field, and replace damaged files"
            )

    def snapshot(self) -> list[int]:
        """[len(BAD_KINDS) + 1]: the count of each kind, then the records read."""
        return [self.counts[k] for k in BAD_KINDS] + [self.records]

    def restore(self, snapshot: list[int]) -> None:
        self.counts = dict.fromkeys(BAD_KINDS, 0)  # a state saved before a kind existed lacks it
        self.counts.update(zip(BAD_KINDS, (int(v) for v in snapshot[:-1])))
        self.records = int(snapshot[-1])


def pad_bad_counts(counts: np.ndarray) -> np.ndarray:
    """[..., kinds + 1] counts from a state saved when fewer kinds existed: zeros for the kinds added since."""
    missing = len(BAD_KINDS) + 1 - counts.shape[-1]
    if missing <= 0:
        return counts
    zeros = np.zeros((*counts.shape[:-1], missing), counts.dtype)
    return np.concatenate([counts[..., :-1], zeros, counts[..., -1:]], axis=-1)


def sum_bad_input_reports(reports: list[dict]) -> dict[str, dict[str, int]]:
    """Hosts' ``TrainIterator.bad_input_report()`` summed per source and kind (the run's summary)."""
    total: dict[str, dict[str, int]] = {}
    for report in reports:
        for source, counts in report.items():
            for key, n in counts.items():
                total.setdefault(source, {})[key] = total.get(source, {}).get(key, 0) + int(n)
    return total


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """Documents held out for evaluation, by text hash: below ``threshold`` or in ``hashes``."""

    threshold: int = 0  # eval_fraction * 2**64
    hashes: frozenset[int] = frozenset()

    def __contains__(self, doc_hash: int) -> bool:
        return doc_hash < self.threshold or doc_hash in self.hashes


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from strings and ints, the same in every process and Python version."""
    return text_hash(repr(parts).encode()) % (2**31 - 1)


class DocumentDataset(grain.IterDataset):
    """Documents of one source (see the module docstring). ``split`` is ``"train"`` or ``"eval"``.

    ``eval_fraction`` / ``eval_hashes`` are the source's own held-out split; ``held_out_anywhere``
    (all sources' held-out documents) is skipped by the training split as well.
    """

    def __init__(
        self,
        *,
        source: str,
        units: list[Unit],
        text_field: str,
        text_split: str,
        split: str,
        eval_fraction: float,
        eval_hashes: frozenset[int] | None,
        held_out_anywhere: HeldOut | None = None,
        counter: BadInputCounter,
        repeat: bool,
        seed: int,
        shuffle_units: bool,
        host_index: int = 0,
        host_count: int = 1,
        limits: ReadLimits = ReadLimits(),
        instruction: str = "none",
    ):
        super().__init__()
        self.limits = limits
        self.instruction = instruction  # SourceConfig.instruction: records parsed as chat / prompt-completion
        self.source = source
        self.units = list(units)
        self.text_field = text_field
        self.text_split = text_split
        self.split = split
        self.eval_threshold = int(eval_fraction * 2**64)
        self.eval_hashes = eval_hashes
        self.held_out_anywhere = held_out_anywhere  # training also skips these (other sources' held-out)
        self.counter = counter
        self.repeat = repeat and split == "train"
        self.seed = seed
        self.shuffle_units = shuffle_units and split == "train"
        self.host_index, self.host_count = host_index, host_count
        self.worker_index, self.worker_count = 0, 1

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Called by Grain's multiprocess prefetch in each worker: take worker ``sl.start`` of ``sl.step``."""
        del sequential_slice
        self.worker_index, self.worker_count = sl.start or 0, sl.step or 1

    def __iter__(self):
        return DocumentIterator(self)

    def __str__(self) -> str:
        return f"DocumentDataset({self.source}, {self.split})"


class DocumentIterator(grain.DatasetIterator):
    def __init__(self, ds: DocumentDataset):
        super().__init__()
        self._ds = ds
        self._units, self._shard, self._count = share(
            ds.units, (ds.host_index, ds.host_count), (ds.worker_index, ds.worker_count)
        )
        self._epoch = 0
        self._upos = 0  # position in this epoch's unit order
        self._offset = 0  # position inside the current unit (read_unit's resume point)
        self._record = 0  # records read this epoch (for record-level sharding)
        self._kept = 0  # documents yielded this epoch: 0 at an epoch's end means the shard is empty
        self._order = self._unit_order(0)
        self._reader = None

    def _unit_order(self, epoch: int) -> np.ndarray:
        if not self._ds.shuffle_units:
            return np.arange(len(self._units))
        # The same order on every host and worker (no shard index in the seed): record-level
        # sharding counts records in this order, so all shards must agree on it.
        return np.random.default_rng(stable_seed(self._ds.seed, self._ds.source, epoch)).permutation(len(self._units))

    def _is_eval(self, doc_hash: int) -> bool:
        if self._ds.eval_hashes is not None:
            return doc_hash in self._ds.eval_hashes
        return doc_hash < self._ds.eval_threshold

    def __next__(self):
        ds = self._ds
        if ds.split == "eval" and ds.eval_hashes is not None and self._kept >= len(ds.eval_hashes):
            raise StopIteration  # all eval_documents found: do not scan the rest of the corpus for duplicates
        while True:
            if self._reader is None:
                if self._upos >= len(self._order):
                    if not ds.repeat:
                        raise StopIteration
                    if self._kept == 0:
                        raise UserError(
                            f"source '{ds.source}' has no training documents for host {ds.host_index} of "
                            f"{ds.host_count}, worker {ds.worker_index} of {ds.worker_count}: all were bad or "
                            "held out, or the source is empty"
                        )
                    self._epoch += 1
                    self._upos = self._offset = self._record = self._kept = 0
                    self._order = self._unit_order(self._epoch)
                    return EpochEnd()
                unit = self._units[self._order[self._upos]]
                self._reader = read_unit(unit, self._offset, ds.text_field, ds.text_split, ds.limits, ds.instruction)
            ACTIVITY.reader = self  # what a stall warning names (jaxcpt.data.watch)
            try:
                self._offset, raw = next(self._reader)
            except StopIteration:
                self._reader = None
                self._upos += 1
                self._offset = 0
                continue
            if isinstance(raw, Damaged):
                # Every reader sharing this unit by record meets the same damage: each counts its share of
                # what was lost. Then on to the next unit, so a saved position never points into the damage.
                lost = raw.lost // self._count + (self._shard < raw.lost % self._count)
                ds.counter.damaged(self._units[self._order[self._upos]].path, raw, lost)
                self._reader = None
                self._upos += 1
                self._offset = 0
                continue
            if self._count > 1:
                ordinal, self._record = self._record, self._record + 1
                if ordinal % self._count != self._shard:
                    continue
            unit = self._units[self._order[self._upos]]
            kind, payload = parse_record(unit.fmt, raw, ds.text_field, ds.instruction)
            if kind == "doc" and unit.fmt != "tokenized":
                try:
                    payload = (payload, text_hash(payload.encode("utf-8")))
                except UnicodeEncodeError as e:  # lone surrogates from JSON '\ud800' escapes
                    kind, payload = "invalid_utf8", f"unpaired surrogate at character {e.start}"
            if kind != "doc":
                ds.counter.bad(kind, payload, _where(unit, self._offset))
                continue
            ds.counter.good()
            content, doc_hash = payload
            if ds.split == "eval":
                if not self._is_eval(doc_hash):
                    continue
            elif self._is_eval(doc_hash) or (ds.held_out_anywhere is not None and doc_hash in ds.held_out_anywhere):
                continue
            self._kept += 1
            return content

    def describe(self) -> str:
        """Where this reader is, for a stall warning (read from the watch thread: plain attribute reads)."""
        ds = self._ds
        who = (f"source '{ds.source}' ({ds.split}, host {ds.host_index} of {ds.host_count}, worker "
               f"{ds.worker_index} of {ds.worker_count})")
        if self._upos >= len(self._order):
            return f"{who}: at the end of epoch {self._epoch}"
        unit = self._units[self._order[self._upos]]
        at = {"parquet": f"row group {unit.part}, row", "tokenized": "document"}.get(unit.fmt, "byte")
        return (f"{who}: '{unit.path}' at {at} {self._offset}, epoch {self._epoch}; {ds.counter.records} records read, "
                f"{self._kept} documents kept this epoch")

    def get_state(self) -> dict:
        return {
            "epoch": self._epoch,
            "unit": self._upos,
            "offset": self._offset,
            "record": self._record,
            "kept": self._kept,
            "bad": self._ds.counter.snapshot(),
        }

    def set_state(self, state: dict) -> None:
        self._epoch = int(state["epoch"])
        self._upos = int(state["unit"])
        self._offset = int(state["offset"])
        self._record = int(state["record"])
        self._kept = int(state["kept"])
        self._ds.counter.restore(state["bad"])
        self._order = self._unit_order(self._epoch)
        self._reader = None


def _where(unit: Unit, position: int) -> str:
    if unit.fmt == "parquet":
        return f"{unit.path} row group {unit.part} row {position - 1}"
    if unit.fmt == "text" and position == 1:
        return unit.path
    return f"{unit.path} (record ending at byte {position})"


def first_document_hashes(
    *, source: str, units: list[Unit], text_field: str, text_split: str, count: int, counter: BadInputCounter,
    limits: ReadLimits = ReadLimits(), instruction: str = "none",
) -> list[int]:
    """Text hashes of the first ``count`` good documents in unit order: an ``eval_documents`` split."""
    hashes: list[int] = []
    for unit in units:
        for position, raw in read_unit(unit, 0, text_field, text_split, limits, instruction):
            if isinstance(raw, Damaged):
                counter.damaged(unit.path, raw, raw.lost)
                continue
            kind, payload = parse_record(unit.fmt, raw, text_field, instruction)
            if kind != "doc":
                counter.bad(kind, payload, _where(unit, position))
                continue
            if unit.fmt == "tokenized":
                hashes.append(payload[1])
            else:
                try:
                    hashes.append(text_hash(payload.encode("utf-8")))
                except UnicodeEncodeError:
                    continue
            if len(hashes) >= count:
                return hashes
    if len(hashes) < count:
        log.warning("source '%s': eval_documents=%d but the source has only %d documents", source, count, len(hashes))
    return hashes

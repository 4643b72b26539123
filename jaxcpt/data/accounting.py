"""Per-source accounting: rows, tokens seen, tokens trained on and epochs, exact across resume.

Per source, over every host, counted on the batches handed to the trainer (never on rows a
reader or Grain worker read ahead):

- ``rows``: rows of that source with at least one token;
- ``tokens_seen``: non-padding input positions (``segment_ids > 0``), what the model read;
- ``tokens_trained``: positions with loss (``loss_mask > 0``): an instruction source's answer
  tokens (``loss_on: answer``), every token of a text source;
- ``epochs``: tokens seen / the tokens (next-token pairs) of one pass over the source, summed over
  the hosts; ``pass_tokens`` is that size. The elastic reader knows it from the index. The
  streaming reader measures it: its readers mark each epoch's end, and the tokenizer stage sums
  the pairs of the first pass (every pass holds the same documents) and publishes the sum, which
  rides to the trainer with the bad-input counts; until every reader of every host has read its
  share once, epochs is None ("< 1" in the report). Rows packed out of reading order (first-fit
  bins) do not disturb it: it counts tokens, not which pass a row came from.

Where the counts live. The streaming ``TrainIterator`` counts its own host's batches and keeps
the counts in its data state (so each host's checkpointed state restores its own counts); the
totals are the sum over the hosts' states. The elastic state is global (the same on every host)
and holds each source's rows and tokens itself, so it stays exact when a run resumes on another
number of hosts. ``from_states`` reads either kind from the ``hosts`` list a checkpoint stores;
the trainer writes its result as a ``data`` record into metrics.jsonl (and TensorBoard) at every
checkpoint, and ``jaxcpt report`` shows the latest.
"""

from __future__ import annotations

import numpy as np

COUNTS = ("rows", "tokens_seen", "tokens_trained")


def batch_counts(batch: dict[str, np.ndarray], num_sources: int) -> np.ndarray:
    """[sources, 3] int64: (rows, tokens seen, tokens trained) per source in one batch."""
    seen = np.count_nonzero(batch["segment_ids"] > 0, axis=-1)  # [batch]
    trained = np.count_nonzero(batch["loss_mask"] > 0, axis=-1)  # [batch]
    per_row = np.stack([seen > 0, seen, trained], axis=-1).astype(np.int64)  # [batch, 3]
    out = np.zeros((num_sources, len(COUNTS)), np.int64)
    np.add.at(out, batch["source"].astype(np.int64), per_row)  # padding rows of a finite stream add zeros
    return out


def as_dict(names: list[str], counts: np.ndarray, epochs: list[float]) -> dict[str, dict]:
    """{source: {rows, tokens_seen, tokens_trained, epochs}} from [sources, 3] counts."""
    return {name: {**{k: int(v) for k, v in zip(COUNTS, row)}, "epochs": None if e is None else float(e)}
            for name, row, e in zip(names, counts, epochs)}


class HostAccounting:
    """One streaming host's counts (``jaxcpt.data.pipeline.TrainIterator``), kept in its data state."""

    def __init__(self, names: list[str], *, workers: int):
        self.names, self.workers = names, workers
        self.counts = np.zeros((len(names), len(COUNTS)), np.int64)  # [sources, 3]
        self.pass_tokens: dict[int, np.ndarray] = {}  # worker -> [sources] tokens of a pass over its share (0: unknown)
        self.saved_pass = np.zeros(len(names), np.int64)  # [sources] this host's, from before a restarted stream
        self.retired: dict[str, dict] = {}  # saved counts of sources no longer configured

    def add(self, batch: dict[str, np.ndarray], worker: int, pass_tokens: np.ndarray) -> None:
        """One batch handed out, from Grain worker ``worker``, with the pass sizes it carried ([sources])."""
        self.pass_tokens[worker] = np.asarray(pass_tokens, np.int64)
        self.counts += batch_counts(batch, len(self.names))

    def pass_size(self) -> np.ndarray:
        """[sources]: tokens of one pass over this host's share, 0 while some worker has not read its share once."""
        sizes = np.zeros(len(self.names), np.int64)
        if len(self.pass_tokens) == self.workers:
            per_worker = np.stack(list(self.pass_tokens.values()))  # [workers, sources]
            sizes = np.where((per_worker > 0).all(axis=0), per_worker.sum(axis=0), 0)
        return np.where(sizes > 0, sizes, self.saved_pass)

    def totals(self) -> dict[str, dict]:
        size = self.pass_size()
        out = as_dict(self.names, self.counts, [seen / n if n else None for seen, n in zip(self.counts[:, 1], size)])
        for name, n in zip(self.names, size):
            out[name]["pass_tokens"] = int(n)
        return {**out, **self.retired}

    def get_state(self) -> dict:
        return {"pass_tokens": {str(w): p.tolist() for w, p in self.pass_tokens.items()}, "accounting": self.totals()}

    def set_state(self, state: dict, *, restarted: bool) -> None:
        """From a saved data state; ``restarted``: a fresh stream (same documents, so the same pass size until
        it has measured its own). A state saved before accounting existed starts the counts at 0."""
        saved = state.get("accounting", {})
        self.counts = np.array([[saved.get(n, {}).get(k, 0) for k in COUNTS] for n in self.names], np.int64)
        self.retired = {n: a for n, a in saved.items() if n not in self.names}  # kept, as trained
        if restarted:
            self.pass_tokens = {}
            self.saved_pass = np.array([saved.get(n, {}).get("pass_tokens", 0) for n in self.names], np.int64)
        else:
            self.pass_tokens = {int(w): np.asarray(p, np.int64) for w, p in state.get("pass_tokens", {}).items()}


def from_states(host_states: list[dict]) -> dict[str, dict]:
    """{source: {rows, tokens_seen, tokens_trained, epochs}} over all hosts, from the data state each
    host saved (a checkpoint's ``hosts`` list): streaming states are summed, an elastic state is global."""
    from jaxcpt.data.elastic import STATE_FORMAT as ELASTIC

    if not host_states:
        return {}
    if host_states[0].get("format") == ELASTIC:
        return dict(host_states[0].get("accounting", {}))
    out: dict[str, dict] = {}
    for state in host_states:
        for name, acct in state.get("accounting", {}).items():
            total = out.setdefault(name, {**dict.fromkeys(COUNTS, 0), "pass_tokens": 0, "known": True})
            for k in COUNTS:
                total[k] += int(acct[k])
            total["pass_tokens"] += int(acct.get("pass_tokens") or 0)
            total["known"] &= bool(acct.get("pass_tokens"))  # every host has measured its share
    for total in out.values():
        known = total.pop("known") and total["pass_tokens"] > 0
        total["epochs"] = total["tokens_seen"] / total["pass_tokens"] if known else None
    return out


def format_lines(accounting: dict[str, dict], step: int) -> list[str]:
    """The report's table: per source the rows, tokens seen, tokens trained on (and their share), epochs."""
    if not accounting:
        return []
    lines = [f"data trained per source (step {step})",
             f"  {'source':<20} {'rows':>10} {'tokens seen':>14} {'trained on':>14} {'trained':>8} {'epochs':>8}"]
    for name, a in accounting.items():
        share = a["tokens_trained"] / a["tokens_seen"] if a["tokens_seen"] else 0.0
        lines.append(f"  {name:<20} {a['rows']:>10,} {a['tokens_seen']:>14,} {a['tokens_trained']:>14,} "
                     f"{share:>8.1%} {_epochs(a['epochs']):>8}")
    lines.append("  trained on = tokens with loss (an instruction source's answers); epochs = tokens seen / tokens of "
                 "one pass (< 1: a streaming source not read through once yet)")
    return lines


def _epochs(value: float | None) -> str:
    return "< 1" if value is None else f"{value:.3f}"

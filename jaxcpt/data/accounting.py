"""Per-source accounting: rows, tokens seen, tokens trained on and epochs, exact across resume.

Per source, over every host, counted on the batches handed to the trainer (never on rows a
reader or Grain worker read ahead):

- ``rows``: rows of that source with at least one token;
- ``tokens_seen``: non-padding input positions (``segment_ids > 0``), what the model read;
- ``tokens_trained``: positions with loss (``loss_mask > 0``): an instruction source's answer
  tokens (``loss_on: answer``), every token of a text source;
- ``epochs``: passes over the source. The elastic reader knows its position exactly (epoch +
  the fraction of the epoch's pairs trained). In the streaming reader every token carries the
  pass its document was read in (``TokenizeDataset`` counts the readers' ``EpochEnd`` markers),
  so epochs = the latest pass + its tokens seen / the tokens of the first pass (``PassCounter``;
  the slowest Grain worker and host count). During the first pass its size is not known yet:
  epochs is None there ("< 1" in the report).

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


class PassCounter:
    """Epochs of a streaming host, from each token's pass tag (``_token_epochs``: pass + 1, 0 on padding).

    Per (Grain worker, source) it keeps the latest pass ``P`` whose tokens were handed out and the
    tokens seen of pass 0 (a whole pass, once pass 1 began: every pass holds the same documents)
    and of pass ``P``; epochs = ``P + tokens(P) / tokens(0)``, unknown (None) during the first pass,
    whose size the reader cannot know before reading it. A host's epochs are its slowest worker's.
    """

    def __init__(self, num_sources: int):
        self.num_sources = num_sources
        self.tables: dict[int, np.ndarray] = {}  # worker -> [sources, 3] (P, tokens of pass 0, tokens of pass P)

    def update(self, tags: np.ndarray, source: np.ndarray, worker: int) -> None:
        """tags [batch, seq] int32, source [batch] int32: one batch of one worker."""
        table = self.tables.setdefault(worker, np.zeros((self.num_sources, 3), np.int64))
        valid = tags > 0  # [batch, seq]
        if not valid.any():
            return
        passes = tags[valid].astype(np.int64) - 1  # [tokens]
        sources = np.broadcast_to(source[:, None], tags.shape)[valid].astype(np.int64)  # [tokens]
        width = int(passes.max()) + 1
        counts = np.bincount(sources * width + passes, minlength=self.num_sources * width)
        # One pass at a time, in ascending order per source: the same result as row by row.
        for s, p in zip(*np.nonzero(counts.reshape(self.num_sources, width))):  # [sources, passes] tokens
            n = int(counts[s * width + p])
            if p == 0:
                table[s, 1] += n
            if p > table[s, 0]:
                table[s, 0], table[s, 2] = p, n
            elif p == table[s, 0] and p > 0:
                table[s, 2] += n

    def epochs(self) -> list[float | None]:
        """[sources]: epochs of this host (None while some worker is in its first pass of the source)."""
        out = []
        for s in range(self.num_sources):
            per_worker = [t[s, 0] + t[s, 2] / t[s, 1] if t[s, 0] > 0 and t[s, 1] > 0 else None
                          for t in self.tables.values()]
            out.append(None if not per_worker or None in per_worker else float(min(per_worker)))
        return out

    def get_state(self) -> dict:
        return {str(w): t.tolist() for w, t in self.tables.items()}

    def set_state(self, state: dict) -> None:
        self.tables = {int(w): np.asarray(t, np.int64).reshape(self.num_sources, 3) for w, t in state.items()}


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
            total = out.setdefault(name, {**dict.fromkeys(COUNTS, 0), "epochs": acct["epochs"]})
            for k in COUNTS:
                total[k] += int(acct[k])
            a, b = total["epochs"], acct["epochs"]  # a pass is complete when every host's is
            total["epochs"] = None if a is None or b is None else min(a, b)
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
    lines.append("  trained on = tokens with loss (an instruction source's answers); epochs = passes over the source "
                 "(< 1: a streaming source in its first pass, whose size is known only once read)")
    return lines


def _epochs(value: float | None) -> str:
    return "< 1" if value is None else f"{value:.3f}"

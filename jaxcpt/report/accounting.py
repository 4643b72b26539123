"""The data section of the report: per source, the rows, tokens seen, tokens trained on and epochs.

Read from the latest ``data`` record of RUN/metrics.jsonl, which the trainer writes at every
checkpoint from the checkpoint's own data state (``jaxcpt.data.accounting``): so the numbers
are those of the checkpoint a resume continues from, summed over every host.
"""

from __future__ import annotations

from jaxcpt.data.accounting import format_lines
from jaxcpt.train.metrics import read_metrics


def latest_accounting(run_dir) -> tuple[int, dict[str, dict]] | None:
    """(step, {source: {rows, tokens_seen, tokens_trained, epochs}}) of the latest data record, or None."""
    latest = None
    for record in read_metrics(run_dir):
        if record.get("kind") == "data" and (latest is None or record["step"] >= latest[0]):
            latest = (record["step"], record.get("sources", {}))
    return latest


def accounting_lines(run_dir) -> list[str]:
    latest = latest_accounting(run_dir)
    return format_lines(latest[1], latest[0]) if latest else []

"""The report's held-out loss by position bucket (``eval.position_buckets``), against step 0.

Per source, one row per bucket of positions: the loss at step 0 (the starting model), at the
last evaluation, and the change. On a context extension the late buckets should fall (the
long-context gain) while the first stays put (a rise there is short-context forgetting), so
the two are read side by side.
"""

from __future__ import annotations

from jaxcpt.train.metrics import read_metrics


def position_curves(run_dir) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{source: {bucket: [(step, loss), ...]}} from the eval records' 'positions', in step order."""
    curves: dict[str, dict[str, dict[int, float]]] = {}
    for record in read_metrics(run_dir):
        if record.get("kind") == "eval":
            for source, buckets in record.get("positions", {}).items():
                for name, result in buckets.items():
                    curves.setdefault(source, {}).setdefault(name, {})[record["step"]] = result["loss"]
    return {s: {b: sorted(points.items()) for b, points in buckets.items()} for s, buckets in curves.items()}


def position_summary(run_dir) -> dict[str, dict[str, dict]]:
    """{source: {bucket: {start, last, change, baseline_step, last_step}}}."""
    out = {}
    for source, buckets in position_curves(run_dir).items():
        out[source] = {}
        for name, points in buckets.items():
            (first_step, start), (last_step, last) = points[0], points[-1]
            out[source][name] = {"start": start, "last": last, "change": last - start, "baseline_step": first_step,
                                 "last_step": last_step}
    return out


def position_lines(run_dir) -> list[str]:
    summary = position_summary(run_dir)
    if not summary:
        return []
    width = max(len(s) for s in summary) + 2
    lines = [f"{'held-out loss by position':<{width + 14}} {'step 0':>9} {'last':>9} {'change':>9}"]
    for source, buckets in summary.items():
        for name, r in buckets.items():
            lines.append(f"  {source:<{width}} {name:>10} {r['start']:>9.4f} {r['last']:>9.4f} {r['change']:>+9.4f}")
    lines.append("  positions of long held-out documents (eval.position_buckets): a fall in the late buckets is the "
                 "long-context gain, a rise in the first is short-context forgetting")
    late = sorted({r["baseline_step"] for b in summary.values() for r in b.values() if r["baseline_step"] != 0})
    if late:
        lines.append(f"  warning: no step-0 evaluation by position; 'step 0' above is step {late[0]}")
    return lines

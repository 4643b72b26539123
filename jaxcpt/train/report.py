"""The forgetting report: how each source's held-out loss moved against the base model (step 0).

For one run: a table of each source's eval loss at step 0, best and last, and the
change of the last against step 0 (negative = learned, positive = forgot), plus a
PNG of eval loss per source over steps. For two runs (typically without and with
replay): both side by side, and per source the share of the loss rise that the
second run removed, ``1 - rise_b / rise_a``.
"""

from __future__ import annotations

from etils import epath

from jaxcpt.errors import UserError
from jaxcpt.train.metrics import read_metrics


def eval_curves(run_dir, weights: str = "sources") -> dict[str, list[tuple[int, float]]]:
    """{source: [(step, eval loss), ...]} from RUN/metrics.jsonl, in step order.

    ``weights``: 'sources' (the raw weights) or 'ema' (their moving average, where kept).
    """
    curves: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir):
        if record.get("kind") == "eval":
            for name, result in record.get(weights, {}).items():
                curves.setdefault(name, {})[record["step"]] = result["loss"]
    if not curves and weights == "sources":
        raise UserError(f"'{run_dir}' has no evaluation records in metrics.jsonl; is it a jaxcpt run directory with eval sources?")
    return {name: sorted(points.items()) for name, points in curves.items()}


def summarize(run_dir, weights: str = "sources") -> dict[str, dict[str, float]]:
    """{source: {start, best, last, change, last_step}} for one run (of its raw weights, or 'ema')."""
    out = {}
    for name, points in eval_curves(run_dir, weights).items():
        # The baseline is the base model's step-0 evaluation (resumed runs get it back from the
        # checkpoint); a run without one says so in the table instead of comparing with a later step.
        baseline_step, start = points[0]
        last = points[-1][1]
        out[name] = {"start": start, "best": min(v for _, v in points), "last": last, "change": last - start,
                     "last_step": points[-1][0], "baseline_step": baseline_step}
    return out


def format_table(run_dir) -> str:
    rows = summarize(run_dir)
    lines = [f"forgetting report: {run_dir}",
             f"{'source':<16} {'step 0':>9} {'best':>9} {'last':>9} {'change':>9}"]
    for name, r in rows.items():
        lines.append(f"{name:<16} {r['start']:>9.4f} {r['best']:>9.4f} {r['last']:>9.4f} {r['change']:>+9.4f}")
    for name, r in summarize(run_dir, "ema").items():  # the moving average, against the same step-0 model
        start = rows[name]["start"] if name in rows else r["start"]
        lines.append(f"{name + ' (ema)':<16} {start:>9.4f} {r['best']:>9.4f} {r['last']:>9.4f} {r['last'] - start:>+9.4f}")
    lines.append("change = last - step 0 eval loss: negative = learned, positive = forgotten")
    late = sorted({r["baseline_step"] for r in rows.values() if r["baseline_step"] != 0})
    if late:
        lines.append(f"warning: no step-0 evaluation recorded; 'step 0' above is the evaluation at step {late[0]}")
    return "\n".join(lines)


def plot(run_dirs: list, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    styles = ["-", "--", ":", "-."]
    for i, run_dir in enumerate(run_dirs):
        label_run = epath.Path(run_dir).name
        for name, points in eval_curves(run_dir).items():
            steps, losses = zip(*points)
            ax.plot(steps, losses, styles[i % len(styles)], marker="o", markersize=3,
                    label=f"{name} ({label_run})" if len(run_dirs) > 1 else name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title("Eval loss per source" + (" — " + " vs ".join(epath.Path(r).name for r in run_dirs) if len(run_dirs) > 1 else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(out_png))
    plt.close(fig)


def write_report(run_dir) -> str:
    """Write RUN/report.txt and RUN/eval_loss.png; return the table."""
    run_dir = epath.Path(run_dir)
    text = format_table(run_dir)
    (run_dir / "report.txt").write_text(text + "\n")
    plot([run_dir], run_dir / "eval_loss.png")
    return text


def compare(run_a, run_b) -> tuple[str, dict[str, float | None]]:
    """Side-by-side table of two runs and, per source, the share of the loss rise that run B removed."""
    a, b = summarize(run_a), summarize(run_b)
    names = [n for n in a if n in b]
    if not names:
        raise UserError(f"'{run_a}' and '{run_b}' share no evaluation source")
    width = 16
    lines = [f"A = {run_a}", f"B = {run_b}",
             f"{'source':<{width}} {'A start':>8} {'A last':>8} {'A chg':>8} {'B start':>8} {'B last':>8} {'B chg':>8}  forgetting removed by B"]
    removed: dict[str, float | None] = {}
    for name in names:
        ra, rb = a[name], b[name]
        share = 1 - rb["change"] / ra["change"] if ra["change"] > 0 else None
        removed[name] = share
        share_text = f"{100 * share:.0f}%" if share is not None else "- (A did not forget)"
        lines.append(f"{name:<{width}} {ra['start']:>8.4f} {ra['last']:>8.4f} {ra['change']:>+8.4f} "
                     f"{rb['start']:>8.4f} {rb['last']:>8.4f} {rb['change']:>+8.4f}  {share_text}")
    lines.append("chg = last - step 0 eval loss; forgetting removed = 1 - rise_B / rise_A, for sources whose loss rose in A")
    return "\n".join(lines), removed

"""The forgetting report: everything a run measured, each against the base model (step 0).

For one run, in sections, each present when the run has it:

- held-out loss per source at step 0, best and last, and the change of the last against
  step 0 (negative = learned, positive = forgotten); the parameters' moving average (EMA)
  beside the raw weights;
- downstream scores per lm-eval task and metric (``eval.downstream``), raw and EMA;
- the data trained per source at the latest checkpoint: rows, tokens seen, tokens trained on
  (an instruction source's answers only) and epochs (``jaxcpt.report.accounting``);
- merge sweeps (``jaxcpt merge --run RUN --sweep ...``): loss per source at each mixture
  coefficient of base and CPT model, with the recommended coefficient marked.

plus a PNG of the held-out losses (and downstream scores) over steps. For two runs
(typically without and with replay): both side by side, and per source the share of the
loss rise that the second run removed, ``1 - rise_b / rise_a``.
"""

from __future__ import annotations

import json

from etils import epath

from jaxcpt.errors import UserError
from jaxcpt.train.metrics import read_metrics
from jaxcpt.report.accounting import accounting_lines
from jaxcpt.report.positions import position_lines
from jaxcpt.report.routing import plot_routing, routing_lines


def eval_curves(run_dir, weights: str = "sources", unit: str = "loss") -> dict[str, list[tuple[int, float]]]:
    """{source: [(step, eval loss), ...]} from RUN/metrics.jsonl, in step order.

    ``weights``: 'sources' (the raw weights) or 'ema' (their moving average, where kept).
    ``unit``: 'loss' (nats per token) or 'bits_per_byte' (comparable across tokenizers).
    """
    curves: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir):
        if record.get("kind") == "eval":
            for name, result in record.get(weights, {}).items():
                if unit in result:
                    curves.setdefault(name, {})[record["step"]] = result[unit]
    if not curves and weights == "sources" and unit == "loss":
        raise UserError(f"'{run_dir}' has no evaluation records in metrics.jsonl; is it a jaxcpt run directory with eval sources?")
    return {name: sorted(points.items()) for name, points in curves.items()}


def downstream_curves(run_dir, weights: str = "tasks") -> dict[str, list[tuple[int, float]]]:
    """{'task metric': [(step, score), ...]} of the run's eval.downstream records ('tasks' or 'ema')."""
    curves: dict[str, dict[int, float]] = {}
    for record in read_metrics(run_dir):
        if record.get("kind") == "downstream":
            for task, metrics in record.get(weights, {}).items():
                for metric, value in metrics.items():
                    curves.setdefault(f"{task} {metric}", {})[record["step"]] = value
    return {name: sorted(points.items()) for name, points in curves.items()}


def _summary(points: list[tuple[int, float]], lower_is_better: bool = True) -> dict:
    # The baseline is the base model's step-0 evaluation (resumed runs get it back from the
    # checkpoint); a run without one says so in the table instead of comparing with a later step.
    baseline_step, start = points[0]
    values = [v for _, v in points]
    last = points[-1][1]
    return {"start": start, "best": min(values) if lower_is_better else max(values), "last": last,
            "change": last - start, "last_step": points[-1][0], "baseline_step": baseline_step}


def summarize(run_dir, weights: str = "sources", unit: str = "loss") -> dict[str, dict[str, float]]:
    """{source: {start, best, last, change, last_step, baseline_step}} for one run (raw weights, or 'ema')."""
    return {name: _summary(points) for name, points in eval_curves(run_dir, weights, unit).items()}


def merge_sweeps(run_dir) -> list[dict]:
    """The sweep.json of every ``jaxcpt merge --run RUN --sweep`` written into the run directory."""
    out = []
    for path in sorted(epath.Path(run_dir).glob("merge_sweep_*/sweep.json")):
        result = json.loads(path.read_text())
        if result.get("kind") == "jaxcpt.merge_sweep":
            out.append({**result, "path": str(path)})
    return out


def format_table(run_dir) -> str:
    rows = summarize(run_dir)
    lines = [f"forgetting report: {run_dir}",
             f"{'held-out loss':<22} {'step 0':>9} {'best':>9} {'last':>9} {'change':>9}"]
    for name, r in rows.items():
        lines.append(f"  {name:<20} {r['start']:>9.4f} {r['best']:>9.4f} {r['last']:>9.4f} {r['change']:>+9.4f}")
    for name, r in summarize(run_dir, "ema").items():  # the moving average, against the same step-0 model
        start = rows[name]["start"] if name in rows else r["start"]
        lines.append(f"  {name + ' (ema)':<20} {start:>9.4f} {r['best']:>9.4f} {r['last']:>9.4f} {r['last'] - start:>+9.4f}")
    bpb = summarize(run_dir, unit="bits_per_byte")
    if bpb:  # the same losses per byte of text: fair across tokenizers (a vocabulary extension)
        lines.append(f"{'bits per byte':<22} {'step 0':>9} {'best':>9} {'last':>9} {'change':>9}")
        for name, r in bpb.items():
            lines.append(f"  {name:<20} {r['start']:>9.4f} {r['best']:>9.4f} {r['last']:>9.4f} {r['change']:>+9.4f}")
    lines.append("  change = last - step 0: negative = learned, positive = forgotten")
    late = sorted({r["baseline_step"] for r in rows.values() if r["baseline_step"] != 0})
    if late:
        lines.append(f"  warning: no step-0 evaluation recorded; 'step 0' above is the evaluation at step {late[0]}")
    lines += position_lines(run_dir)  # eval.position_buckets (jaxcpt.report.positions)
    lines += _downstream_lines(run_dir)
    lines += accounting_lines(run_dir)  # per source: tokens seen vs trained on, epochs (jaxcpt.report.accounting)
    lines += routing_lines(run_dir)  # MoE runs: expert load per source (jaxcpt.report.routing)
    for sweep in merge_sweeps(run_dir):
        lines += _sweep_lines(sweep)
    return "\n".join(lines)


def _downstream_lines(run_dir) -> list[str]:
    raw = downstream_curves(run_dir)
    if not raw:
        return []
    ema = downstream_curves(run_dir, "ema")
    width = max(len(name) for name in raw) + 6
    lines = [f"{'downstream (lm-eval)':<{width + 2}} {'step 0':>9} {'last':>9} {'change':>9}"]
    for name, points in raw.items():
        r = _summary(points, lower_is_better=False)
        lines.append(f"  {name:<{width}} {r['start']:>9.4f} {r['last']:>9.4f} {r['change']:>+9.4f}")
        if name in ema:
            last = ema[name][-1][1]
            lines.append(f"  {name + ' (ema)':<{width}} {r['start']:>9.4f} {last:>9.4f} {last - r['start']:>+9.4f}")
    lines.append("  change = last - step 0: for accuracies, negative = forgotten")
    return lines


def _sweep_lines(sweep: dict) -> list[str]:
    sources = sweep["sources"]
    recommended = (sweep.get("recommended") or {}).get("coefficient")
    header = "".join(f" {s[:10]:>10} {'chg':>8}" for s in sources)
    lines = [f"merge sweep ({sweep['method']}, coefficient t of the CPT model; {sweep['path']})",
             f"  {'t':>6}{header}"]
    for row in sweep["rows"]:
        cells = "".join(f" {row['loss'][s]:>10.4f} {row['change'][s]:>+8.4f}" for s in sources)
        mark = "  <- recommended" if row["coefficient"] == recommended else ""
        lines.append(f"  {row['coefficient']:>6g}{cells}{mark}")
    if recommended is None:
        lines.append(f"  no coefficient keeps the general loss within {sweep.get('tolerance')} nats of the base")
    return lines


def plot(run_dirs: list, out_png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_tasks = any(downstream_curves(r) for r in run_dirs)
    fig, axes = plt.subplots(1, 2 if with_tasks else 1, figsize=(13 if with_tasks else 8, 4.5), dpi=120, squeeze=False)
    styles = ["-", "--", ":", "-."]
    several = len(run_dirs) > 1
    for i, run_dir in enumerate(run_dirs):
        label_run = epath.Path(run_dir).name
        for weights, suffix, alpha in (("sources", "", 1.0), ("ema", " ema", 0.6)):
            for name, points in eval_curves(run_dir, weights).items():
                steps, losses = zip(*points)
                axes[0, 0].plot(steps, losses, styles[i % len(styles)], marker="o" if not suffix else "x", markersize=3,
                                alpha=alpha, label=f"{name}{suffix}" + (f" ({label_run})" if several else ""))
        if with_tasks:
            for name, points in downstream_curves(run_dir).items():
                steps, values = zip(*points)
                axes[0, 1].plot(steps, values, styles[i % len(styles)], marker="o", markersize=3,
                                label=name + (f" ({label_run})" if several else ""))
    axes[0, 0].set_xlabel("training step")
    axes[0, 0].set_ylabel("held-out loss (nats/token)")
    axes[0, 0].set_title("Eval loss per source" + (" — " + " vs ".join(epath.Path(r).name for r in run_dirs) if several else ""))
    if with_tasks:
        axes[0, 1].set_xlabel("training step")
        axes[0, 1].set_ylabel("score")
        axes[0, 1].set_title("Downstream tasks (lm-eval)")
    for ax in axes[0]:
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
    plot_routing(run_dir, run_dir / "routing_shift.png")  # MoE runs only
    return text


def compare(run_a, run_b) -> tuple[str, dict[str, float | None]]:
    """Side-by-side table of two runs and, per source, the share of the loss rise that run B removed.

    Where a run kept a moving average, its row follows (``NAME (ema)``); merge sweeps of
    either run follow the table.
    """
    a, b = summarize(run_a), summarize(run_b)
    a_ema, b_ema = summarize(run_a, "ema"), summarize(run_b, "ema")
    names = [n for n in a if n in b]
    if not names:
        raise UserError(f"'{run_a}' and '{run_b}' share no evaluation source")
    width = 16
    lines = [f"A = {run_a}", f"B = {run_b}",
             f"{'source':<{width}} {'A start':>8} {'A last':>8} {'A chg':>8} {'B start':>8} {'B last':>8} {'B chg':>8}  forgetting removed by B"]
    removed: dict[str, float | None] = {}

    def line(label, ra, rb, start_a, start_b):
        chg_a, chg_b = ra["last"] - start_a, rb["last"] - start_b
        share = 1 - chg_b / chg_a if chg_a > 0 else None
        share_text = f"{100 * share:.0f}%" if share is not None else "- (A did not forget)"
        lines.append(f"{label:<{width}} {start_a:>8.4f} {ra['last']:>8.4f} {chg_a:>+8.4f} "
                     f"{start_b:>8.4f} {rb['last']:>8.4f} {chg_b:>+8.4f}  {share_text}")
        return share

    for name in names:
        removed[name] = line(name, a[name], b[name], a[name]["start"], b[name]["start"])
        if name in a_ema and name in b_ema:
            line(f"{name} (ema)", a_ema[name], b_ema[name], a[name]["start"], b[name]["start"])
    lines.append("chg = last - step 0 eval loss; forgetting removed = 1 - rise_B / rise_A, for sources whose loss rose in A")
    a_bpb, b_bpb = summarize(run_a, unit="bits_per_byte"), summarize(run_b, unit="bits_per_byte")
    shared = [n for n in names if n in a_bpb and n in b_bpb]
    if shared:  # per byte of text: fair also when A and B tokenize differently (a vocabulary extension)
        lines.append(f"{'bits per byte':<{width}} {'A start':>8} {'A last':>8} {'A chg':>8} {'B start':>8} {'B last':>8} {'B chg':>8}")
        for name in shared:
            ra, rb = a_bpb[name], b_bpb[name]
            lines.append(f"{name:<{width}} {ra['start']:>8.4f} {ra['last']:>8.4f} {ra['change']:>+8.4f} "
                         f"{rb['start']:>8.4f} {rb['last']:>8.4f} {rb['change']:>+8.4f}")
    for run in (run_a, run_b):
        for sweep in merge_sweeps(run):
            lines += _sweep_lines(sweep)
    return "\n".join(lines), removed

"""The token budget of a run before it runs: what each source gives, how often it repeats, and when.

From a training config alone (no accelerator, no model): the mixture over steps exactly as
the trainer resolves it (``jaxcpt.data.mixture``: base weights, stages, ``lr_below`` stages
from the learning-rate schedule), the tokens each step draws, and each source's size
(``jaxcpt.plan.tokens``). Out of that come, per source, the tokens drawn over the run, the
epochs that makes, the step at which it starts repeating and the step it passes 4 epochs.

Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models", arXiv:2305.16264) found
that up to about 4 epochs repeated tokens are worth almost as much as fresh ones, and that
their value decays quickly beyond; a source planned past 4 epochs gets a warning.

Tokens per step: the mixer balances what ``data.weights_count`` counts (non-padding tokens
by default), and each source is packed on its own, so a source whose rows carry more padding
needs more rows for its share. Per step, source ``s`` gets
``batch * seq_len * w_s u_s / sum_k(w_k u_k / f_k)`` tokens, with ``f_k`` the real-token fill
of its rows (first-fit packing simulated on the sample; 1 for concat_split) and ``u_s`` the
tokens per counted unit (1 for tokens, ``seq_len * f_s`` for rows, the mean piece for documents).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcpt.data.mixture import WeightSchedule, resolve_stage_steps
from jaxcpt.data.stage_shapes import resolve_shapes
from jaxcpt.errors import UserError
from jaxcpt.optim.schedules import build_schedule, phase_boundaries
from jaxcpt.plan.text import format_table, short
from jaxcpt.plan.tokens import SourceCount, count_source, first_fit_fill
from jaxcpt.train.config import TrainConfig

REPEAT_WARN_EPOCHS = 4.0  # Muennighoff et al. 2023


@dataclasses.dataclass(frozen=True)
class SourcePlan:
    name: str
    count: SourceCount
    repeat: bool
    weight_start: float  # normalised mixture weight at step 0 and at the last step
    weight_end: float
    fill: float  # real-token share of this source's packed rows
    drawn: float  # tokens trained on over the run
    epochs: float | None
    repeat_step: int | None  # first step whose batch re-reads this source (None: never, or unknown size)
    four_epoch_step: int | None


@dataclasses.dataclass(frozen=True)
class BudgetPlan:
    steps: int
    batch_size: int
    seq_len: int
    tokens: np.ndarray  # [steps, sources] tokens each step draws from each source
    weights: np.ndarray  # [steps, sources] normalised mixture weights
    lr: np.ndarray  # [steps]
    boundaries: list[tuple[str, int]]  # LR schedule phases
    stage_starts: list[int | None]
    sources: list[SourcePlan]
    warnings: list[str]
    notes: list[str]
    stages: list[dict] = dataclasses.field(default_factory=list)  # per row shape: steps, seq_len, rows, positions, rope

    @property
    def total_tokens(self) -> float:
        return float(self.tokens.sum())


def _tokenizer_for(cfg: TrainConfig):
    """The tokenizer the trainer would use, or the exception saying why it cannot be loaded."""
    from jaxcpt.data.tokenize import load_tokenizer

    path = cfg.data.tokenizer or (cfg.init.path if cfg.init.source == "hf" else "")
    if not path:
        return UserError("no data.tokenizer set")
    try:
        return load_tokenizer(path)
    except (UserError, OSError, ValueError) as e:
        return e


def _weights_over_steps(cfg: TrainConfig, schedule, steps: int) -> tuple[np.ndarray, list[int | None]]:
    starts = resolve_stage_steps(cfg.data, schedule, steps)
    mixture = WeightSchedule.from_config(cfg.data, starts)
    edges = sorted({0, steps, *(s for s, _, _ in mixture.stages if s < steps),
                    *(min(s + r, steps) for s, r, _ in mixture.stages if s < steps)})
    weights = np.empty((steps, len(cfg.data.sources)))  # [steps, sources]
    for lo, hi in zip(edges[:-1], edges[1:]):
        ramping = any(s <= lo < s + r for s, r, _ in mixture.stages)
        if ramping:  # linear ramps: every step differs
            for step in range(lo, hi):
                weights[step] = mixture.at(step)
        else:  # constant between stage boundaries
            weights[lo:hi] = mixture.at(lo)
    return weights, starts


def _first_step_over(cumulative: np.ndarray, limit: float) -> int | None:
    over = np.flatnonzero(cumulative > limit)
    return int(over[0]) if over.size else None


def _fill_and_unit(data, counts: list, seq_len: int, notes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """([sources] real-token fill of rows of seq_len, [sources] tokens per counted unit), as the module docstring says."""
    fill = np.array([1.0 if data.packing == "concat_split" or data.elastic or not c.known  # elastic: full rows
                     else first_fit_fill(c.piece_lengths, seq_len, data.packing_bins) for c in counts])  # [sources]
    if data.weights_count == "tokens":
        per_unit = np.ones(len(counts))
    elif data.weights_count == "rows":
        per_unit = seq_len * fill
    else:  # documents: a counted unit is one packed piece
        per_unit = np.array([c.piece_lengths.mean() if c.known and len(c.piece_lengths) else seq_len / 2
                             for c in counts])
        note = "weights count documents; for sources of unknown size a piece is assumed to be seq_len/2"
        if not all(c.known for c in counts) and note not in notes:
            notes.append(note)
    return fill, per_unit


def _stage_rows(cfg: TrainConfig, segments: list, warnings: list[str]) -> list[dict]:
    """Per stretch of steps with one row shape: steps, seq_len, rows, row positions and the RoPE in force.

    The RoPE is the starting model's after model.rope (read from init.path's config, no weights); a
    stage longer than it was trained for without a model.rope change adds a warning with the numbers.
    """
    from jaxcpt.data.stage_shapes import stage_seq_lens
    from jaxcpt.model.rope_change import check_trained_length, describe_rope
    from jaxcpt.train.state import resolve_model_config

    try:
        model_cfg = resolve_model_config(cfg)
        rope = describe_rope(model_cfg)
        warnings += check_trained_length(model_cfg, cfg.model.rope, stage_seq_lens(cfg.data))
    except Exception as e:  # noqa: BLE001 - a plan without a readable model still plans the data
        rope = f"the starting model's ({type(e).__name__}: {e})"[:120]
    return [{"first": lo, "last": hi - 1, "seq_len": shape.seq_len, "rows": shape.rows,
             "row_positions": shape.tokens * (hi - lo), "rope": rope} for lo, hi, shape in segments]


def plan_budget(cfg: TrainConfig, *, sample_documents: int = 2000) -> BudgetPlan:
    data, steps = cfg.data, cfg.train.steps
    batch, seq_len = cfg.train.batch_size, data.seq_len
    schedule = build_schedule(cfg.optim.schedule, steps)
    lr = np.asarray(schedule(np.arange(steps)), np.float64)  # [steps]
    weights, starts = _weights_over_steps(cfg, schedule, steps)

    loaded: list = []

    def get_tokenizer():  # loaded once, and only if a source holds text
        if not loaded:
            loaded.append(_tokenizer_for(cfg))
        return loaded[0]

    shapes = resolve_shapes(data, batch_size=batch, seq_len=seq_len, stage_starts=starts)
    segments = shapes.segments(steps)
    counts_at = {length: [count_source(src, data, get_tokenizer, seq_len=length, sample_documents=sample_documents)
                          for src in data.sources] for length in shapes.seq_lens()}  # pieces are cut at each length
    counts = counts_at[seq_len]

    notes, warnings = [], []
    tokens = np.zeros((steps, len(counts)))  # [steps, sources]
    for lo, hi, shape in segments:  # each stretch of steps with one row shape (data.stages[].seq_len / batch_size)
        fill_at, per_unit = _fill_and_unit(data, counts_at[shape.seq_len], shape.seq_len, notes)
        share = weights[lo:hi] * per_unit  # [steps, sources]
        tokens[lo:hi] = shape.tokens * share / (share / fill_at).sum(axis=1, keepdims=True)
    fill, _ = _fill_and_unit(data, counts, seq_len, [])
    cumulative = np.cumsum(tokens, axis=0)  # [steps, sources]

    plans = []
    for i, (src, count) in enumerate(zip(data.sources, counts)):
        drawn = float(cumulative[-1, i])
        epochs = drawn / count.positions if count.known and count.positions > 0 else None
        repeat_step = _first_step_over(cumulative[:, i], count.positions) if count.known else None
        four_step = _first_step_over(cumulative[:, i], REPEAT_WARN_EPOCHS * count.positions) if count.known else None
        plans.append(SourcePlan(src.name, count, src.repeat, float(weights[0, i]), float(weights[-1, i]),
                                float(fill[i]), drawn, epochs, repeat_step, four_step))
        if count.known and count.positions == 0 and drawn > 0:
            warnings.append(f"source '{src.name}' has no training tokens ({count.how}) but is drawn from")
        elif repeat_step is not None and not src.repeat:
            warnings.append(f"source '{src.name}' has repeat: false and runs out at step {repeat_step:,} of {steps:,}: "
                            "the training stream ends there; add data, lower its weight or set repeat: true")
        elif epochs is not None and epochs > REPEAT_WARN_EPOCHS:
            warnings.append(
                f"source '{src.name}' is planned for {epochs:.2f} epochs (repeats from step {repeat_step:,}, passes "
                f"{REPEAT_WARN_EPOCHS:g} epochs at step {four_step:,}); beyond about 4 epochs repeated tokens lose "
                "most of their value (Muennighoff et al. 2023): add data, lower its weight or train fewer steps")
        if not count.known and drawn > 0:
            reason = count.how.removeprefix("unknown: ")
            notes.append(f"'{src.name}': size unknown ({reason}); only its planned draws are shown")
    if data.packing == "first_fit" and any(c.known for c in counts):
        notes.append("row fill (real tokens per row) simulates first-fit packing on the sampled documents")
    if not all(c.known for c in counts) and data.packing == "first_fit":
        notes.append("sources of unknown size are assumed to fill their rows (no padding): their draws are upper bounds")
    return BudgetPlan(steps, batch, seq_len, tokens, weights, lr, phase_boundaries(cfg.optim.schedule, steps),
                      starts, plans, warnings, notes, _stage_rows(cfg, segments, warnings))


def format_plan(plan: BudgetPlan) -> str:
    positions = sum(s["row_positions"] for s in plan.stages) if plan.stages else plan.steps * plan.batch_size * plan.seq_len
    shape = (f"{plan.batch_size} rows x {plan.seq_len} tokens" if len(plan.stages) <= 1 else
             f"{len(plan.stages)} row shapes (data.stages)")
    header = (f"{plan.steps:,} steps x {shape} = {short(positions)} row positions, "
              f"{short(plan.total_tokens)} real tokens planned")
    rows = []
    for s in plan.sources:
        weight = f"{s.weight_start:.3g}" + (f"->{s.weight_end:.3g}" if abs(s.weight_end - s.weight_start) > 1e-9 else "")
        rows.append([s.name, weight, short(s.count.positions), short(s.drawn), f"{s.fill:.2f}",
                     "?" if s.epochs is None else f"{s.epochs:.2f}",
                     "-" if s.repeat_step is None else f"{s.repeat_step:,}",
                     "-" if s.four_epoch_step is None else f"{s.four_epoch_step:,}",
                     s.count.how if s.count.known else "unknown (see note)"])
    table = format_table(["source", "weight", "tokens/epoch", "drawn", "fill", "epochs", "repeats at", "4 epochs at",
                          "size"], rows, right={1, 2, 3, 4, 5, 6, 7})
    lines = [header, "", table]
    if plan.stages:
        lines += ["", format_table(["steps", "seq_len", "rows", "positions trained", "row positions", "rope"],
                                   [[f"{s['first']:,}..{s['last']:,}", str(s["seq_len"]), str(s["rows"]),
                                     f"0..{s['seq_len'] - 1:,}", short(s["row_positions"]), s["rope"]]
                                    for s in plan.stages], right={1, 2, 4})]
    if plan.stage_starts:
        lines += [""] + [f"data.stages[{i}] starts at step {'never' if s is None else f'{s:,}'}"
                         for i, s in enumerate(plan.stage_starts)]
    lines += [""] + [f"WARNING: {w}" for w in plan.warnings] + [f"note: {n}" for n in plan.notes]
    return "\n".join(lines).rstrip()


def plot_plan(plan: BudgetPlan, out, title: str = "") -> None:
    """Mixture (token shares) over steps above the learning-rate schedule, repeat steps marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stride = max(1, plan.steps // 4000)
    steps = np.arange(0, plan.steps, stride)
    totals = plan.tokens[steps].sum(axis=1, keepdims=True)
    shares = (plan.tokens[steps] / np.where(totals > 0, totals, 1)).T  # [sources, points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top.stackplot(steps, shares, labels=[s.name for s in plan.sources], colors=colors, alpha=0.85)
    marks = sorted((step, i, what) for i, s in enumerate(plan.sources)
                   for step, what in ((s.repeat_step, "repeats"), (s.four_epoch_step, "4 epochs")) if step is not None)
    for k, (step, i, what) in enumerate(marks):  # labels on three staggered rows above the axes
        top.axvline(step, color=colors[i % len(colors)], linestyle="--", linewidth=1.5)
        top.text(step, 1.02 + 0.07 * (k % 3), f" {plan.sources[i].name} {what}", fontsize=8, va="bottom",
                 ha="left", color=colors[i % len(colors)])
    top.set_ylim(0, 1)
    top.set_ylabel("share of tokens")
    top.legend(loc="lower right", fontsize=8)
    top.set_title(title or "planned mixture and learning rate", pad=40)
    bottom.plot(np.arange(plan.steps), plan.lr, color="tab:blue", linewidth=2)
    peak = float(plan.lr.max()) if plan.lr.size and plan.lr.max() > 0 else 1.0
    for i, (name, step) in enumerate(plan.boundaries):
        bottom.axvline(step, color="0.5", linestyle=":", linewidth=1)
        if name != "end":  # staggered, so short phases do not print over their neighbours
            bottom.text(step, peak * (1.32 - 0.1 * (i % 3)), f" {name}", fontsize=8, color="0.3", va="center")
    for start in plan.stage_starts:
        if start is not None:
            for ax in (top, bottom):
                ax.axvline(start, color="k", linewidth=1)
    bottom.set_xlim(0, plan.steps)
    bottom.set_ylim(0, peak * 1.4)
    bottom.set_xlabel("training step")
    bottom.set_ylabel("learning rate")
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(str(out))
    plt.close(fig)


def plan_json(plan: BudgetPlan) -> dict:
    return {
        "steps": plan.steps, "batch_size": plan.batch_size, "seq_len": plan.seq_len,
        "planned_tokens": plan.total_tokens, "stage_starts": plan.stage_starts,
        "sources": [{"name": s.name, "tokens_per_epoch": s.count.positions, "documents": s.count.documents,
                     "size_exact": s.count.exact, "size": s.count.how, "repeat": s.repeat,
                     "weight_start": s.weight_start, "weight_end": s.weight_end, "fill": s.fill, "drawn": s.drawn,
                     "epochs": s.epochs, "repeat_step": s.repeat_step, "four_epoch_step": s.four_epoch_step}
                    for s in plan.sources],
        "warnings": plan.warnings, "notes": plan.notes,
        "stages": plan.stages,
    }

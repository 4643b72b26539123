"""``jaxcpt plot-schedule``: draw a training config's learning rate over the run, print its boundaries.

    jaxcpt plot-schedule --config configs/cpt.yaml [--total-steps N] [--out lr.png] [optim.schedule.peak_lr=1e-4 ...]

Reads only the ``optim:`` section of the YAML and ``train.steps`` (the run length), so a
schedule can be checked before anything else in the config is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from jaxcpt.config import ConfigError, apply_overrides, from_dict, read_yaml
from jaxcpt.optim.config import OptimConfig
from jaxcpt.optim.schedules import build_schedule, phase_boundaries

# Above this many steps the curve is drawn from a sample of steps (plus every boundary).
_MAX_PLOTTED_STEPS = 20_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML; only its optim: section and train.steps are read")
    parser.add_argument(
        "--total-steps", type=int, default=None, help="run length in steps; overrides train.steps from the config"
    )
    parser.add_argument("--out", default="lr_schedule.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.schedule.peak_lr=1e-4")


def run(args: argparse.Namespace) -> int:
    data = apply_overrides(read_yaml(args.config), list(args.overrides))
    optim = from_dict(OptimConfig, data.get("optim") or {}, prefix="optim")
    total_steps = _total_steps(data, args.total_steps)
    schedule = build_schedule(optim.schedule, total_steps)
    boundaries = phase_boundaries(optim.schedule, total_steps)

    rows = [(name, step, float(schedule(step))) for name, step in boundaries]
    print(format_boundary_table(rows))
    out = Path(args.out)
    plot_schedule(schedule, boundaries, total_steps, out, title=_title(optim, total_steps))
    print(f"wrote {out}")
    return 0


def _total_steps(data: dict, from_flag: int | None) -> int:
    """The run length: --total-steps if given, else train.steps from the config."""
    if from_flag is not None:
        total = from_flag
    else:
        train = data.get("train") or {}
        total = train.get("steps") if isinstance(train, dict) else None
        if total is None:
            raise ConfigError("no run length: the config has no train.steps; pass --total-steps N")
        if isinstance(total, bool) or not isinstance(total, int):
            raise ConfigError(f"config key 'train.steps' must be an integer, got {total!r}")
    if total < 1:
        raise ConfigError(f"total steps must be >= 1, got {total}")
    return total


def format_boundary_table(rows: list[tuple[str, int, float]]) -> str:
    """Phase, first step and lr at that step, one row per boundary, aligned for a terminal."""
    header = ("phase", "step", "lr")
    cells = [header] + [(name, str(step), f"{lr:.4e}") for name, step, lr in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}" for a, b, c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _title(optim: OptimConfig, total_steps: int) -> str:
    s = optim.schedule
    return f"{s.kind} schedule: peak {s.peak_lr:.3g}, {total_steps:,} steps"


def plot_schedule(schedule, boundaries: list[tuple[str, int]], total_steps: int, out: Path, title: str = "") -> None:
    """Write the lr curve to ``out`` with a dashed line and a label at each phase boundary."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    if total_steps <= _MAX_PLOTTED_STEPS:
        steps = np.arange(total_steps + 1)
    else:  # sample, but keep each boundary and the step before it so jumps stay sharp
        edges = [s for _, s in boundaries] + [max(s - 1, 0) for _, s in boundaries]
        steps = np.unique(np.concatenate([np.linspace(0, total_steps, 4000).astype(int), edges]))
    lrs = np.asarray(schedule(steps))

    fig, ax = plt.subplots(figsize=(10, 5), dpi=100)
    ax.plot(steps, lrs, color="tab:blue", linewidth=2)
    ymax = float(lrs.max()) if lrs.size and lrs.max() > 0 else 1.0
    # Phase names sit in a band above the curve, on three staggered rows, so narrow
    # phases (an optimizer warmup of a few steps) do not print over their neighbours.
    for i, (name, step) in enumerate(boundaries):
        ax.axvline(step, color="0.5", linestyle="--", linewidth=1)
        if name != "end":  # the end is the right edge of the axes
            ax.text(step, ymax * (1.24 - 0.08 * (i % 3)), f" {name}", fontsize=9, va="center", ha="left", color="0.2")
    ax.set_xlim(0, total_steps)
    ax.set_ylim(0, ymax * 1.32)
    ax.set_xlabel("training step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)

"""The routing section of the forgetting report, for MoE runs: how expert load per source moved.

Every evaluation of an MoE model records, per source, the load of each expert of each layer
(``jaxcpt.train.routing``: tokens routed to it over the layer's mean). This section compares the
last evaluation against the first (step 0, the base model) per source, and the sources against each
other at the last one: a domain whose tokens crowd onto a few experts, or replayed general data
whose routing drifts away from the base model's, shows here before it shows in the loss.

Plot (``routing_shift.png``): heatmaps of layers x experts, one per source of the load change since
step 0, and one per further source of its load minus the first source's at the last evaluation
(with general and domain sources: domain minus general).
"""

from __future__ import annotations

import numpy as np

from jaxcpt.train.metrics import read_metrics


def routing_evals(run_dir) -> list[tuple[int, dict[str, np.ndarray]]]:
    """[(step, {source: load [L, X]})] of the evaluations that recorded routing, in step order."""
    out = []
    for record in read_metrics(run_dir):
        if record.get("kind") != "eval":
            continue
        loads = {name: np.asarray(r["routing"]["load"]) for name, r in record.get("sources", {}).items()
                 if isinstance(r, dict) and "routing" in r}
        if loads:
            out.append((record["step"], loads))
    return out


def _entropy(load: np.ndarray) -> np.ndarray:
    p = load / np.maximum(load.sum(-1, keepdims=True), 1e-12)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)  # [L]


def routing_lines(run_dir) -> list[str]:
    evals = routing_evals(run_dir)
    if not evals:
        return []
    (first_step, first), (last_step, last) = evals[0], evals[-1]
    lines = [f"expert routing (load = tokens per expert / layer mean; step {first_step} -> {last_step})",
             f"  {'source':<20} {'max load':>17} {'min load':>17} {'entropy':>17} {'max |shift|':>12}"]
    for name in last:
        if name not in first:
            continue
        a, b = first[name], last[name]
        lines.append(f"  {name:<20} {a.max():>7.3f} -> {b.max():<7.3f} {a.min():>7.3f} -> {b.min():<7.3f} "
                     f"{_entropy(a).mean():>7.3f} -> {_entropy(b).mean():<7.3f} {np.abs(b - a).max():>12.3f}")
    names = list(last)
    for other in names[1:]:
        diff = last[other] - last[names[0]]
        layer, expert = np.unravel_index(np.abs(diff).argmax(), diff.shape)
        lines.append(f"  {other} - {names[0]} at step {last_step}: largest gap {diff[layer, expert]:+.3f} "
                     f"(layer {layer}, expert {expert}); mean |gap| {np.abs(diff).mean():.3f}")
    lines.append("  shift = load at the last evaluation - load at the first, per layer and expert (routing_shift.png)")
    bias = last_router_bias(run_dir)
    if bias is not None:
        step, values = bias
        spread = values.max(-1) - values.min(-1)  # [L]
        lines.append(f"  selection bias (auxiliary-loss-free balancing) at step {step}: per-layer spread "
                     + ", ".join(f"{s:.4f}" for s in spread) + " (max - min over experts, router-probability units)")
    return lines


def last_router_bias(run_dir) -> tuple[int, np.ndarray] | None:
    """(step, bias [L, X]) of the last training record that holds the selection bias; None for a run without one."""
    found = None
    for record in read_metrics(run_dir):
        if record.get("kind") == "train" and "bias" in (record.get("routing") or {}):
            found = (record["step"], np.asarray(record["routing"]["bias"]))
    return found


def plot_routing(run_dir, out_png) -> bool:
    """Write the heatmaps; False (nothing written) for a run without routing records."""
    evals = routing_evals(run_dir)
    if not evals:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (first_step, first), (last_step, last) = evals[0], evals[-1]
    names = [n for n in last if n in first]
    panels = [(f"{n}: load change, step {first_step} -> {last_step}", last[n] - first[n]) for n in names]
    panels += [(f"{n} - {names[0]} at step {last_step}", last[n] - last[names[0]]) for n in names[1:]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), dpi=110, squeeze=False)
    for ax, (title, values) in zip(axes[0], panels):
        bound = max(float(np.abs(values).max()), 1e-6)
        image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        layers, experts = values.shape
        ax.set_yticks(range(0, layers, max(1, layers // 12)))
        ax.set_xticks(range(0, experts, max(1, experts // 16)))
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(str(out_png))
    plt.close(fig)
    return True

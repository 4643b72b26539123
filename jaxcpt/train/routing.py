"""Routing you can see: expert load per layer of an MoE model, from the router counts a step returns.

The train step and the eval step return ``counts`` [L, X] (top-k assignments of real tokens to each
expert of each layer). Here they become what a person reads:

    load[l, e]   = counts[l, e] / mean_e counts[l, e]   (1 = an even share; 0 = an expert no token chose)
    entropy[l]   = -sum_e p log p of p = counts / sum (nats; log X when perfectly balanced)
    max/min[l]   = the largest and smallest load of layer l

Recorded in metrics.jsonl (the full [L, X] load as lists, the per-layer summaries as scalars, which
TensorBoard mirrors) every ``log_every`` steps, and per source at every evaluation, so a report can
show how routing on the domain data moves away from routing on the replayed data.

``describe_moe`` is the ``moe`` line of ``jaxcpt train --check``: the experts, the balancing in force,
and the run's tokens per total and per active parameter.
"""

from __future__ import annotations

import numpy as np


def expert_load(counts) -> np.ndarray:
    """counts [L, X] -> load [L, X], each layer divided by its mean (zeros stay zeros)."""
    counts = np.asarray(counts, np.float64)
    mean = counts.mean(-1, keepdims=True)
    return np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)


def routing_summary(counts) -> dict:
    """{load: [[...] per layer], layers: {layer_i: {entropy, max_load, min_load}}} from counts [L, X]."""
    counts = np.asarray(counts, np.float64)
    load = expert_load(counts)
    total = counts.sum(-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    entropy = -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)  # [L]
    layers = {f"layer_{i}": {"entropy": float(entropy[i]), "max_load": float(load[i].max()),
                             "min_load": float(load[i].min())} for i in range(load.shape[0])}
    return {"load": np.round(load, 5).tolist(), "layers": layers}


def load_shift(before: list, after: list) -> np.ndarray:
    """[L, X] change in expert load between two recorded loads (after - before)."""
    return np.asarray(after, np.float64) - np.asarray(before, np.float64)


def describe_moe(model_cfg, run_tokens: int, export_router_bias: str = "refuse") -> str:
    """The ``moe`` line of ``jaxcpt train --check``: experts, balancing, and the run's tokens per parameter,
    per total and per active parameter (the two differ by the experts a token does not use)."""
    moe = model_cfg.moe
    balancing = [f"aux loss coef {moe.router_aux_loss_coef:g}", f"z-loss coef {moe.router_z_loss_coef:g}"]
    if moe.router_bias_update_rate:
        balancing.append(f"selection bias, rate {moe.router_bias_update_rate:g} per step (exports: "
                         f"{export_router_bias} it)")
    total, active = model_cfg.num_params(), model_cfg.num_active_params()
    return (f"moe          {moe.num_experts} experts, top {moe.top_k} per token, expert width "
            f"{moe.expert_intermediate_size}; balancing: {', '.join(balancing)}; {run_tokens:,} tokens = "
            f"{run_tokens / total:.3g} per total parameter, {run_tokens / active:.3g} per active parameter")

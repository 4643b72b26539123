"""Activation rematerialisation per decoder block: what each ``model.remat`` policy keeps for the backward pass.

The block names its activations with ``checkpoint_name`` (the ``*_PROJ`` and ``ATTENTION_OUT``
names below); a policy lists the names it keeps, and ``jax.checkpoint`` recomputes the rest
from the block's input in the backward pass. The names are the ones MaxText and torchtitan
users know:

    none                 keep everything autodiff keeps (no jax.checkpoint): most memory, no recomputation
    minimal              keep every projection output (q, k, v, o, gate, up, down): recompute norms,
                         activations and attention
    save_dot_except_mlp  keep q, k, v, the attention output and o: recompute the MLP (gate, up, down)
    save_attention       keep q, k, v and the attention output: recompute o and the MLP
    full                 keep only the block's input: recompute the whole block
    offload              save_dot_except_mlp, with the kept activations moved to the host's pinned memory
                         (TPU; GPU where the runtime supports it): full's device memory, the MLP's recomputation,
                         plus the transfers

Attention's own residuals (the splash kernel's log-sum-exp, the einsum path's
probabilities) carry no name, so every policy but ``none`` reruns attention in the backward
pass: a fused kernel (splash, cuDNN) reruns its whole forward, which ``jaxcpt compile`` shows
as a fourth Pallas call (forward, forward again, dq, dkv); the einsum paths (reference, xla)
rerun only the scores when the attention output is kept.

``recompute_flops`` counts what each policy recomputes from the model's shapes: XLA's cost
analysis counts a scanned body once and a Pallas kernel not at all, so it cannot say.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

Q_PROJ, K_PROJ, V_PROJ, O_PROJ = "q_proj", "k_proj", "v_proj", "o_proj"
GATE_PROJ, UP_PROJ, DOWN_PROJ = "gate_proj", "up_proj", "down_proj"
COMPUTE_WEIGHT = "compute_weight"  # a weight cast to the compute dtype: never kept (cast_for_compute)
ATTENTION_OUT = "attention_out"  # [B, T, H, D], the attention kernel's output (the o projection's input)
PROJECTION_NAMES = {"q": Q_PROJ, "k": K_PROJ, "v": V_PROJ, "o": O_PROJ, "gate": GATE_PROJ, "up": UP_PROJ,
                    "down": DOWN_PROJ}  # the block's projection -> the name of its output

ATTENTION_SIDE = (Q_PROJ, K_PROJ, V_PROJ, ATTENTION_OUT)
KEPT = {  # policy -> names kept on the device (None: no jax.checkpoint at all)
    "none": None,
    "minimal": tuple(PROJECTION_NAMES.values()),
    "save_dot_except_mlp": (*ATTENTION_SIDE, O_PROJ),
    "save_attention": ATTENTION_SIDE,
    "full": (),
    "offload": (),
}
OFFLOADED = {"offload": (*ATTENTION_SIDE, O_PROJ)}  # policy -> names moved to pinned host memory
POLICIES = tuple(KEPT)  # in order of memory, roughly: none needs the most


def policy(name: str):
    """The ``jax.checkpoint`` policy of ``model.remat=name`` (None for 'none': no checkpoint)."""
    if name not in KEPT:
        raise ValueError(f"unknown remat policy '{name}'; known: {', '.join(POLICIES)}")
    if KEPT[name] is None:
        return None
    if name in OFFLOADED:
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=list(KEPT[name]), names_which_can_be_offloaded=list(OFFLOADED[name]),
            offload_src="device", offload_dst="pinned_host")
    if not KEPT[name]:
        return jax.checkpoint_policies.nothing_saveable
    return jax.checkpoint_policies.save_only_these_names(*KEPT[name])


# Policy -> the matmul groups its backward pass reruns. What a block's backward needs: q, k, v
# (attention's backward), attention's own residuals (rerun: they carry no name), the attention
# output (o's backward), o's output (through the residual add it is the MLP norm's input), gate's
# and up's outputs (the activation's and down's backward). down's output is needed by nothing
# but the next block's input, which the scan keeps, so no policy reruns it (remat drops work
# the backward does not use). tests/test_scan_and_loss.py checks this table against the jaxpr.
RECOMPUTED = {
    "none": (),
    "minimal": ("attention",),
    "save_dot_except_mlp": ("attention", "gate", "up"),
    "save_attention": ("attention", "o", "gate", "up"),
    "full": ("q", "k", "v", "attention", "o", "gate", "up"),
    "offload": ("attention", "gate", "up"),
}


def forward_flops_per_token(cfg) -> dict[str, float]:
    """Forward FLOPs per token of one layer, per matmul group (2 per multiply-add).

    Attention's two matmuls (scores, weighted values) over the keys a causal query sees on
    average, (T + 1) / 2 for a row of T tokens of one document (packing only lowers it),
    capped by the sliding window; the group ``attention`` is per token at ``seq_len``.
    """
    e, f, d, h, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_size, cfg.num_heads, cfg.num_kv_heads
    return {"q": 2 * e * h * d, "k": 2 * e * k * d, "v": 2 * e * k * d, "o": 2 * h * d * e,
            "gate": 2 * e * f, "up": 2 * e * f, "down": 2 * f * e}


def attention_flops_per_token(cfg, seq_len: int) -> float:
    """Forward attention FLOPs per token averaged over the model's layers (scores and values, causal; a Gated
    DeltaNet layer's delta rule in its place)."""
    total = 0.0
    for kind in cfg.layer_kinds():
        if kind == "linear_attention":  # a Gated DeltaNet layer: the chunked delta rule (Qwen3.5)
            total += cfg.linear_attention.mixer_flops_per_token(cfg.delta_rule_chunk_size)
            continue
        window = cfg.sliding_window if kind == "sliding_attention" else None
        if window is None or window >= seq_len:
            keys = (seq_len + 1) / 2
        else:  # the first `window` queries see 1..window keys, the rest see window
            keys = (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len
        widths = 2 * cfg.head_size if cfg.mla is None else cfg.mla.qk_head_dim + cfg.mla.v_head_dim  # q.k + p.v
        total += 2 * cfg.num_heads * widths * keys
    return total / cfg.num_layers


def recompute_flops(cfg, policy_name: str, tokens: int, seq_len: int, fused_attention: bool = True) -> float:
    """Extra FLOPs per step that ``policy_name`` spends rerunning forward work, for ``tokens`` tokens per step.

    ``fused_attention``: attention is one kernel (splash, cuDNN) whose backward reruns its whole
    forward; False for the einsum paths, which with the attention output kept rerun the scores
    (half of attention's FLOPs) and not the weighted sum.
    """
    groups = RECOMPUTED[policy_name]
    per_token = forward_flops_per_token(cfg)
    flops = sum(per_token[g] for g in groups if g != "attention")
    if "attention" in groups:
        kept = set(KEPT[policy_name] or ()) | set(OFFLOADED.get(policy_name, ()))
        half = not fused_attention and ATTENTION_OUT in kept
        flops += attention_flops_per_token(cfg, seq_len) * (0.5 if half else 1.0)
    return flops * cfg.num_layers * tokens


def step_flops(cfg, tokens: int, seq_len: int) -> float:
    """FLOPs per step without recomputation: forward + backward (3x forward) of the blocks and the output layer."""
    per_token = sum(forward_flops_per_token(cfg).values()) + attention_flops_per_token(cfg, seq_len)
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return 3 * (per_token * cfg.num_layers + head) * tokens


def cast_for_compute(params: dict, dtype, keep=()) -> dict:
    """A layer's weights in the compute dtype, each cast named ``COMPUTE_WEIGHT`` so that no policy saves it;
    the names in ``keep`` stay as stored (the matrices ``layers.dense`` casts itself).

    Autodiff through a scanned block saves what the backward pass reads, the weights included: a
    weight cast to the compute dtype would be saved per layer, a compute-dtype copy of the whole stack
    held from the forward pass to the backward (a float32 step on a bfloat16 base, as LoRA on a frozen
    base: twice the base's bytes). Every policy leaves the name out (``block_policy``), so the backward
    redoes the cast from the stored weight, an elementwise pass per layer.
    """
    dtype = jax.numpy.dtype(dtype)
    return {name: w if w.dtype == dtype or name in keep else checkpoint_name(w.astype(dtype), COMPUTE_WEIGHT)
            for name, w in params.items()}


def checkpointed(fn, cfg, **checkpoint_kwargs):
    """``fn`` (a decoder block, or one layer of a group) under ``jax.checkpoint`` with ``block_policy``;
    ``fn`` itself when that is None."""
    chosen = block_policy(cfg)
    return fn if chosen is None else jax.checkpoint(fn, policy=chosen, **checkpoint_kwargs)


def block_policy(cfg):
    """The ``jax.checkpoint`` policy a decoder block runs under, or None for no checkpoint.

    ``model.remat``'s policy; with ``none`` and weights stored in another dtype than the compute
    dtype, every value but the weights' casts is kept (``cast_for_compute``).
    """
    if cfg.remat != "none":
        return policy(cfg.remat)
    if jax.numpy.dtype(cfg.param_dtype) != jax.numpy.dtype(cfg.dtype):
        return jax.checkpoint_policies.save_anything_except_these_names(COMPUTE_WEIGHT)
    return None

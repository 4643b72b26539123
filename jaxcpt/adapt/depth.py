"""Block expansion (LLaMA-Pro, Wu et al. 2024): insert copies of decoder blocks that start as the identity.

A pre-norm block adds two residual branches to its input, x + attn(norm(x)) @ o and
then + mlp(norm(.)) @ down. A copy whose output projections ``o`` and ``down`` (and their
biases ``o_bias``, ``down_bias``, where the family has them) are zero adds exactly zero, so
the expanded model computes the same function as the original, to the bit in float32.
Training then moves only the copies at first (their gradients reach ``o`` and ``down``
first), which is what makes it a way to add capacity for a new domain without
disturbing the old blocks.

``init='noise'`` instead keeps the copy's output projections and adds Gaussian noise to
every tensor of the copy, with standard deviation ``noise_std`` times that tensor's own
standard deviation (so norm scales of all ones get none): a copy-with-noise variant
that does change the function.

Layer stacks are the ``layers.*`` parameters with a leading [L] axis; every one of them
is expanded alike, so the module knows no family's names beyond the residual outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcpt.errors import UserError

# The parameters through which a block writes into the residual stream: zero, the block is the identity.
RESIDUAL_OUTPUTS = ("o", "o_bias", "down", "down_bias", "lin_out")  # lin_out: a Gated DeltaNet layer's output
DEPTH_INITS = ("zero", "noise")


def insertion_points(num_layers: int, *, every: int | None = None, after: list[int] | None = None) -> list[int]:
    """Indices of the original blocks that get a copy inserted right after them (sorted, distinct)."""
    if (every is None) == (after is None):
        raise UserError("give exactly one of --every N or --after I,J,...")
    if every is not None:
        if every < 1 or every > num_layers:
            raise UserError(f"--every must be in [1, {num_layers}] for a model with {num_layers} layers, got {every}")
        return list(range(every - 1, num_layers, every))
    bad = [i for i in after if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"--after: block {bad[0]} does not exist; blocks are numbered 0..{num_layers - 1}")
    if len(set(after)) != len(after):
        raise UserError(f"--after lists a block twice: {after}")
    return sorted(after)


def expand_layers(layers: dict[str, np.ndarray], after: list[int], *, init: str = "zero", noise_std: float = 0.0,
                  seed: int = 0) -> tuple[dict[str, np.ndarray], list[int]]:
    """(layer stacks [L + len(after), ...], new indices of the inserted copies)."""
    if init not in DEPTH_INITS:
        raise UserError(f"--init must be one of {DEPTH_INITS}, got {init!r}")
    missing = [name for name in ("o", "down") if name not in layers]
    if missing:
        raise UserError(f"the model's layers have no '{missing[0]}' parameter; expand-depth needs the attention and "
                        "MLP output projections to make the copies start as the identity")
    rng = np.random.default_rng(seed)
    order: list[tuple[int, bool]] = []  # (original block, is a copy) in the new order
    for block in range(next(iter(layers.values())).shape[0]):
        order.append((block, False))
        if block in after:
            order.append((block, True))
    inserted = [position for position, (_, copy) in enumerate(order) if copy]
    out = {}
    for name, stack in layers.items():  # [L, ...]
        blocks = []
        for block, copy in order:
            value = stack[block]
            if copy and init == "zero" and name in RESIDUAL_OUTPUTS:
                value = np.zeros_like(value)
            elif copy and init == "noise" and noise_std > 0:
                scale = float(np.std(value.astype(np.float64)))
                value = (value.astype(np.float64) + rng.normal(0.0, noise_std * scale, value.shape)).astype(value.dtype)
            blocks.append(value)
        out[name] = np.stack(blocks)  # [L_new, ...]
    return out, inserted


# ModelConfig fields that hold one entry per layer: a copy takes the entry of the block it copies.
PER_LAYER_FIELDS = ("layer_types", "rope_layers")


def expanded_config(cfg, after: list[int]):
    """``cfg`` with copies of blocks ``after`` inserted: more layers, and every per-layer pattern (attention
    kind, RoPE or NoPE) keeps each copy beside its source with the source's entry, so the copy computes what its
    source computes (a sliding block's copy slides too) and the original blocks keep their kinds."""
    order = [block for i in range(cfg.num_layers) for block in ((i, i) if i in after else (i,))]
    patterns = {name: tuple(getattr(cfg, name)[i] for i in order) for name in PER_LAYER_FIELDS
                if getattr(cfg, name) is not None}
    return dataclasses.replace(cfg, num_layers=len(order), **patterns)


def expand_pattern(layers: dict[str, np.ndarray], pattern: tuple[str, ...], after: list[int], **init) -> tuple[
        dict[str, np.ndarray], list[int]]:
    """``expand_layers`` for a hybrid (``layer_types`` repeating ``pattern``): whole repeats of the pattern are copied.

    Inserting one block would shift every later layer's type (and the linear and attention stacks hold
    different layers), so a hybrid grows by copies of a whole repeat, inserted after the repeat it copies;
    ``after`` must name blocks that end a repeat. Returns (stacks, new indices of every inserted block).
    """
    size = len(pattern)
    bad = [i for i in after if i % size != size - 1]
    if bad:
        raise UserError(f"block {bad[0]} does not end a repeat of the layer pattern ({', '.join(pattern)}); a hybrid "
                        f"model grows by whole repeats to keep its layer types: use --every with a multiple of {size}, "
                        f"or --after blocks among {size - 1}, {2 * size - 1}, ...")
    total = layers["mlp_norm"].shape[0] // size  # repeats of the pattern ([L] stacks: norms, MLP)
    grouped = {name: stack.reshape(total, stack.shape[0] // total, *stack.shape[1:]) for name, stack in layers.items()}
    out, inserted_groups = expand_layers(grouped, [i // size for i in after], **init)  # [G_new, per repeat, ...]
    inserted = [g * size + j for g in inserted_groups for j in range(size)]
    return {name: stack.reshape(-1, *stack.shape[2:]) for name, stack in out.items()}, inserted

"""Next-token cross-entropy, computed in chunks of positions.

With a 128k vocabulary the [batch, seq, vocab] float32 logits of a full batch are
the largest tensor of a training step (and on CPU, the largest share of its memory
traffic). Here the output projection, log-softmax and loss run on ``chunk_size``
positions at a time inside a rematerialised scan, so neither the forward nor the
backward pass ever holds more than [batch, chunk_size, vocab] logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcpt.model import moe as moe_lib
from jaxcpt.model.layers import output_logits


def _chunk_loss(hidden, out_w, targets, mask, vocab_size, logit_softcap):
    """hidden [B, C, E], out_w [E, Vp], targets/mask [B, C] -> per-row (loss sum, lse^2 sum) [B]."""
    logits = output_logits(hidden, out_w, vocab_size=vocab_size, cap=logit_softcap)  # [B, C, Vp], padding -inf
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, C]
    return ((lse - target_logit) * mask).sum(-1), (lse * lse * mask).sum(-1)


def token_loss_sums(hidden, out_w, targets, mask, *, chunk_size: int = 0, vocab_size: int | None = None,
                    logit_softcap: float | None = None):
    """Per-row sums of next-token loss and of log-partition squared (for z-loss).

    hidden [B, T, E] (compute dtype), out_w [E, Vp], targets [B, T] int, mask [B, T] float
    (1 where the target is a real token) -> (loss_sum [B], lse_squared_sum [B]) in float32.
    ``chunk_size`` 0 (or >= T) computes all positions at once. Columns of ``out_w`` from
    ``vocab_size`` on (default: none) are vocabulary padding and get no probability;
    ``logit_softcap`` soft-caps the logits first (Gemma 2).
    """
    batch, length, _ = hidden.shape
    mask = mask.astype(jnp.float32)
    out_w = out_w.astype(hidden.dtype)
    chunk_loss = functools.partial(_chunk_loss, vocab_size=vocab_size or out_w.shape[-1], logit_softcap=logit_softcap)
    if chunk_size <= 0 or chunk_size >= length:
        return chunk_loss(hidden, out_w, targets, mask)
    pad = (-length) % chunk_size
    if pad:  # padded positions carry mask 0 and contribute nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    chunks = (length + pad) // chunk_size

    def to_chunks(x):  # [B, T, ...] -> [n, B, C, ...]
        return jnp.moveaxis(x.reshape(batch, chunks, chunk_size, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def body(carry, chunk):
        loss, lse2 = chunk_loss(chunk[0], out_w, chunk[1], chunk[2])
        return (carry[0] + loss, carry[1] + lse2), None

    zeros = jnp.zeros((batch,), jnp.float32)
    (loss_sum, lse2_sum), _ = jax.lax.scan(body, (zeros, zeros), (to_chunks(hidden), to_chunks(targets), to_chunks(mask)))
    return loss_sum, lse2_sum


def model_token_loss_sums(model, hidden, targets, mask, *, chunk_size: int = 0):
    """``token_loss_sums`` through ``model``'s output projection, real vocabulary and final soft-cap."""
    cfg = model.config
    return token_loss_sums(hidden, model.output_weights(), targets, mask, chunk_size=chunk_size,
                           vocab_size=cfg.vocab_size, logit_softcap=cfg.final_logit_softcap)


def model_loss(model, batch: dict, *, chunk_size: int = 0, z_loss_weight: float = 0.0):
    """Mean next-token loss over real target tokens of ``batch``, plus per-row sums for reporting.

    ``batch``: inputs, targets, segment_ids, positions, loss_mask [B, T]. Returns
    (objective, aux) with aux = {loss_sum [B], tokens [B], z_loss_sum [B]}; the
    objective divides by the batch's total tokens, so micro-batches can be summed.
    """
    hidden, router = model.hidden_states_and_router(batch["inputs"], batch.get("segment_ids"), batch.get("positions"))
    loss_sum, lse2_sum = model_token_loss_sums(model, hidden, batch["targets"], batch["loss_mask"], chunk_size=chunk_size)
    tokens = batch["loss_mask"].astype(jnp.float32).sum(-1)  # [B]
    total_tokens = jnp.maximum(tokens.sum(), 1.0)
    objective = (loss_sum.sum() + z_loss_weight * lse2_sum.sum()) / total_tokens
    objective = objective + moe_lib.router_objective(router, model.config.moe)  # 0 for a dense model
    return objective, {"loss_sum": loss_sum, "tokens": tokens, "z_loss_sum": lse2_sum}

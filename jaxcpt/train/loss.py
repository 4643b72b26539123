"""Next-token cross-entropy, computed in chunks of positions.

With a 128k vocabulary the [batch, seq, vocab] float32 logits of a full batch are
the largest tensor of a training step (and on CPU, the largest share of its memory
traffic). Here the output projection, log-softmax and loss run on ``chunk_size``
positions at a time inside a rematerialised scan, so neither the forward nor the
backward pass ever holds more than [batch, chunk_size, vocab] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcpt.model.layers import dense


def _chunk_loss(hidden, out_w, targets, mask):
    """hidden [B, C, E], out_w [E, V], targets/mask [B, C] -> per-row (loss sum, lse^2 sum) [B]."""
    logits = dense(hidden, out_w, out_dtype=jnp.float32)  # [B, C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, C]
    return ((lse - target_logit) * mask).sum(-1), (lse * lse * mask).sum(-1)


def token_loss_sums(hidden, out_w, targets, mask, *, chunk_size: int = 0):
    """Per-row sums of next-token loss and of log-partition squared (for z-loss).

    hidden [B, T, E] (compute dtype), out_w [E, V], targets [B, T] int, mask [B, T] float
    (1 where the target is a real token) -> (loss_sum [B], lse_squared_sum [B]) in float32.
    ``chunk_size`` 0 (or >= T) computes all positions at once.
    """
    batch, length, _ = hidden.shape
    mask = mask.astype(jnp.float32)
    out_w = out_w.astype(hidden.dtype)
    if chunk_size <= 0 or chunk_size >= length:
        return _chunk_loss(hidden, out_w, targets, mask)
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
        loss, lse2 = _chunk_loss(chunk[0], out_w, chunk[1], chunk[2])
        return (carry[0] + loss, carry[1] + lse2), None

    zeros = jnp.zeros((batch,), jnp.float32)
    (loss_sum, lse2_sum), _ = jax.lax.scan(body, (zeros, zeros), (to_chunks(hidden), to_chunks(targets), to_chunks(mask)))
    return loss_sum, lse2_sum


def model_loss(model, batch: dict, *, chunk_size: int = 0, z_loss_weight: float = 0.0):
    """Mean next-token loss over real target tokens of ``batch``, plus per-row sums for reporting.

    ``batch``: inputs, targets, segment_ids, positions, loss_mask [B, T]. Returns
    (objective, aux) with aux = {loss_sum [B], tokens [B], z_loss_sum [B]}; the
    objective divides by the batch's total tokens, so micro-batches can be summed.
    """
    hidden = model.hidden_states(batch["inputs"], batch.get("segment_ids"), batch.get("positions"))
    loss_sum, lse2_sum = token_loss_sums(hidden, model.output_weights(), batch["targets"], batch["loss_mask"], chunk_size=chunk_size)
    tokens = batch["loss_mask"].astype(jnp.float32).sum(-1)  # [B]
    total_tokens = jnp.maximum(tokens.sum(), 1.0)
    objective = (loss_sum.sum() + z_loss_weight * lse2_sum.sum()) / total_tokens
    return objective, {"loss_sum": loss_sum, "tokens": tokens, "z_loss_sum": lse2_sum}

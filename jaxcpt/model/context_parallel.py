"""Context parallelism: one row's sequence split over the ``context`` mesh axis, attention as a ring.

With ``mesh: {..., context: C}`` every activation's ``length`` axis is split C ways (the
rule table maps ``length`` -> ``context``), so a device holds T / C positions of each row
and the MLP, norms, projections and loss never see the whole row. Only attention needs
other positions; it runs here as **ring attention** under ``shard_map``: each device keeps
its queries, and the key/value blocks travel once around the ring (``lax.ppermute``), each
step folded into the output by flash-style online-softmax accumulation (running
log-sum-exp). Why a ring rather than all-gathering K/V: the gathered K/V of a 128k row are
T x kv_heads x head_dim x 2 per layer *on every device* and the gather cannot overlap the
attention it feeds; the ring holds two blocks of T / C at a time and sends the next block
while this one is being computed, so memory stays flat as rows grow (the point of long rows).

**Load balance.** Under a causal mask the last positions attend to the most keys. The
row is cut into 2C chunks and device i holds chunks i and 2C-1-i (``to_balanced``), so
every device does the same work (the zig-zag layout of Megatron and OLMo-core). The
model reorders the integer inputs once at the start of the forward pass and the final
hidden states once at its end (``Transformer.hidden_states``); positions travel with the
tokens, so RoPE, documents and the loss are unchanged.

**Masks.** Causality and the sliding window compare *global* indices (the chunk each
block came from), packed documents compare segment ids carried around the ring with the
keys, and attention soft-capping (Gemma 2) is applied to each block's scores: the same
mask and scores as ``attention_reference``, so losses equal the unsplit run.

Each block is computed by ``_flash_block``: a ``custom_vjp`` that scans key sub-blocks of
``kv_chunk`` positions, saves only (output, log-sum-exp) and recomputes scores in the
backward pass, so no [T/C, T/C] score matrix is ever kept per head. It is plain XLA on
every platform; the TPU splash kernel per block is not wired in yet (docs/long-context.md).

Shapes: q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T]; H = K * G; c = T / (2C).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcpt.errors import UserError

CONTEXT_AXIS = "context"
KV_CHUNK = 512  # key sub-block of _flash_block: [B, H, T/C, 512] float32 scores at a time


def context_size() -> int:
    """Size of the ``context`` axis of the mesh being traced under (1 without a mesh or the axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return 1
    return dict(mesh.shape).get(CONTEXT_AXIS, 1)


def check_sequence_split(seq_len: int, context: int) -> None:
    """The load-balanced layout cuts a row into 2 * context equal chunks."""
    if context > 1 and seq_len % (2 * context):
        multiple = 2 * context
        raise UserError(
            f"the 'context' mesh axis ({context}) does not divide the sequence: context parallelism cuts each row of "
            f"{seq_len} tokens into 2 x {context} = {multiple} equal chunks (two mirrored chunks per device, for causal "
            f"load balance); set data.seq_len to a multiple of {multiple} (e.g. {-(-seq_len // multiple) * multiple}) "
            f"or change mesh.context")


def to_balanced(x: jax.Array, context: int) -> jax.Array:
    """x [B, T, ...] in row order -> [B, T, ...] with chunk order 0, 2C-1, 1, 2C-2, ...

    Split T over ``context`` contiguously afterwards and device i holds chunks i and 2C-1-i.
    """
    b, t = x.shape[:2]
    c = t // (2 * context)
    halves = x.reshape(b, 2, context, c, *x.shape[2:])  # [B, 2, C, c, ...]
    first, second = halves[:, 0], jnp.flip(halves[:, 1], axis=1)  # [B, C, c, ...] each; second: chunks 2C-1 .. C
    return jnp.stack([first, second], axis=2).reshape(x.shape)  # [B, C, 2, c, ...] -> [B, T, ...]


def from_balanced(x: jax.Array, context: int) -> jax.Array:
    """The inverse of ``to_balanced``: [B, T, ...] in the balanced order -> row order."""
    b, t = x.shape[:2]
    c = t // (2 * context)
    pairs = x.reshape(b, context, 2, c, *x.shape[2:])  # [B, C, 2, c, ...]
    first, second = pairs[:, :, 0], jnp.flip(pairs[:, :, 1], axis=1)
    return jnp.concatenate([first, second], axis=1).reshape(x.shape)


def local_indices(shard: jax.Array, context: int, chunk: int) -> jax.Array:
    """Row indices [2c] of the positions device ``shard`` holds in the balanced layout."""
    steps = jnp.arange(chunk, dtype=jnp.int32)
    return jnp.concatenate([shard * chunk + steps, (2 * context - 1 - shard) * chunk + steps])


# ----------------------------------------------------------------------------- one block, flash-style


def _allowed(q_idx, k_idx, q_seg, k_seg, window):
    """[B, 1, 1, Tq, n]: causal by row index, same document, inside the window (as ``attention_mask``)."""
    ok = k_idx[None, :] <= q_idx[:, None]  # [Tq, n]
    if window is not None:
        ok &= k_idx[None, :] > q_idx[:, None] - window
    same_doc = q_seg[:, :, None] == k_seg[:, None, :]  # [B, Tq, n]
    return (ok[None] & same_doc)[:, None, None]


def _scores(q, k, scale, softcap):
    """q [B, Tq, K, G, D], k [B, n, K, D] -> (capped scores, tanh or None) [B, K, G, Tq, n] float32."""
    s = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _kv_chunks(x, chunk):  # [B, n*chunk, ...] -> [n, B, chunk, ...]
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _chunk_of(length: int, kv_chunk: int) -> int:
    return kv_chunk if length % kv_chunk == 0 and length > kv_chunk else length


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash_block(q, k, v, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk):
    """Attention of q [B, Tq, K, G, D] to one key block k/v [B, Tk, K, D] -> (out [B, Tq, K, G, D] float32
    normalised within the block, lse [B, K, G, Tq] float32, -inf where the block holds no allowed key)."""
    return _flash_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk)


def _flash_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk):
    b, tq, kh, g, d = q.shape
    chunk = _chunk_of(k.shape[1], kv_chunk)
    neg = jnp.finfo(jnp.float32).min

    def body(carry, blk):
        m, l, o = carry  # [B, K, G, Tq], [B, K, G, Tq], [B, K, G, Tq, D]
        k_j, v_j, idx_j, seg_j = blk
        s, _ = _scores(q, k_j, scale, softcap)
        mask = _allowed(q_idx, idx_j, q_seg, seg_j, window)
        m_new = jnp.maximum(m, jnp.where(mask, s, neg).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)  # [B, K, G, Tq, n]
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bskd->bkgtd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
        return (m_new, l * alpha + p.sum(-1), o * alpha[..., None] + pv), None

    init = (jnp.full((b, kh, g, tq), neg, jnp.float32), jnp.zeros((b, kh, g, tq), jnp.float32),
            jnp.zeros((b, kh, g, tq, d), jnp.float32))
    blocks = (_kv_chunks(k, chunk), _kv_chunks(v, chunk), k_idx.reshape(-1, chunk), _kv_chunks(k_seg, chunk))
    (m, l, o), _ = jax.lax.scan(body, init, blocks)
    seen = l > 0
    out = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return jnp.moveaxis(out, 3, 1), lse  # out [B, Tq, K, G, D]


def _flash_fwd(q, k, v, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk):
    out, lse = _flash_forward(q, k, v, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk)
    return (out, lse), (q, k, v, q_idx, k_idx, q_seg, k_seg, out, lse)


def _flash_bwd(window, scale, softcap, kv_chunk, residuals, cotangents):
    """The flash-attention backward pass, key sub-block by sub-block; ``d_lse`` enters as p * d_lse on the scores."""
    q, k, v, q_idx, k_idx, q_seg, k_seg, out, lse = residuals
    d_out, d_lse = cotangents  # [B, Tq, K, G, D], [B, K, G, Tq]
    chunk = _chunk_of(k.shape[1], kv_chunk)
    d_out_t = jnp.moveaxis(d_out, 1, 3)  # [B, K, G, Tq, D]
    delta = (d_out_t * jnp.moveaxis(out, 1, 3)).sum(-1) - d_lse  # [B, K, G, Tq]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)

    def body(d_q, blk):
        k_j, v_j, idx_j, seg_j = blk
        s, t = _scores(q, k_j, scale, softcap)
        mask = _allowed(q_idx, idx_j, q_seg, seg_j, window)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)  # [B, K, G, Tq, n]
        d_v = jnp.einsum("bkgts,bkgtd->bskd", p, d_out_t)
        d_p = jnp.einsum("bkgtd,bskd->bkgts", d_out_t, v_j.astype(jnp.float32))
        d_s = p * (d_p - delta[..., None])
        if t is not None:  # through softcap * tanh(s / softcap)
            d_s = d_s * (1.0 - t * t)
        d_s = d_s * scale
        d_q = d_q + jnp.einsum("bkgts,bskd->btkgd", d_s, k_j.astype(jnp.float32))
        d_k = jnp.einsum("bkgts,btkgd->bskd", d_s, q.astype(jnp.float32))
        return d_q, (d_k, d_v)

    blocks = (_kv_chunks(k, chunk), _kv_chunks(v, chunk), k_idx.reshape(-1, chunk), _kv_chunks(k_seg, chunk))
    d_q, (d_k, d_v) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), blocks)

    def unchunk(x):  # [n, B, chunk, K, D] -> [B, Tk, K, D]
        return jnp.moveaxis(x, 0, 1).reshape(k.shape)

    return (d_q.astype(q.dtype), unchunk(d_k).astype(k.dtype), unchunk(d_v).astype(v.dtype), None, None, None, None)


_flash_block.defvjp(_flash_fwd, _flash_bwd)


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets -> the attention over their union (log-sum-exp weights)."""
    top = jnp.maximum(lse_a, lse_b)  # finite: lse_a always holds the query's own position
    w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)
    lse = top + jnp.log(w_a + w_b)  # [B, K, G, Tq]
    a = jnp.moveaxis(jnp.exp(lse_a - lse), 3, 1)[..., None]  # [B, Tq, K, G, 1]
    b = jnp.moveaxis(jnp.exp(lse_b - lse), 3, 1)[..., None]
    return out_a * a + out_b * b, lse


# ----------------------------------------------------------------------------- the ring


def _ring_local(q, k, v, segment_ids, *, context, window, scale, softcap, kv_chunk):
    """Per device: q [b, 2c, h, D], k/v [b, 2c, kv, D], segment_ids [b, 2c] (balanced layout) -> [b, 2c, h, D]."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    shard = jax.lax.axis_index(CONTEXT_AXIS)
    idx = local_indices(shard, context, t // 2)  # [2c] row indices of this device's positions
    q5 = q.reshape(b, t, kh, h // kh, d)  # [b, 2c, K, G, D]

    def block(q_, k_, v_, q_idx, k_idx, q_seg, k_seg):
        return _flash_block(q_, k_, v_, q_idx, k_idx, q_seg, k_seg, window, scale, softcap, kv_chunk)

    out, lse = block(q5, k, v, idx, idx, segment_ids, segment_ids)  # own block first: every query sees itself
    ring = [(j, (j + 1) % context) for j in range(context)]

    def step(carry, _):
        out, lse, blk = carry
        # Send the block on before computing with it, so the transfer overlaps the block's attention.
        # (The last step's send is unused: the price of a fixed-shape scan.)
        blk = jax.tree.map(lambda x: jax.lax.ppermute(x, CONTEXT_AXIS, ring), blk)
        k_j, v_j, idx_j, seg_j = blk
        out_j, lse_j = block(q5, k_j, v_j, idx, idx_j, segment_ids, seg_j)
        out, lse = _merge(out, lse, out_j, lse_j)
        return (out, lse, blk), None

    (out, _, _), _ = jax.lax.scan(step, (out, lse, (k, v, idx, segment_ids)), None, length=context - 1)
    return out.reshape(b, t, h, d).astype(q.dtype)


def ring_attention(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, rules=(),
                   kv_chunk: int | None = None):
    """Attention over the ``context`` axis of the current mesh: inputs in the balanced layout (``to_balanced``),
    the same signature as the functions of ``jaxcpt.model.attention``."""
    from jaxcpt.sharding.rules import logical_to_spec

    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(mesh.shape)
    context = shape[CONTEXT_AXIS]
    check_sequence_split(q.shape[1], context)
    q_spec = logical_to_spec(("batch", "length", "act_heads", None), rules, shape, q.shape)
    kv_spec = logical_to_spec(("batch", "length", "act_kv_heads", None), rules, shape, k.shape)
    if tuple(q_spec)[1:2] != (CONTEXT_AXIS,):
        raise UserError(f"context parallelism needs the sharding rule length -> context (the 'length' rule gives "
                        f"{q_spec}); remove the sharding_rules override of 'length'")
    if (tuple(q_spec)[2:3] or (None,)) != (tuple(kv_spec)[2:3] or (None,)):
        # KV heads cannot split like query heads (e.g. 2 KV heads on tensor=4): one KV head per query head.
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        kv_spec = q_spec
    seg_spec = PartitionSpec(*tuple(q_spec)[:2])
    local = functools.partial(_ring_local, context=context, window=sliding_window,
                              scale=q.shape[-1] ** -0.5 if scale is None else scale, softcap=softcap,
                              kv_chunk=kv_chunk or KV_CHUNK)
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, segment_ids)


class ContextLayout:
    """What ``Transformer.hidden_states`` does differently under a ``context`` axis: reorder, ring, restore."""

    def __init__(self, context: int, seq_len: int, rules):
        check_sequence_split(seq_len, context)
        self.context, self.rules = context, rules

    @classmethod
    def current(cls, seq_len: int, rules) -> "ContextLayout | None":
        """The layout for the mesh being traced under, or None without a ``context`` axis (> 1)."""
        context = context_size()
        return cls(context, seq_len, rules) if context > 1 else None

    def inputs(self, *arrays):
        """[B, T] integer inputs (ids, segment ids, positions) in the balanced order."""
        return tuple(to_balanced(x, self.context) for x in arrays)

    def attention(self):
        return functools.partial(ring_attention, rules=self.rules)

    def outputs(self, hidden):
        """[B, T, E] back in row order, for the loss and the logits."""
        return from_balanced(hidden, self.context)

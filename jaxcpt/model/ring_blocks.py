"""One ring step of context-parallel attention: a query block against one key/value block, forward and backward.

The ring (``jaxcpt.model.context_parallel``) calls these in its own ``custom_vjp``; nothing here is
differentiated by autodiff. Two implementations of the same pair of functions:

    forward(q, k, v, ...)  -> out [b, K, G, Tq, D] float32 (normalised within the block),
                              lse [b, K, G, Tq] float32 (the block's log-sum-exp of the scores)
    backward(q, k, v, ..., out, d_out, lse) -> dq [b, K, G, Tq, D], dk, dv [b, K, Tk, D], float32

with q [b, K, G, Tq, D], k/v [b, K, Tk, D] (head-major: K KV heads, G query heads per KV head),
segment ids [b, Tq] / [b, Tk]. ``backward`` takes the *whole ring's* output, its cotangent and its
log-sum-exp, not the block's: then exp(scores - lse) are the final softmax probabilities restricted
to this block, delta = rowsum(d_out * out) is the final one, and the per-block gradients of the
flash-attention backward (Dao et al. 2022) simply add up over the ring (Liu et al. 2023, ring
attention; the zhuzilin/ring-flash-attention backward). So the forward keeps only (out, lse).

- ``xla_*``: einsums over key sub-blocks of ``kv_chunk`` positions (a ``scan``), masks from the
  positions' row indices (causal, sliding window) and segment ids: any block, any platform.
- ``splash_*``: the Pallas splash kernel (TPU; Pallas interpret mode elsewhere, for tests) with a
  static mask (causal for a device's own block, full for the others: in the balanced layout every
  other block the ring computes is entirely visible) and segment ids. Its forward returns the
  log-sum-exp (``save_residuals=True``); its backward is the kernel's own dq / dkv kernels called
  with the ring's (out, lse), through ``splash_attention_kernel._splash_attention_bwd``, a private
  function of jax (0.10.2): the public kernel differentiates only with its own block-local
  (out, lse), which is not what a ring needs. ``splash_available`` says whether this jax has it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SPLASH_BLOCK = 512  # splash's query / key tile, as jaxcpt.model.attention uses it


# ----------------------------------------------------------------------------- XLA blocks


def _allowed(q_idx, k_idx, q_seg, k_seg, window):
    """[b, 1, 1, Tq, n]: causal by row index, same document, inside the window (as ``attention_mask``)."""
    ok = k_idx[None, :] <= q_idx[:, None]  # [Tq, n]
    if window is not None:
        ok &= k_idx[None, :] > q_idx[:, None] - window
    same_doc = q_seg[:, :, None] == k_seg[:, None, :]  # [b, Tq, n]
    return (ok[None] & same_doc)[:, None, None]


def _scores(q, k, scale, softcap):
    """q [b, K, G, Tq, D], k [b, K, n, D] -> (capped scores, tanh or None) [b, K, G, Tq, n] float32."""
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if softcap is None:
        return s, None
    t = jnp.tanh(s / softcap)
    return softcap * t, t


def _chunk_of(length: int, kv_chunk: int) -> int:
    return kv_chunk if length % kv_chunk == 0 and length > kv_chunk else length


def _key_chunks(k, v, k_idx, k_seg, chunk):
    """k/v [b, K, n*chunk, D] -> [n, b, K, chunk, D]; k_idx [n*chunk] -> [n, chunk]; k_seg [b, n*chunk] -> [n, b, chunk]."""
    b, kh, t, d = k.shape

    def split(x):
        return jnp.moveaxis(x.reshape(b, kh, t // chunk, chunk, d), 2, 0)

    return split(k), split(v), k_idx.reshape(-1, chunk), jnp.moveaxis(k_seg.reshape(b, t // chunk, chunk), 1, 0)


def xla_forward(opts, q, k, v, q_idx, k_idx, q_seg, k_seg):
    """Online-softmax attention of q to the block, key sub-block by sub-block -> (out, lse; -inf where no key)."""
    b, kh, g, tq, d = q.shape
    neg = jnp.finfo(jnp.float32).min

    def body(carry, blk):
        m, l, o = carry  # [b, K, G, Tq] running max, [b, K, G, Tq] running sum, [b, K, G, Tq, D]
        k_j, v_j, idx_j, seg_j = blk
        s, _ = _scores(q, k_j, opts.scale, opts.softcap)  # [b, K, G, Tq, n]
        mask = _allowed(q_idx, idx_j, q_seg, seg_j, opts.window)
        m_new = jnp.maximum(m, jnp.where(mask, s, neg).max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgts,bksd->bkgtd", p.astype(v.dtype), v_j, preferred_element_type=jnp.float32)
        return (m_new, l * alpha + p.sum(-1), o * alpha[..., None] + pv), None

    init = (jnp.full((b, kh, g, tq), neg, jnp.float32), jnp.zeros((b, kh, g, tq), jnp.float32),
            jnp.zeros((b, kh, g, tq, d), jnp.float32))
    (m, l, o), _ = jax.lax.scan(body, init, _key_chunks(k, v, k_idx, k_seg, _chunk_of(k.shape[2], opts.kv_chunk)))
    seen = l > 0
    out = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out, lse


def xla_backward(opts, q, k, v, q_idx, k_idx, q_seg, k_seg, out, d_out, lse):
    """The flash-attention backward of one block given the ring's out / d_out [b, K, G, Tq, D] and lse [b, K, G, Tq]."""
    dt = q.dtype
    chunk = _chunk_of(k.shape[2], opts.kv_chunk)
    delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)  # [b, K, G, Tq]
    lse_safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
    d_out = d_out.astype(dt)

    def body(d_q, blk):
        k_j, v_j, idx_j, seg_j = blk
        s, t = _scores(q, k_j, opts.scale, opts.softcap)
        mask = _allowed(q_idx, idx_j, q_seg, seg_j, opts.window)
        p = jnp.where(mask, jnp.exp(s - lse_safe[..., None]), 0.0)  # [b, K, G, Tq, n]: the final probabilities
        d_v = jnp.einsum("bkgts,bkgtd->bksd", p.astype(dt), d_out, preferred_element_type=jnp.float32)
        d_p = jnp.einsum("bkgtd,bksd->bkgts", d_out, v_j, preferred_element_type=jnp.float32)
        d_s = p * (d_p - delta[..., None])
        if t is not None:  # through softcap * tanh(s / softcap)
            d_s = d_s * (1.0 - t * t)
        d_s = (d_s * opts.scale).astype(dt)
        d_q = d_q + jnp.einsum("bkgts,bksd->bkgtd", d_s, k_j, preferred_element_type=jnp.float32)
        d_k = jnp.einsum("bkgts,bkgtd->bksd", d_s, q, preferred_element_type=jnp.float32)
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), _key_chunks(k, v, k_idx, k_seg, chunk))

    def unchunk(x):  # [n, b, K, chunk, D] -> [b, K, Tk, D]
        return jnp.moveaxis(x, 0, 2).reshape(k.shape)

    return d_q, unchunk(d_k), unchunk(d_v)


# ----------------------------------------------------------------------------- splash blocks (TPU)


def splash_available() -> bool:
    """Whether this jax has the splash kernel's backward as a function the ring can call with its own (out, lse)."""
    try:
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    except ImportError:
        return False
    return callable(getattr(splash, "_splash_attention_bwd", None))


def splash_fits(q_len: int, k_len: int) -> bool:
    """Splash tiles each block in 128-aligned tiles (the TPU lane width)."""
    return q_len % 128 == 0 and k_len % 128 == 0


def _splash_kernel(opts, groups: int, q_len: int, k_len: int, causal: bool):
    """The MQA splash kernel (one KV head, ``groups`` query heads) for a [q_len, k_len] block, returning the lse."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (q_len, k_len)
    one = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    bq, bkv = min(SPLASH_BLOCK, q_len), min(SPLASH_BLOCK, k_len)
    sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                              block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return splash.make_splash_mqa_single_device(masks.MultiHeadMask([one] * groups), block_sizes=sizes,
                                                save_residuals=True, attn_logits_soft_cap=opts.softcap,
                                                interpret=opts.interpret)


def splash_forward(opts, causal, q, k, v, q_seg, k_seg):
    """Splash attention of q to the block -> (out, lse) as ``xla_forward`` (lse finite: splash masks with a
    large negative value, so a query with no key here gets ~-2e38, which weighs nothing when merged)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, kh, g, tq, d = q.shape
    kernel = _splash_kernel(opts, g, tq, k.shape[2], causal)
    q_scaled = (q * opts.scale).astype(q.dtype)  # splash has no scale argument

    def one_row(q_row, k_row, v_row, q_seg_row, k_seg_row):  # q [K, G, Tq, D], k/v [K, Tk, D]
        ids = splash.SegmentIds(q=q_seg_row, kv=k_seg_row)
        return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q_row, k_row, v_row)

    out, (lse,) = jax.vmap(one_row)(q_scaled, k, v, q_seg, k_seg)  # [b, K, G, Tq, D], [b, K, G, Tq]
    return out.astype(jnp.float32), lse.astype(jnp.float32)


def _collapsed(mask_info):
    """What ``splash._splash_attention`` does to a MaskInfo before its kernels see it."""
    if mask_info is None or mask_info.partial_mask_blocks is None:
        return mask_info
    blocks = mask_info.partial_mask_blocks
    return mask_info._replace(partial_mask_blocks=blocks.reshape(-1, *blocks.shape[-2:]))


def splash_backward(opts, causal, q, k, v, q_seg, k_seg, out, d_out, lse):
    """The splash dq / dkv kernels of one block, given the ring's out / d_out and lse (as ``xla_backward``)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, kh, g, tq, d = q.shape
    kernel = _splash_kernel(opts, g, tq, k.shape[2], causal)
    kw = kernel.kwargs
    dq_info, dkv_info = _collapsed(kernel.dq_mask_info), _collapsed(kernel.dkv_mask_info)
    q_scaled = (q * opts.scale).astype(q.dtype)
    out, d_out = out.astype(q.dtype), d_out.astype(q.dtype)

    def one_head(q_g, k_g, v_g, o_g, do_g, lse_g, ids):  # [G, Tq, D], [Tk, D], [Tk, D], [G, Tq, D] x2, [G, Tq]
        residuals = (q_g, k_g, v_g, ids, None, o_g, lse_g, dq_info, dkv_info)
        grads = splash._splash_attention_bwd(False, kw["mask_value"], True, kw["block_sizes"], None,
                                             kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"],
                                             residuals, do_g)
        return grads[3:6]  # dq (of the scaled q), dk, dv

    def one_row(q_row, k_row, v_row, o_row, do_row, lse_row, q_seg_row, k_seg_row):
        ids = splash.SegmentIds(q=q_seg_row, kv=k_seg_row)
        return jax.vmap(lambda *a: one_head(*a, ids))(q_row, k_row, v_row, o_row, do_row, lse_row)

    d_q, d_k, d_v = jax.vmap(one_row)(q_scaled, k, v, out, d_out, lse, q_seg, k_seg)
    return (d_q.astype(jnp.float32) * opts.scale, d_k.astype(jnp.float32), d_v.astype(jnp.float32))

"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, arXiv 2412.06464): the linear-attention layer of Qwen3.5.

Each head keeps a recurrent state S [Dk, Dv]; token t decays it by exp(g_t), then writes the
delta-rule correction of what S already predicts for its key (learning rate beta_t):

    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - (exp(g_t) S_{t-1})^T k_t))^T,    o_t = S_t^T q_t

Training runs the chunked parallel form of transformers' reference (``torch_chunk_gated_delta_rule``
in ``transformers/models/qwen3_5/modeling_qwen3_5.py``, the fallback of flash-linear-attention's
kernel): within a chunk of C tokens the recurrence is one triangular solve (the "UT transform") and a
few matmuls; ``lax.scan`` carries S from chunk to chunk. The op order follows the reference so float32
results agree to rounding.

Packed rows: a document boundary resets both the recurrent state and the short convolution. Inside
a chunk that is a mask on the same-document pairs (never a -inf decay, whose differences would be
NaN); across chunks, the carried state is read only by tokens of the document it belongs to.

Shape letters: B batch, T length, E model width, Hk / Hv key / value heads (Hv = Hk * G), Dk / Dv
their head widths, C conv channels (2 Hk Dk + Hv Dv) or chunk length in the rule, N chunks, W conv width.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcpt.model.layers import dense, low_rank_update


def document_index(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, T] int32 count of document starts so far (0 for the first document).

    A document is a run of one segment id (padding, id 0, included): the index only grows, so
    equal indices mean the same contiguous run, whatever ids the packer used.
    """
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)  # [B, T]
    return jnp.cumsum(starts, axis=1, dtype=jnp.int32)


def causal_conv(x: jax.Array, weight: jax.Array, doc: jax.Array, history: jax.Array | None = None,
                history_doc: jax.Array | None = None) -> jax.Array:
    """Depthwise causal convolution within each document, then silu: x [B, T, C], weight [W, C] -> [B, T, C].

    out_t = silu(sum_r weight[W-1-r] * x_{t-r}) over the r < W earlier inputs of t's document (torch's
    ``conv1d(padding=W-1)[:T]`` with the same [C, 1, W] kernel, restarted at every document).
    ``history`` [B, W-1, C] (with its document indices [B, W-1]) are the inputs before x when decoding.
    """
    width = weight.shape[0]
    t = x.shape[1]
    if history is None:
        history = jnp.zeros(x.shape[:1] + (width - 1,) + x.shape[2:], x.dtype)  # [B, W-1, C]
        history_doc = jnp.full(doc.shape[:1] + (width - 1,), -1, doc.dtype)  # matches no document
    xs = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [B, W-1+T, C]
    docs = jnp.concatenate([history_doc, doc], axis=1)  # [B, W-1+T]
    out = jnp.zeros(x.shape, jnp.float32)
    for r in range(width):  # W is 4 in every Qwen3.5: an unrolled sum beats a conv op with masks
        shifted = jax.lax.dynamic_slice_in_dim(xs, width - 1 - r, t, axis=1)  # [B, T, C]: x_{t-r}
        same = jax.lax.dynamic_slice_in_dim(docs, width - 1 - r, t, axis=1) == doc  # [B, T]
        out = out + jnp.where(same[..., None], shifted.astype(jnp.float32) * weight[width - 1 - r].astype(jnp.float32), 0)
    return jax.nn.silu(out).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x * rsqrt(sum(x^2) + eps) over the last axis (transformers' and FLA's ``l2norm``)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _chunks(x: jax.Array, size: int) -> jax.Array:
    """[B, H, T, ...] -> [B, H, N, size, ...] (T a multiple of size)."""
    return x.reshape(x.shape[:2] + (x.shape[2] // size, size) + x.shape[3:])


def unit_lower_inverse(a: jax.Array) -> jax.Array:
    """Inverse of the unit lower-triangular matrix with a's strictly lower part: a [..., n, n] -> [..., n, n].

    By 2x2 blocks, inv([[A, 0], [C, D]]) = [[A^-1, 0], [-D^-1 C A^-1, D^-1]], recursively: log2(n) levels of
    batched matmuls, the arithmetic of forward substitution. Not ``lax.linalg.triangular_solve``: on XLA:CPU
    that is a LAPACK custom call, and 8 CPU devices running it at once hung the test process; matmuls are
    also what TPUs run best.
    """
    n = a.shape[-1]
    if n == 1:
        return jnp.ones_like(a)
    h = n // 2
    top, bottom = unit_lower_inverse(a[..., :h, :h]), unit_lower_inverse(a[..., h:, h:])  # [.., h, h], [.., n-h, n-h]
    corner = -(bottom @ a[..., h:, :h] @ top)  # [..., n-h, h]
    upper = jnp.concatenate([top, jnp.zeros(a.shape[:-2] + (h, n - h), a.dtype)], axis=-1)
    return jnp.concatenate([upper, jnp.concatenate([corner, bottom], axis=-1)], axis=-2)


def gated_delta_rule(q, k, v, g, beta, doc, *, chunk_size: int = 64, initial_state=None):
    """The gated delta rule over packed rows, chunked; returns (out [B, T, Hv, Dv] float32, final state [B, Hv, Dk, Dv]).

    q, k [B, T, Hk, Dk] (L2-normalised here, q also scaled by Dk**-0.5), v [B, T, Hv, Dv], g (log decay,
    <= 0) and beta [B, T, Hv], doc [B, T] from ``document_index``. ``initial_state`` [B, Hv, Dk, Dv]
    is read by the row's first document (decoding); the final state is the last document's.
    """
    b, t, hk, dk = k.shape
    hv, dv = v.shape[2:]
    f32 = jnp.float32
    q, k = jnp.repeat(q, hv // hk, axis=2), jnp.repeat(k, hv // hk, axis=2)  # [B, T, Hv, Dk]: head h reads key head h // G
    q, k, v = (x.astype(f32).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, Hv, T, D]
    g, beta = (x.astype(f32).transpose(0, 2, 1) for x in (g, beta))  # [B, Hv, T]
    q, k = l2_normalize(q), l2_normalize(k)
    q = q * dk**-0.5

    pad = (-t) % chunk_size  # padding at the end: zero keys, values and beta, decay 1, so nothing changes
    q, k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (q, k, v))
    g, beta = (jnp.pad(x, ((0, 0), (0, 0), (0, pad))) for x in (g, beta))
    doc = jnp.pad(doc, ((0, 0), (0, pad)), mode="edge")  # [B, T']
    n = (t + pad) // chunk_size

    v_beta, k_beta = v * beta[..., None], k * beta[..., None]  # [B, Hv, T', D]
    q, k, k_beta, v_beta = (_chunks(x, chunk_size) for x in (q, k, k_beta, v_beta))  # [B, Hv, N, C, D]
    g = _chunks(g, chunk_size)  # [B, Hv, N, C]
    doc = doc.reshape(b, 1, n, chunk_size)  # [B, 1, N, C]
    cum = jnp.cumsum(g, axis=-1)  # [B, Hv, N, C]: log decay from the chunk start to each token

    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))  # [C, C]: j <= i
    pair = causal & (doc[..., :, None] == doc[..., None, :])  # [B, 1, N, C, C]: j feeds i (same document)
    gap = jnp.where(pair, cum[..., :, None] - cum[..., None, :], 0.0)  # [B, Hv, N, C, C]; masked before exp
    pairwise_decay = jnp.where(pair, jnp.exp(gap), 0.0)

    ut_system = (k_beta @ jnp.swapaxes(k, -1, -2)) * pairwise_decay  # [B, Hv, N, C, C], unit diagonal implied
    intra = (q @ jnp.swapaxes(k, -1, -2)) * pairwise_decay  # [B, Hv, N, C, C]

    # the document the carried state belongs to: the last token of the previous chunk's (row start: the first)
    carry_doc = jnp.concatenate([doc[..., :1, :1], doc[..., :-1, -1:]], axis=2)  # [B, 1, N, 1]
    reads_state = (doc == carry_doc).astype(f32)  # [B, 1, N, C]
    last_doc = doc[..., -1:]  # [B, 1, N, 1]
    writes_state = (doc == last_doc).astype(f32)  # [B, 1, N, C]: tokens whose writes survive the chunk
    keeps_state = (last_doc[..., 0] == carry_doc[..., 0]).astype(f32)  # [B, 1, N]: no reset in the chunk

    decayed_k_beta = k_beta * (jnp.exp(cum) * reads_state)[..., None]  # [B, Hv, N, C, Dk]
    ut_inverse = unit_lower_inverse(ut_system)  # [B, Hv, N, C, C]: the UT transform
    new_values = ut_inverse @ v_beta  # [B, Hv, N, C, Dv]: "u"
    k_cumdecay = ut_inverse @ decayed_k_beta  # [B, Hv, N, C, Dk]

    q_state = q * (jnp.exp(cum) * reads_state)[..., None]  # [B, Hv, N, C, Dk]
    k_state = k * (jnp.exp(cum[..., -1:] - cum) * writes_state)[..., None]  # [B, Hv, N, C, Dk]
    chunk_decay = jnp.exp(cum[..., -1]) * keeps_state  # [B, Hv, N]

    def step(state, chunk):  # state [B, Hv, Dk, Dv]
        u, kc, qs, ks, att, decay = chunk
        v_new = u - kc @ state  # [B, Hv, C, Dv]: the part of the values the state does not predict
        out = qs @ state + att @ v_new  # [B, Hv, C, Dv]
        state = state * decay[..., None, None] + jnp.swapaxes(ks, -1, -2) @ v_new
        return state, out

    state = jnp.zeros((b, hv, dk, dv), f32) if initial_state is None else initial_state.astype(f32)
    per_chunk = tuple(jnp.moveaxis(x, 2, 0) for x in (new_values, k_cumdecay, q_state, k_state, intra, chunk_decay))
    state, out = jax.lax.scan(step, state, per_chunk)  # out [N, B, Hv, C, Dv]
    out = jnp.moveaxis(out, 0, 2).reshape(b, hv, n * chunk_size, dv)[:, :, :t]  # [B, Hv, T, Dv]
    return out.transpose(0, 2, 1, 3), state


def gated_rms_norm(x: jax.Array, gate: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of x [..., Dv] (Llama form, weight [Dv]) times silu(gate) in float32 (``Qwen3_5RMSNormGated``)."""
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return (weight.astype(x.dtype) * normed * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


class LinearState(NamedTuple):
    """What a Gated DeltaNet layer carries from one decoding step to the next."""

    recurrent: jax.Array  # [B, Hv, Dk, Dv] float32
    conv: jax.Array  # [B, W-1, C] the last W-1 conv inputs


def _projection(p: dict, x: jax.Array, name: str, lora_scale: float | None, contract: int = 1) -> jax.Array:
    """x [..., *in] @ p[name] [*in, *out], plus its LoRA update scale * (x A) B when ``p`` holds adapters for it
    (``{name}_lora_a`` / ``_lora_b``, jaxcpt.model.lora), added last as peft adds it to the base layer's output."""
    out = dense(x, p[name], contract)
    if lora_scale is not None and f"{name}_lora_a" in p:
        out = out + low_rank_update(x, p[f"{name}_lora_a"], p[f"{name}_lora_b"], lora_scale, contract)
    return out


def gated_deltanet(p: dict, h: jax.Array, doc: jax.Array, *, num_key_heads: int, key_head_dim: int,
                   value_head_dim: int, eps: float, chunk_size: int, state: LinearState | None = None,
                   lora_scale: float | None = None):
    """The linear-attention mixer of one layer: normed input h [B, T, E] -> ([B, T, E], LinearState).

    ``p`` holds this layer's ``lin_*`` weights (``transformer.LayerStack``): qkv [E, C], conv [W, C],
    z [E, Hv, Dv], b and a [E, Hv], dt_bias and a_log [Hv], norm [Dv], out [Hv, Dv, E], and the LoRA adapters
    of whichever of qkv, z, b, a, out ``model.lora`` targets (scaled by ``lora_scale``).
    ``state`` continues a row across calls (decoding); without it every row starts empty.
    """
    b, t, _ = h.shape
    key_dim = num_key_heads * key_head_dim
    mixed = _projection(p, h, "lin_qkv", lora_scale)  # [B, T, C]
    history = None if state is None else state.conv
    history_doc = None if state is None else jnp.broadcast_to(doc[:, :1], (b, history.shape[1]))  # continues doc 0
    conv_out = causal_conv(mixed, p["lin_conv"], doc, history, history_doc)  # [B, T, C]
    q = conv_out[..., :key_dim].reshape(b, t, num_key_heads, key_head_dim)  # [B, T, Hk, Dk]
    k = conv_out[..., key_dim:2 * key_dim].reshape(b, t, num_key_heads, key_head_dim)  # [B, T, Hk, Dk]
    v = conv_out[..., 2 * key_dim:].reshape(b, t, -1, value_head_dim)  # [B, T, Hv, Dv]
    z = _projection(p, h, "lin_z", lora_scale)  # [B, T, Hv, Dv]: the output gate
    beta = jax.nn.sigmoid(_projection(p, h, "lin_b", lora_scale))  # [B, T, Hv]
    a = _projection(p, h, "lin_a", lora_scale).astype(jnp.float32)  # [B, T, Hv]
    g = -jnp.exp(p["lin_a_log"].astype(jnp.float32)) * jax.nn.softplus(a + p["lin_dt_bias"].astype(jnp.float32))
    core, recurrent = gated_delta_rule(q, k, v, g, beta, doc, chunk_size=chunk_size,
                                       initial_state=None if state is None else state.recurrent)
    core = gated_rms_norm(core.astype(h.dtype), z, p["lin_norm"], eps)  # [B, T, Hv, Dv]
    out = _projection(p, core, "lin_out", lora_scale, 2)  # [B, T, E]
    # the conv inputs the next call continues from: the last document's (zeros before it, as a reset)
    width = p["lin_conv"].shape[0]
    own = jnp.where((doc == doc[:, -1:])[..., None], mixed, 0).astype(mixed.dtype)  # [B, T, C]
    before = jnp.zeros((b, width - 1, mixed.shape[-1]), mixed.dtype)  # [B, W-1, C]
    if history is not None:  # the history continues the first document: kept unless this call resets
        before = jnp.where((doc[:, -1] == doc[:, 0])[:, None, None], history.astype(mixed.dtype), before)
    conv_tail = jnp.concatenate([before, own], axis=1)[:, -(width - 1):]  # [B, W-1, C]
    return out, LinearState(recurrent, conv_tail)

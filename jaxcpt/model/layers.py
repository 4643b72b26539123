"""The math of one decoder block, as plain functions of arrays.

Parameters live in ``transformer.py`` (where they get their logical axes); these
functions only compute, so a reader can check them against the papers and against
transformers' Llama code line by line.

Shape letters: B batch, T query length, S key length, E model width (embed),
H query heads, K key/value heads, G = H // K query heads per KV head, D head_dim,
F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcpt.model.config import ModelConfig


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, then back to the input dtype before the scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [D/2] in float32, with the configured scaling applied."""
    dim = cfg.head_size
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D] for integer positions [B, T] (halves repeated, the HF 'rotate_half' layout)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, D] by position: x * cos + rotate_half(x) * sin, in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def attention_mask(segment_ids: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, 1, T, S]: causal, within one document, and inside the sliding window.

    Causality is by index in the packed row (documents are contiguous), so a packed
    row of two documents attends exactly as each document would alone.
    """
    t = segment_ids.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    allowed = k_idx <= q_idx  # [T, S]
    if sliding_window is not None:
        allowed &= k_idx > q_idx - sliding_window
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return (allowed[None] & same_doc)[:, None, None]  # [B, 1, 1, T, S]


def attention_xla(q, k, v, segment_ids, sliding_window):
    """Reference grouped-query attention; softmax in float32.

    q [B, T, H, D], k/v [B, S, K, D] -> [B, T, H, D].
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    mask = attention_mask(segment_ids, sliding_window)  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_cudnn(q, k, v, segment_ids, sliding_window):
    """cuDNN flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16/fp16).

    Documents in a packed row are separated by the same boolean mask as the reference.
    """
    mask = attention_mask(segment_ids, sliding_window)[:, 0]  # [B, 1, T, S]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


def choose_attention(cfg: ModelConfig):
    """The attention function for this config and platform."""
    if cfg.attention == "xla":
        return attention_xla
    if cfg.attention == "cudnn":
        return attention_cudnn
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and cfg.dtype in ("bfloat16", "float16"):
        return attention_cudnn
    return attention_xla


def swiglu(x, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None):
    """down(silu(gate(x)) * up(x)); x [B, T, E], gate/up [E, F], down [F, E]."""
    gate = jnp.einsum("bte,ef->btf", x, gate_w)
    up = jnp.einsum("bte,ef->btf", x, up_w)
    if gate_b is not None:
        gate, up = gate + gate_b, up + up_b
    hidden = jax.nn.silu(gate) * up  # [B, T, F]
    out = jnp.einsum("btf,fe->bte", hidden, down_w)
    return out + down_b if down_b is not None else out

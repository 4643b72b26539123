"""The math of one decoder block, as plain functions of arrays.

Parameters live in ``transformer.py`` (where they get their logical axes); these
functions only compute, so a reader can check them against the papers and against
transformers' Llama code line by line.

Shape letters: B batch, T query length, S key length, E model width (embed),
H query heads, K key/value heads, G = H // K query heads per KV head, D head_dim,
F MLP width.
"""

from __future__ import annotations

import functools
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x, w, out_dtype):
    """x [N, I] @ w [I, O] -> out_dtype (None: the inputs' dtype), with a hand-written backward."""
    return jnp.dot(x, w, preferred_element_type=out_dtype)


def _matmul_fwd(x, w, out_dtype):
    return _matmul(x, w, out_dtype), (x, w)


def _matmul_bwd(out_dtype, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    # dW = x^T dy with the transpose made explicit: XLA:CPU otherwise emits the
    # weight-gradient dot with a transposed operand that misses its fast (XNNPACK)
    # path, which made the backward pass ~2x slower on CPU. Same math everywhere.
    dx = jnp.dot(dy, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.dot(jnp.transpose(x), dy, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, w: jax.Array, contract: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last ``contract`` dims of x with the first ``contract`` dims of w.

    x [..., *in], w [*in, *out] -> [..., *out], computed as one 2-D matmul (accumulating
    in float32 on accelerators); ``out_dtype`` float32 keeps e.g. logits in full precision.
    """
    lead, inner, out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    size_in, size_out = math.prod(inner), math.prod(out)
    y = _matmul(x.reshape(-1, size_in), w.reshape(size_in, size_out), out_dtype)
    return y.reshape(*lead, *out)


def swiglu(x, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None):
    """down(silu(gate(x)) * up(x)); x [B, T, E], gate/up [E, F], down [F, E]."""
    gate = dense(x, gate_w)  # [B, T, F]
    up = dense(x, up_w)  # [B, T, F]
    if gate_b is not None:
        gate, up = gate + gate_b, up + up_b
    hidden = jax.nn.silu(gate) * up  # [B, T, F]
    out = dense(hidden, down_w)  # [B, T, E]
    return out + down_b if down_b is not None else out

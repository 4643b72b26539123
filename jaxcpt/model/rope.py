"""Rotary position embeddings: the frequencies of every rope type transformers defines for our families.

``rope_inv_freq`` gives the static inverse frequencies; ``rope_cos_sin`` turns positions into
the cos/sin tables the attention rotates q and k by. Two types depend on the length of the
context: ``dynamic`` (NTK scaling once a document outgrows max_position_embeddings) and
``longrope`` (short or long factors). transformers takes that length from the largest
position id it is given; over packed rows that is each document's own length, so a packed
document is rotated exactly as when it runs alone.

Formulas follow transformers' ``modeling_rope_utils`` (the oracle of the parity tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxcpt.model.config import RopeScaling


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    return (1.0 / (theta ** exponents)).astype(np.float32)  # [D/2]


def _llama3(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    # keep high frequencies, divide low ones by `factor`, interpolate smoothly between
    old_len = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old_len / s.low_freq_factor, old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(theta: float, dim: int, s: RopeScaling) -> np.ndarray:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, extrapolate high ones, ramp between."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    pos_freqs = (theta ** (np.arange(0, dim, 2).astype(np.float32) / dim)).astype(np.float32)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (s.factor * pos_freqs)
    return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """The factor cos and sin are multiplied by (yarn and longrope; 1 otherwise)."""
    if scaling is None or scaling.type not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.type == "yarn":
        if scaling.mscale and scaling.mscale_all_dim:
            return float(_yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor, scaling.mscale_all_dim))
        return _yarn_mscale(scaling.factor)
    if scaling.factor <= 1.0:  # longrope
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position_embeddings))


def rope_inv_freq(theta: float, scaling: RopeScaling | None, dim: int) -> np.ndarray:
    """Inverse frequencies [D/2] in float32 for contexts within the original length."""
    inv_freq = _default_inv_freq(theta, dim)
    if scaling is None or scaling.type == "dynamic":  # dynamic starts as the default
        return inv_freq
    if scaling.type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.type == "llama3":
        return _llama3(inv_freq, scaling)
    if scaling.type == "yarn":
        return _yarn(theta, dim, scaling)
    if scaling.type == "longrope":
        return _longrope(theta, dim, scaling.short_factor)
    raise ValueError(f"unknown rope scaling type '{scaling.type}'")


def _longrope(theta: float, dim: int, factors) -> np.ndarray:
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    return (1.0 / (np.asarray(factors, np.float32) * theta ** exponents)).astype(np.float32)


def document_lengths(positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """For every token [B, T], the length of its document: its segment's largest position + 1."""
    num_segments = positions.shape[1] + 1  # ids are 0 (padding) .. T

    def one_row(pos, seg):
        return jax.ops.segment_max(pos, seg, num_segments=num_segments)[seg] + 1

    return jax.vmap(one_row)(positions, segment_ids)


def _dynamic_inv_freq(theta: float, dim: int, s: RopeScaling, max_positions: int, length: jax.Array) -> jax.Array:
    """NTK-aware base for documents longer than max_position_embeddings: [B, T] lengths -> [B, T, D/2]."""
    length = jnp.maximum(length, max_positions).astype(jnp.float32)[..., None]
    base = theta * ((s.factor * length / max_positions) - (s.factor - 1)) ** (dim / (dim - 2))
    exponents = jnp.asarray(np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    return 1.0 / (base ** exponents)


def rope_cos_sin(positions: jax.Array, segment_ids: jax.Array, *, theta: float, scaling: RopeScaling | None,
                 dim: int, max_positions: int) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, D] in float32 for positions [B, T] (halves repeated: the HF 'rotate_half' layout)."""
    inv_freq = jnp.asarray(rope_inv_freq(theta, scaling, dim))  # [D/2]
    if scaling is not None and scaling.type in ("dynamic", "longrope"):
        length = document_lengths(positions, segment_ids)[..., None]  # [B, T, 1]
        if scaling.type == "dynamic":
            longer = length > max_positions
            inv_freq = jnp.where(longer, _dynamic_inv_freq(theta, dim, scaling, max_positions, length[..., 0]), inv_freq)
        else:
            longer = length > scaling.original_max_position_embeddings
            inv_freq = jnp.where(longer, jnp.asarray(_longrope(theta, dim, scaling.long_factor)), inv_freq)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, T, D]
    factor = rope_attention_factor(scaling)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, N, D] by position: x * cos + rotate_half(x) * sin, in float32.

    cos/sin narrower than D (partial RoPE, Qwen3.5) rotate the first dims; the rest pass through."""
    if cos.shape[-1] < x.shape[-1]:
        rot = cos.shape[-1]
        return jnp.concatenate([apply_rope(x[..., :rot], cos, sin), x[..., rot:]], axis=-1)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)

"""The math of one decoder block, as plain functions of arrays (RoPE lives in ``rope.py``).

Parameters live in ``transformer.py`` (where they get their logical axes); these
functions only compute, so a reader can check them against the papers and against
transformers' modeling code line by line.

Shape letters: B batch, T query length, S key length, E model width (embed),
H query heads, K key/value heads, G = H // K query heads per KV head, D head_dim,
F MLP width, Vp vocabulary rows (padded).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, plus_one: bool = False) -> jax.Array:
    """RMSNorm over the last axis, normalising in float32 as transformers does.

    Llama form: back to the input dtype, then times ``scale``. Gemma form (``plus_one``):
    times ``1 + scale`` still in float32, one rounding at the end.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if plus_one:
        return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


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


# The name remat's "minimal" policy saves. Remat policies that look for dot primitives
# (dots_with_no_batch_dims_saveable) cannot see inside the custom_vjp above, so they saved
# nothing more than "full"; naming the outputs says what to keep whatever the backward is.
PROJECTION = "projection"


def dense(x: jax.Array, w: jax.Array, contract: int = 1, out_dtype=None) -> jax.Array:
    """Contract the last ``contract`` dims of x with the first ``contract`` dims of w.

    x [..., *in], w [*in, *out] -> [..., *out], computed as one 2-D matmul (accumulating
    in float32 on accelerators); ``out_dtype`` float32 keeps e.g. logits in full precision.
    The output is named ``PROJECTION`` for rematerialisation policies.
    """
    lead, inner, out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    size_in, size_out = math.prod(inner), math.prod(out)
    y = _matmul(x.reshape(-1, size_in), w.reshape(size_in, size_out), out_dtype)
    return checkpoint_name(y.reshape(*lead, *out), PROJECTION)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # transformers' gelu_pytorch_tanh
}


def gated_mlp(x, gate_w, up_w, down_w, gate_b=None, up_b=None, down_b=None, activation: str = "silu"):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu; x [B, T, E], gate/up [E, F], down [F, E]."""
    gate = dense(x, gate_w)  # [B, T, F]
    up = dense(x, up_w)  # [B, T, F]
    if gate_b is not None:
        gate, up = gate + gate_b, up + up_b
    hidden = ACTIVATIONS[activation](gate) * up  # [B, T, F]
    out = dense(hidden, down_w)  # [B, T, E]
    return out + down_b if down_b is not None else out


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap): bounds x smoothly to (-cap, cap) (Gemma 2's logit soft-capping); None: x."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def output_logits(hidden: jax.Array, out_w: jax.Array, *, vocab_size: int, cap: float | None = None) -> jax.Array:
    """hidden [..., E] @ out_w [E, Vp] -> float32 logits [..., Vp], soft-capped.

    Columns from ``vocab_size`` on are vocabulary padding: -inf, so no probability reaches them.
    """
    logits = softcap(dense(hidden, out_w, out_dtype=jnp.float32), cap)  # [..., Vp]
    if out_w.shape[-1] > vocab_size:
        real = jnp.arange(out_w.shape[-1]) < vocab_size  # [Vp]
        logits = jnp.where(real, logits, -jnp.inf)
    return logits

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

from jaxcpt.model.remat import COMPUTE_WEIGHT


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


def compile_platform() -> str:
    """The platform the program being traced is compiled for: 'cpu', 'gpu' or 'tpu'.

    The devices of the mesh set with ``jax.set_mesh`` (training and ``jaxcpt compile`` trace
    under it), else this process's default backend. Not ``jax.default_backend()`` alone: a CPU
    host compiling for a TPU topology (``jaxcpt compile``) has the CPU as its backend while
    it traces the TPU program.
    """
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return "gpu" if platform in ("cuda", "rocm") else platform or jax.default_backend()


# --- XLA:CPU only -------------------------------------------------------------------------
# The weight gradient dW = x^T dy that autodiff emits is a dot with a transposed operand,
# which on XLA:CPU misses its fast (XNNPACK) path: the backward pass was ~2x slower on CPU
# (commit 5fd569f: train step 6.1 s -> 5.3 s). This custom_vjp makes the transpose explicit.
# It is for XLA:CPU alone: a custom_vjp hides its matmuls from remat's dot-based policies and
# its residuals from remat's names (with it, "save the projections" saved nothing), and on TPU
# and GPU the compilers lay out the weight gradient themselves. ``dense`` uses it only when
# ``compile_platform()`` is 'cpu'.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cpu_matmul(x, w, out_dtype):
    """x [N, I] @ w [I, O] -> out_dtype (None: x's dtype), with an explicit-transpose backward.

    w is cast to x's dtype inside, so the backward's residual is the weight as stored (see ``dense``)."""
    return jnp.dot(x, w.astype(x.dtype), preferred_element_type=out_dtype)


def _cpu_matmul_fwd(x, w, out_dtype):
    return _cpu_matmul(x, w, out_dtype), (x, w)


def _cpu_matmul_bwd(out_dtype, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    dx = jnp.dot(dy, w.astype(x.dtype).T, preferred_element_type=jnp.float32).astype(x.dtype)  # [N, I]
    dw = jnp.dot(jnp.transpose(x), dy, preferred_element_type=jnp.float32).astype(w.dtype)  # [I, O]
    return dx, dw


_cpu_matmul.defvjp(_cpu_matmul_fwd, _cpu_matmul_bwd)


def dense(x: jax.Array, w: jax.Array, contract: int = 1, out_dtype=None, name: str | None = None) -> jax.Array:
    """Contract the last ``contract`` dims of x with the first ``contract`` dims of w.

    x [..., *in], w [*in, *out] -> [..., *out] (accumulating in float32 on accelerators);
    ``out_dtype`` float32 keeps e.g. logits in full precision. ``name`` tags the output for
    rematerialisation policies (``jaxcpt.model.remat``).

    The matmul runs in x's dtype (the compute dtype); w comes as stored and is cast here, where
    the backward pass can redo the cast rather than keep a compute-dtype copy of every weight
    from the forward pass (``remat.COMPUTE_WEIGHT``; a float32 step on a bfloat16 base would
    otherwise hold a float32 copy of the base).

    On TPU and GPU this is one ``dot_general`` that autodiff and remat see as it is; on CPU
    a 2-D matmul with the explicit-transpose backward above.
    """
    lead, inner, out = x.shape[: x.ndim - contract], w.shape[:contract], w.shape[contract:]
    if compile_platform() == "cpu":
        size_in, size_out = math.prod(inner), math.prod(out)
        y = _cpu_matmul(x.reshape(-1, size_in), w.reshape(size_in, size_out), out_dtype).reshape(*lead, *out)
    else:
        if w.dtype != x.dtype:
            w = checkpoint_name(w.astype(x.dtype), COMPUTE_WEIGHT)
        dims = ((tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract))), ((), ()))
        y = jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype)  # [..., *out]
    return y if name is None else checkpoint_name(y, name)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # transformers' gelu_pytorch_tanh
}


def gated_mlp(x, project, activation: str = "silu"):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu; x [B, T, E].

    ``project(x, name)`` applies the projection ``name`` (gate, up [E, F]; down [F, E]) with its
    bias and adapter, if any: the block knows those, the MLP's math does not need to.
    """
    hidden = ACTIVATIONS[activation](project(x, "gate")) * project(x, "up")  # [B, T, F]
    return project(hidden, "down")  # [B, T, E]


def clamped_swiglu(gate: jax.Array, up: jax.Array, *, alpha: float, limit: float) -> jax.Array:
    """gpt-oss's expert activation, as transformers' ``GptOssExperts._apply_gate``: [..., F] x 2 -> [..., F].

    The gate is clamped from above only, up on both sides (bounding what one expert can emit), the
    gate's sigmoid has gain ``alpha``, and up enters as (up + 1).
    """
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))


def low_rank_update(x: jax.Array, a: jax.Array, b: jax.Array, scale: float, contract: int = 1) -> jax.Array:
    """LoRA's update of a projection, scale * (x a) b: x [..., *in], a [*in, r], b [r, *out] -> [..., *out].

    Two thin matmuls instead of forming a @ b [*in, *out]: the [..., r] intermediate is small.
    """
    return scale * dense(dense(x, a, contract), b)  # [..., r] -> [..., *out]


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

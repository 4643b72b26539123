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

**Backward.** The whole ring is one ``custom_vjp`` (``_ring``): the forward keeps only q, k, v,
the output and its log-sum-exp; the backward passes K/V around the ring again, now with their
gradient accumulators dK/dV, recomputing each block's probabilities from the saved log-sum-exp
(flash-attention's backward per block), and one last hop takes dK/dV home. Autodiff through the
ring's loop would instead keep every step's block output, merge weights and received K/V, memory
growing with the ring's length.

**Blocks.** Besides its own (causal) block, a device's ring steps are each half empty under the
balanced layout: either all its queries see the first half of the block or its later chunk sees
all of it (``_ring_forward``), so each step computes a [2c, c] or [c, 2c] block with no causal cut,
half the FLOPs of the whole block. A block is the Pallas splash kernel on TPU (``model.attention``
auto or splash; not for sliding-window layers) or XLA einsums over key sub-blocks of ``KV_CHUNK``
(``jaxcpt.model.ring_blocks``).

Shapes: q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T]; H = K * G; c = T / (2C).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcpt.errors import UserError
from jaxcpt.model import ring_blocks
from jaxcpt.model.layers import compile_platform

CONTEXT_AXIS = "context"
KV_CHUNK = 512  # key sub-block of the XLA blocks: [b, H, 2c, 512] float32 scores at a time


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


# ----------------------------------------------------------------------------- the ring


@dataclasses.dataclass(frozen=True)
class RingOptions:
    """What a layer's ring computes (static: a ``custom_vjp`` nondiff argument)."""

    context: int  # devices on the ring
    window: int | None  # sliding window (keys within the last ``window`` positions), None: full causal
    scale: float  # score scale, D ** -0.5 unless the family sets it
    softcap: float | None  # attention logit soft-capping (Gemma 2)
    kv_chunk: int  # key sub-block of the XLA blocks
    splash: bool = False  # blocks by the Pallas splash kernel (ring_blocks.splash_*), else XLA einsums
    interpret: bool = False  # the splash kernel in Pallas interpret mode (not on a TPU: tests)


def _merge(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets -> the attention over their union (log-sum-exp weights).

    out [b, K, G, T, D], lse [b, K, G, T]; lse_a is always finite (it holds the query's own position)."""
    top = jnp.maximum(lse_a, lse_b)
    w_a, w_b = jnp.exp(lse_a - top), jnp.exp(lse_b - top)  # [b, K, G, T]
    total = w_a + w_b
    return (out_a * w_a[..., None] + out_b * w_b[..., None]) / total[..., None], top + jnp.log(total)


def _block_forward(opts, causal, q, k, v, q_idx, k_idx, q_seg, k_seg):
    if opts.splash:
        return ring_blocks.splash_forward(opts, causal, q, k, v, q_seg, k_seg)
    return ring_blocks.xla_forward(opts, q, k, v, q_idx, k_idx, q_seg, k_seg)


def _block_backward(opts, causal, q, k, v, q_idx, k_idx, q_seg, k_seg, out, d_out, lse):
    if opts.splash:
        return ring_blocks.splash_backward(opts, causal, q, k, v, q_seg, k_seg, out, d_out, lse)
    return ring_blocks.xla_backward(opts, q, k, v, q_idx, k_idx, q_seg, k_seg, out, d_out, lse)


# Which part of a ring step is not masked out. Device r holds row chunks (r, 2C-1-r); at ring step s
# it has the keys of device j = (r - s) mod C, chunks (j, 2C-1-j). For j < r, both of r's chunks come
# after chunk j and before chunk 2C-1-j: all queries see the block's first half, none its second
# ("early"). For j > r, chunk r precedes both of j's chunks and chunk 2C-1-r follows both: the
# second half of the queries sees the whole block, the first half nothing ("late"). Either way the
# step is a [2c, c] or [c, 2c] block with no causal cut inside it: half the work of the whole [2c, 2c]
# block, and a full mask for splash. Step 0 (j = r) is the one causal block. Windows and documents
# can mask more, by the row indices and segment ids the XLA blocks compare.


def _ring_forward(opts, q, k, v, seg):
    """Per device: q [b, K, G, 2c, D], k/v [b, K, 2c, D], seg [b, 2c] -> (out float32, lse [b, K, G, 2c])."""
    c = q.shape[3] // 2
    shard = jax.lax.axis_index(CONTEXT_AXIS)
    idx = local_indices(shard, opts.context, c)  # [2c] row indices of this device's positions
    out, lse = _block_forward(opts, True, q, k, v, idx, idx, seg, seg)  # own block: every query sees itself

    def early(out, lse, k_j, v_j, idx_j, seg_j):
        o, l = _block_forward(opts, False, q, k_j[:, :, :c], v_j[:, :, :c], idx, idx_j[:c], seg, seg_j[:, :c])
        return _merge(out, lse, o, l)

    def late(out, lse, k_j, v_j, idx_j, seg_j):
        o, l = _block_forward(opts, False, q[:, :, :, c:], k_j, v_j, idx[c:], idx_j, seg[:, c:], seg_j)
        o, l = _merge(out[:, :, :, c:], lse[..., c:], o, l)
        return out.at[:, :, :, c:].set(o), lse.at[..., c:].set(l)

    def step(carry, s):
        out, lse, blk = carry
        # Send the block on before computing with it, so the transfer overlaps this step's attention.
        blk = jax.lax.ppermute(blk, CONTEXT_AXIS, _ring_pairs(opts.context))
        source = (shard - s) % opts.context
        k_j, v_j, seg_j = blk
        idx_j = local_indices(source, opts.context, c)
        out, lse = jax.lax.cond(source < shard, early, late, out, lse, k_j, v_j, idx_j, seg_j)
        return (out, lse, blk), None

    (out, lse, _), _ = jax.lax.scan(step, (out, lse, (k, v, seg)), jnp.arange(1, opts.context))
    return out, lse


def _ring_backward(opts, q, k, v, seg, out, lse, d_out):
    """The ring again: K/V travel with their gradient accumulators; each step recomputes its block's
    probabilities from the saved lse. -> dq [b, K, G, 2c, D], dk / dv [b, K, 2c, D], float32."""
    c = q.shape[3] // 2
    shard = jax.lax.axis_index(CONTEXT_AXIS)
    idx = local_indices(shard, opts.context, c)
    d_q, d_k, d_v = _block_backward(opts, True, q, k, v, idx, idx, seg, seg, out, d_out, lse)

    def early(d_q, d_k, d_v, k_j, v_j, idx_j, seg_j):
        g_q, g_k, g_v = _block_backward(opts, False, q, k_j[:, :, :c], v_j[:, :, :c], idx, idx_j[:c], seg,
                                        seg_j[:, :c], out, d_out, lse)
        return d_q + g_q, d_k.at[:, :, :c].add(g_k), d_v.at[:, :, :c].add(g_v)

    def late(d_q, d_k, d_v, k_j, v_j, idx_j, seg_j):
        g_q, g_k, g_v = _block_backward(opts, False, q[:, :, :, c:], k_j, v_j, idx[c:], idx_j, seg[:, c:], seg_j,
                                        out[:, :, :, c:], d_out[:, :, :, c:], lse[..., c:])
        return d_q.at[:, :, :, c:].add(g_q), d_k + g_k, d_v + g_v

    def step(carry, s):
        d_q, blk, d_k, d_v = carry
        # d_k / d_v are the accumulated gradients of the block they travel with: one ppermute moves both.
        blk, d_k, d_v = jax.lax.ppermute((blk, d_k, d_v), CONTEXT_AXIS, _ring_pairs(opts.context))
        source = (shard - s) % opts.context
        k_j, v_j, seg_j = blk
        idx_j = local_indices(source, opts.context, c)
        d_q, d_k, d_v = jax.lax.cond(source < shard, early, late, d_q, d_k, d_v, k_j, v_j, idx_j, seg_j)
        return (d_q, blk, d_k, d_v), None

    (d_q, _, d_k, d_v), _ = jax.lax.scan(step, (d_q, (k, v, seg), d_k, d_v), jnp.arange(1, opts.context))
    # After C - 1 steps device r holds the gradients of device r + 1's block: one more hop takes them home.
    d_k, d_v = jax.lax.ppermute((d_k, d_v), CONTEXT_AXIS, _ring_pairs(opts.context))
    return d_q, d_k, d_v


def _ring_pairs(context: int):
    return [(j, (j + 1) % context) for j in range(context)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(opts, q, k, v, seg):
    """Ring attention per device (head-major, as ``_ring_forward``) -> out [b, K, G, 2c, D] in q's dtype.

    A ``custom_vjp`` over the whole ring: autodiff through the ring's loop would keep every step's
    block output, weights and received K/V for the backward pass, memory growing with the ring's
    length; this keeps only (q, k, v, out, lse) and runs the ring again backwards (``_ring_backward``)."""
    return _ring_forward(opts, q, k, v, seg)[0].astype(q.dtype)


def _ring_fwd(opts, q, k, v, seg):
    out, lse = _ring_forward(opts, q, k, v, seg)
    out = out.astype(q.dtype)
    return out, (q, k, v, seg, out, lse)


def _ring_bwd(opts, residuals, d_out):
    q, k, v, seg, out, lse = residuals
    d_q, d_k, d_v = _ring_backward(opts, q, k, v, seg, out, lse, d_out)
    return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_local(q, k, v, segment_ids, *, opts):
    """Per device: q [b, 2c, h, D], k/v [b, 2c, kv, D], segment_ids [b, 2c] (balanced layout) -> [b, 2c, h, D]."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    q5 = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [b, K, G, 2c, D]
    out = _ring(opts, q5, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids)  # k/v [b, K, 2c, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def block_kernel(attention: str, sliding_window, chunk: int) -> tuple[bool, bool]:
    """(splash, interpret) for a ring whose devices hold two chunks of ``chunk`` positions.

    Splash on TPU when ``model.attention`` is auto or splash, and model.attention=splash elsewhere (Pallas
    interpret mode: tests). XLA blocks otherwise, and for sliding-window layers: a window cuts a ring step's
    block at an offset that depends on the step (a static splash mask cannot hold it)."""
    platform = compile_platform()
    wanted = attention == "splash" or (attention == "auto" and platform == "tpu")
    if not wanted or sliding_window is not None:
        return False, False
    if not ring_blocks.splash_fits(chunk, chunk):
        if attention == "splash":
            raise UserError(f"model.attention=splash under a 'context' axis needs each device's two chunks to be "
                            f"multiples of 128 positions, got {chunk}: make data.seq_len a multiple of "
                            f"{2 * 128} x mesh.context, or set model.attention to auto or xla")
        return False, False
    if not ring_blocks.splash_available():  # a jax without the kernel's backward as a function: XLA blocks
        return False, False
    return True, platform != "tpu"


def ring_attention(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, rules=(),
                   kv_chunk: int | None = None, attention: str = "auto"):
    """Attention over the ``context`` axis of the current mesh: inputs in the balanced layout (``to_balanced``),
    the same signature as the functions of ``jaxcpt.model.attention``; ``attention`` is ``model.attention``."""
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
    splash, interpret = block_kernel(attention, sliding_window, q.shape[1] // (2 * context))
    opts = RingOptions(context=context, window=sliding_window, scale=q.shape[-1] ** -0.5 if scale is None else scale,
                       softcap=softcap, kv_chunk=kv_chunk or KV_CHUNK, splash=splash, interpret=interpret)
    return jax.shard_map(functools.partial(_ring_local, opts=opts), in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


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

    def attention(self, attention: str = "auto"):
        """The ring, with splash blocks where ``model.attention`` (``attention``) and the platform allow."""
        return functools.partial(ring_attention, rules=self.rules, attention=attention)

    def outputs(self, hidden):
        """[B, T, E] back in row order, for the loss and the logits."""
        return from_balanced(hidden, self.context)

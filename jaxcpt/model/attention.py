"""Causal grouped-query attention over packed rows, with one implementation per platform.

Every implementation computes the same thing: each query attends to keys at or
before it (by index in the row), in the same document (``segment_ids``), and, with
a sliding window W, to the last W positions only. Scores are ``scale * q.k``
(default ``D**-0.5``), soft-capped to ``softcap * tanh(scores / softcap)`` when a cap
is given (Gemma 2), before the mask. They differ in how:

- ``reference``: einsum + explicit mask, softmax in float32. The oracle; CPU default.
- ``xla``: ``jax.nn.dot_product_attention(implementation='xla')``. That function has no
  soft-capping, so with a cap this path computes the einsum form (the same XLA ops as
  ``reference``) instead of dropping the cap.
- ``cudnn``: cuDNN flash attention (GPU, bf16/fp16) through the function that
  ``jax.nn.dot_product_attention(implementation='cudnn')`` wraps; causality and the
  window go to the kernel, documents as cuDNN's packed-sequence offsets and lengths
  (no [B, 1, T, T] mask). No soft-capping: asking for it with a cap is an error, and
  ``auto`` does not pick it then (nor in float32, where it picks ``xla``).
- ``splash``: the Pallas splash-attention kernel (TPU), block-sparse causal/local
  masks with segment ids and the kernel's own logit soft-capping, run per device under
  ``shard_map``. On CPU it runs in Pallas interpret mode, which is how the tests check it.

Attention sinks (gpt-oss: a learned logit per query head in the softmax denominator, ``sinks`` [H])
run in ``reference`` and in ``xla``, which computes the einsum form for them as for a cap;
``cudnn`` and ``splash`` have no sinks and refuse them, and ``auto`` does not pick them then.

Shapes: q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T]; H = K * G.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError
from jaxcpt.model.layers import compile_platform, softcap as apply_softcap


def attention_mask(segment_ids: jax.Array, sliding_window: int | None) -> jax.Array:
    """Boolean mask [B, 1, 1, T, S]: causal, within one document, inside the sliding window."""
    t = segment_ids.shape[1]
    q_idx = jnp.arange(t)[:, None]
    k_idx = jnp.arange(t)[None, :]
    allowed = k_idx <= q_idx  # [T, S]
    if sliding_window is not None:
        allowed &= k_idx > q_idx - sliding_window
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return (allowed[None] & same_doc)[:, None, None]  # [B, 1, 1, T, S]


def attention_probs(scores: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """softmax over the keys of masked scores [B, K, G, T, S] (float32).

    With ``sinks`` [H] (H = K * G, gpt-oss): each query head's sink logit joins the denominator
    only, as a key no value belongs to, so a query's weights may sum to less than 1 (attention
    that can go nowhere). transformers' ``eager_attention_forward`` for gpt-oss does the same by
    appending the sink column and dropping it after the softmax.
    """
    if sinks is None:
        return jax.nn.softmax(scores, axis=-1)
    b, kv, g, t, _ = scores.shape
    sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, g, 1, 1), (b, kv, g, t, 1))
    return jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :-1]  # [B, K, G, T, S]


def attention_reference(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, sinks=None):
    b, t, h, d = q.shape
    kv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, t, kv, h // kv, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = apply_softcap(scores, softcap)  # [B, K, G, T, S]
    scores = jnp.where(attention_mask(segment_ids, sliding_window), scores, jnp.finfo(jnp.float32).min)
    probs = attention_probs(scores, sinks).astype(v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def _document_mask(segment_ids):
    return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]


def _dot_product_attention(q, k, v, segment_ids, sliding_window, scale, implementation):
    window = (sliding_window - 1, 0) if sliding_window is not None else None
    return jax.nn.dot_product_attention(q, k, v, mask=_document_mask(segment_ids), scale=scale, is_causal=True,
                                        local_window_size=window, implementation=implementation)


def attention_xla(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, sinks=None):
    if softcap is not None or sinks is not None:  # jax.nn.dot_product_attention has neither; never drop them
        return attention_reference(q, k, v, segment_ids, sliding_window, scale=scale, softcap=softcap, sinks=sinks)
    return _dot_product_attention(q, k, v, segment_ids, sliding_window, scale, "xla")


def packed_segments(segment_ids: jax.Array, slots: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lengths [B, M], offsets [B, M + 1], documents [B]) of the documents packed in each row, cuDNN's
    packed layout, and how many documents each row holds.

    A document is a run of one segment id, padding (id 0) included: cuDNN leaves a token outside every
    slot unwritten, forward and backward, and on an H200 (jax 0.11.2) the dK and dV of padding left out
    were garbage that reached the weights' gradients through the k and v projections. As a run of its
    own, padding attends to itself, as in every other kernel, and gets zero gradients (its outputs have
    none). M = ``slots`` (default T, as many as a row can hold), unused slots are -1, as cuDNN wants. A
    row with more runs than M has only its first M in the slots: the caller must check ``documents``
    (``attention_cudnn`` does).
    """
    b, t = segment_ids.shape
    slots = t if slots is None else min(slots, t)
    before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)  # [B, T]: the id on the left
    after = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    starts_mask, ends_mask = segment_ids != before, segment_ids != after

    def one_row(starts_row, ends_row):
        starts = jnp.nonzero(starts_row, size=slots, fill_value=-1)[0]  # [M]
        ends = jnp.nonzero(ends_row, size=slots, fill_value=-1)[0]
        lengths = jnp.where(starts >= 0, ends - starts + 1, -1)
        return lengths.astype(jnp.int32), jnp.concatenate([starts, jnp.full((1,), -1)]).astype(jnp.int32)

    lengths, offsets = jax.vmap(one_row)(starts_mask, ends_mask)
    return lengths, offsets, starts_mask.sum(axis=1)


def attention_cudnn(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, documents_per_row=64):
    """cuDNN flash attention over packed rows: documents go to the kernel as (offsets, lengths), its
    packed-sequence layout, so no [B, 1, T, T] mask is built; causality and the window are the kernel's.

    ``jax.nn.dot_product_attention`` does not expose cuDNN's packed layout (only one length per
    row), so this calls the function it wraps, ``jax._src.cudnn.fused_attention_stablehlo``.

    Memory: jax sizes the kernel's softmax statistics by the layout's document slots, float32
    [B * M, H, T] per call, so M = T (every row could be all one-token documents) is 2 GiB per layer at
    4096 tokens and 32 heads, and the step did not fit an H200. M is ``documents_per_row``
    (model.cudnn_documents_per_row). A batch with a row of more documents is not truncated: the step
    takes cuDNN's masked form for that batch instead (a [B, 1, T, T] bias of the document mask, the
    same result), chosen on the device by ``lax.cond``.
    """
    if softcap is not None:
        raise UserError("cuDNN attention has no logit soft-capping; set model.attention to auto, xla or reference")
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lengths, offsets, documents = packed_segments(segment_ids, documents_per_row)

    def packed(q, k, v):
        return cudnn_attention(q, k, v, None, None, lengths, lengths, offsets, offsets, scale=scale,
                               mask_type=MaskType.PADDING_CAUSAL, sliding_window_length=sliding_window,
                               qkv_layout="BTNH")

    def masked(q, k, v):  # rows of more documents than the slots: the document mask as cuDNN's bias
        return _dot_product_attention(q, k, v, segment_ids, sliding_window, scale, "cudnn")

    if documents_per_row >= segment_ids.shape[1]:  # every row fits the slots: no fallback to compile
        return packed(q, k, v)
    return jax.lax.cond(jnp.all(documents <= documents_per_row), packed, masked, q, k, v)


def _splash_kernel(num_query_heads: int, length: int, sliding_window: int | None, softcap: float | None,
                   interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    one = masks.CausalMask(shape) if sliding_window is None else masks.LocalMask(shape, (sliding_window - 1, 0), 0)
    block = min(512, length)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(masks.MultiHeadMask([one] * num_query_heads), block_sizes=sizes,
                                                attn_logits_soft_cap=softcap, interpret=interpret)


def _splash_local(q, k, v, segment_ids, *, sliding_window, scale, softcap, interpret):
    """Per-device splash: q [b, T, h, D], k/v [b, T, kv, D] -> [b, T, h, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    b, t, h, d = q.shape
    kv = k.shape[2]
    kernel = _splash_kernel(h // kv, t, sliding_window, softcap, interpret)
    scale = d**-0.5 if scale is None else scale
    q = (q * scale).reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)  # [b, kv, G, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kv, T, D]

    def one_row(q_row, k_row, v_row, seg_row):  # q [kv, G, T, D], k/v [kv, T, D]
        ids = splash.SegmentIds(q=seg_row, kv=seg_row)
        return jax.vmap(lambda qg, kg, vg: kernel(qg, kg, vg, segment_ids=ids))(q_row, k_row, v_row)

    out = jax.vmap(one_row)(q, k, v, segment_ids)  # [b, kv, G, T, D]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def attention_splash(q, k, v, segment_ids, sliding_window=None, *, scale=None, softcap=None, rules=(),
                     interpret=None):
    """Splash attention, under ``shard_map`` when a mesh is active (batch and heads stay sharded)."""
    from jaxcpt.sharding.rules import logical_to_spec

    if q.shape[1] % 128:
        raise UserError(f"splash attention needs a sequence length that is a multiple of 128, got {q.shape[1]}; "
                        "set model.attention to auto, reference or xla")
    if interpret is None:
        interpret = compile_platform() != "tpu"
    local = functools.partial(_splash_local, sliding_window=sliding_window, scale=scale, softcap=softcap,
                              interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return local(q, k, v, segment_ids)
    shape = dict(mesh.shape)
    q_spec = logical_to_spec(("batch", "length", "act_heads", None), rules, shape, q.shape)
    kv_spec = logical_to_spec(("batch", "length", "act_kv_heads", None), rules, shape, k.shape)
    if (q_spec[2:3] or (None,)) != (kv_spec[2:3] or (None,)):
        # KV heads cannot split like query heads (e.g. 2 KV heads, tensor=4): give every
        # query head its own KV head so both split alike.
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        kv_spec = q_spec
    seg_spec = jax.sharding.PartitionSpec(*(tuple(q_spec)[:1] or (None,)))
    return jax.shard_map(local, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)(
        q, k, v, segment_ids)


def choose_attention(name: str, dtype: str, length: int, rules=(), softcap: float | None = None, sinks: bool = False,
                     cudnn_documents_per_row: int = 64):
    """The attention function for ``name``: ``fn(q, k, v, segment_ids, window, *, scale, softcap)`` (and
    ``sinks=`` [H] when ``sinks``: reference and xla only). ``cudnn_documents_per_row``: the document
    slots of cuDNN's packed layout (``attention_cudnn``).

    'auto' picks by the platform compiled for (``compile_platform``), dtype and length, and only a kernel
    that honours every setting (cuDNN cannot soft-cap, so a capped model on GPU gets xla, which computes the
    capped einsum form).
    """
    if name == "auto":
        backend = compile_platform()  # the mesh's platform: a CPU host compiling for TPU picks splash
        if sinks and backend in ("tpu", "gpu"):  # neither splash nor cuDNN has sinks: the einsum form
            name = "xla"
        elif backend == "tpu" and length % 128 == 0:
            name = "splash"
        elif backend == "gpu" and dtype in ("bfloat16", "float16") and softcap is None:
            name = "cudnn"
        elif backend == "gpu":  # float32 (or soft-capped): XLA's fused path, not the einsum oracle
            name = "xla"
        else:
            name = "reference"
    if name == "cudnn" and softcap is not None:
        raise UserError("model.attention=cudnn cannot soft-cap attention logits (attn_logit_softcap is set); "
                        "use auto, xla or reference")
    if sinks and name in ("cudnn", "splash"):
        raise ConfigError(f"model.attention={name} has no attention sinks, and model.attention_sinks is set (gpt-oss); "
                          "set model.attention to auto, xla or reference")
    if name == "splash":
        return functools.partial(attention_splash, rules=rules)
    if name == "cudnn":
        return functools.partial(attention_cudnn, documents_per_row=cudnn_documents_per_row)
    return {"reference": attention_reference, "xla": attention_xla}[name]

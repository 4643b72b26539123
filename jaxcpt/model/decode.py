"""Greedy decoding with a KV cache: the shared decoder block, attending over cached keys.

Training attends within packed rows; decoding feeds one token at a time and attends to
every earlier token of its sequence, kept in a cache of rotated keys and values per
layer. The block is the same function (``transformer.decoder_block``); only its
``attend`` differs, so a family's options (q/k norms, soft-capping, windows, layer
patterns, RoPE variants) decode exactly as they train.

A batch of prompts is left-padded to one length, so every row writes the same cache
slot at each step (one ``dynamic_update_slice``); padding slots are never attended to,
and positions count real tokens only. Shapes are fixed by (batch, prompt length,
tokens to generate), so each compiles once.

    tokens, lengths = generate_greedy(model, prompt_ids, prompt_mask, max_new_tokens=32, stop_ids=(2,))
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError
from jaxcpt.model import hybrid, layer_groups, per_layer_input
from jaxcpt.model.attention import attention_probs
from jaxcpt.model.gated_deltanet import LinearState
from jaxcpt.model.layers import softcap as apply_softcap
from jaxcpt.model.transformer import SLIDING, Transformer, decoder_block


class KVCache(NamedTuple):
    k: jax.Array  # [L, B, S, K, D] rotated keys (layers of several shapes: {k weight name: [L_name, B, S, K, D]})
    v: jax.Array  # [L, B, S, K, D] (likewise)
    valid: jax.Array  # [B, S] bool: the slot holds a real token (not padding, already written)
    length: jax.Array  # () int32: slots written so far, the same for every row
    linear: LinearState | None = None  # a hybrid's Gated DeltaNet states ([L_linear, B, ...]); None otherwise


def init_cache(model: Transformer, batch: int, slots: int) -> KVCache:
    cfg = model.config
    if cfg.mla is not None:  # its cache would hold the latent and the shared rotated key, not per-head k/v
        raise ConfigError("decoding with a KV cache is not built for multi-head latent attention (model.mla, "
                          "DeepSeek-V3); score such a model with loglikelihood tasks, or generate with transformers "
                          "from its HF export")
    if layer_groups.grouped(cfg):  # Gemma 4: one cache per KV shape, for the layers that compute keys and values
        caches = layer_groups.init_caches(cfg, batch, slots)
        return KVCache(caches, dict(caches), jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32))
    shape = (len(cfg.attention_layers), batch, slots, cfg.num_kv_heads, cfg.head_size)  # attention layers only
    zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
    linear = hybrid.init_linear_state(cfg, batch) if cfg.linear_layers else None
    return KVCache(zeros, zeros, jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32), linear)


def _cached_attention(cfg, q, k, v, kind, layer_k, layer_v, valid, start, sinks=None):
    """q [B, T, H, D] at slots start..start+T-1 over the cache with k/v written there -> (out, (k, v));
    ``sinks`` [H]: the layer's attention-sink logits (gpt-oss), or None.

    k and v None (a KV-shared layer, Gemma 4): attend over the cache of the layer shared, writing nothing."""
    b, t, h, d = q.shape
    kv = layer_k.shape[2]
    if k is not None:
        layer_k = jax.lax.dynamic_update_slice(layer_k, k.astype(layer_k.dtype), (0, start, 0, 0))  # [B, S, K, D]
        layer_v = jax.lax.dynamic_update_slice(layer_v, v.astype(layer_v.dtype), (0, start, 0, 0))
    slots = layer_k.shape[1]
    q_slot = start + jnp.arange(t)[:, None]  # [T, 1]
    k_slot = jnp.arange(slots)[None, :]  # [1, S]
    allowed = (k_slot <= q_slot) & valid[:, None, :]  # [B, T, S]
    if kind == SLIDING and cfg.sliding_window is not None:
        allowed &= k_slot > q_slot - cfg.sliding_window  # real tokens are contiguous: slots count positions
    scale = d**-0.5 if cfg.attention_scale is None else cfg.attention_scale
    qg = q.reshape(b, t, kv, h // kv, d)  # [B, T, K, G, D]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, layer_k, preferred_element_type=jnp.float32) * scale
    scores = apply_softcap(scores, cfg.attn_logit_softcap)  # [B, K, G, T, S]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = attention_probs(scores, sinks).astype(layer_v.dtype)  # [B, K, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs, layer_v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype), (layer_k, layer_v)


def forward_cached(model: Transformer, cache: KVCache, input_ids, valid, positions):
    """Run tokens [B, T] (``valid`` [B, T] marks real ones, ``positions`` [B, T]) through the model,
    appending them to ``cache``; returns (logits [B, T, vocab_size] float32, new cache)."""
    cfg = model.config
    t = input_ids.shape[1]
    start = cache.length
    all_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, start))  # [B, S]
    x = model.embed(input_ids)
    ropes, is_sliding = model.rope_and_kinds(positions, valid.astype(jnp.int32))
    if layer_groups.grouped(cfg):  # Gemma 4: shared KV layers read the cache of the layer they share
        def attend_cached(q, k, v, kind, layer_k, layer_v):
            return _cached_attention(cfg, q, k, v, kind, layer_k, layer_v, all_valid, start)

        per_layer = per_layer_input.inputs(model, input_ids, x) if cfg.per_layer_input else None
        block = functools.partial(decoder_block, cfg=cfg, rules=model.rules)
        x, keys, values = layer_groups.decode(model, x, per_layer, ropes, cache.k, cache.v, block, attend_cached)
        return model.logits(model.final_norm_of(x)), KVCache(keys, values, all_valid, start + t)
    if cfg.linear_layers:  # a hybrid: the linear layers carry their recurrent and conv states instead of a cache
        def attention_block(p, h, kind, layer_k, layer_v):
            def attend(q, k, v, kind, sinks=None):
                return _cached_attention(cfg, q, k, v, kind, layer_k, layer_v, all_valid, start, sinks)
            return decoder_block(p, h, None, {kind: ropes[kind]}, cfg=cfg, rules=model.rules, attend=attend)

        x, keys, values, linear = hybrid.decode_groups(model, x, valid, ropes, cache.k, cache.v, cache.linear,
                                                       attention_block)
        logits = model.logits(model.final_norm_of(x))  # [B, T, V]
        return logits, KVCache(keys, values, all_valid, start + t, linear)

    def scan_body(carry, layer):
        layer_params, layer_is_sliding, layer_k, layer_v = layer

        def attend(q, k, v, kind, sinks=None):
            return _cached_attention(cfg, q, k, v, kind, layer_k, layer_v, all_valid, start, sinks)

        x_out, aux = decoder_block(layer_params, carry, layer_is_sliding, ropes, cfg=cfg, rules=model.rules,
                                   attend=attend)
        new_k, new_v = aux[0] if cfg.moe is not None else aux  # an MoE block adds its router stats
        return x_out, (new_k, new_v)

    x, (keys, values) = jax.lax.scan(scan_body, x, (model.layers.arrays(), is_sliding, cache.k, cache.v))
    logits = model.logits(model.final_norm_of(x))  # [B, T, V]
    return logits, KVCache(keys, values, all_valid, start + t)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _generate(graphdef, params, prompt_ids, prompt_mask, stop_ids, *, max_new_tokens: int):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt_ids.shape
    cache = init_cache(model, batch, prompt_len + max_new_tokens)
    mask = prompt_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    logits, cache = forward_cached(model, cache, prompt_ids, mask, positions)
    next_token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)  # [B]; the last slot is real: left padding
    next_position = positions[:, -1] + 1
    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    done = jnp.zeros((batch,), bool)
    lengths = jnp.full((batch,), max_new_tokens, jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, cache, token, position, done, out, lengths = carry
        out = out.at[:, step].set(jnp.where(done, 0, token))
        stopped = jnp.isin(token, stop_ids) & ~done
        lengths = jnp.where(stopped, step + 1, lengths)
        done = done | stopped
        logits, cache = forward_cached(model, cache, token[:, None], jnp.ones((batch, 1), bool), position[:, None])
        token = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return step + 1, cache, token, position + 1, done, out, lengths

    carry = (jnp.int32(0), cache, next_token, next_position, done, out, lengths)
    _, _, _, _, done, out, lengths = jax.lax.while_loop(cond, body, carry)
    return out, lengths


def generate_greedy(model: Transformer, prompt_ids, prompt_mask, *, max_new_tokens: int, stop_ids=()):
    """Greedy continuation of left-padded prompts [B, P] (``prompt_mask`` 1 on real tokens).

    Returns (tokens [B, max_new_tokens] int32, lengths [B]): row b's continuation is
    ``tokens[b, :lengths[b]]``, ending with a stop id when one was produced. Generation of the
    whole batch stops once every row produced a stop id.
    """
    from flax import nnx

    graphdef, params = nnx.split(model)
    stop = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    return _generate(graphdef, params, jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask), stop,
                     max_new_tokens=max_new_tokens)

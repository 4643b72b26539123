"""Hybrid decoders: Gated DeltaNet (linear-attention) layers between attention layers, scanned a pattern at a time.

Qwen3.5 repeats [linear, linear, linear, full]. The layers of one kind stack their weights on
their own leading axis (``layers.lin_*`` [L_linear, ...], the attention weights [L_attention, ...];
norms and MLP [L, ...] as always), so no layer holds weights it does not use. The forward pass
reshapes each stack to [groups, per group, ...] and ``lax.scan``s over the groups; inside one
step the pattern is unrolled (a static Python loop), so each position runs its own kind of block
and compile time stays flat in depth. A ``layer_types`` that does not repeat a short pattern is
refused by ``ModelConfig.validate`` (``MAX_PATTERN``) with the fix.

An attention position runs the shared ``transformer.decoder_block``; a linear position runs
``linear_block`` below: the same pre-norm residual block with the Gated DeltaNet mixer
(``jaxcpt.model.gated_deltanet``) in place of attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxcpt.model import layer_groups
from jaxcpt.model import lora as lora_lib
from jaxcpt.model import remat as remat_lib
from jaxcpt.model.config import LINEAR, ModelConfig
from jaxcpt.model.gated_deltanet import LinearState, document_index, gated_deltanet
from jaxcpt.model.layers import dense, gated_mlp, low_rank_update, rms_norm
from jaxcpt.sharding.rules import constrain

LINEAR_MATRICES = ("lin_qkv", "lin_z", "lin_b", "lin_a", "lin_out")  # reach layers.dense only (gated_deltanet)
RECURRENT, CONV = "lin_state_recurrent", "lin_state_conv"  # a linear layer's decoding state, scanned beside its weights


def linear_params(stack: nnx.Module, cfg: ModelConfig, p) -> list[str]:
    """Create the Gated DeltaNet weights on ``stack`` ([L_linear, ...] each); returns their names.

    ``p(shape, axes, init)`` makes one parameter (``transformer._param``). Initialised as transformers
    does: dt_bias ones, A = exp(a_log) uniform in [0.01, 16), the gated norm's weight ones.
    """
    lin = cfg.linear_attention
    n, e, c, w = len(cfg.linear_layers), cfg.hidden_size, lin.conv_channels, lin.conv_kernel
    hv, dv = lin.num_value_heads, lin.value_head_dim
    stack.lin_qkv = p((n, e, c), ("layers", "embed", "linear_conv"))  # [E, C]: q | k | v, as in_proj_qkv
    stack.lin_conv = p((n, w, c), ("layers", "conv_width", "linear_conv"))  # depthwise kernel [W, C]
    stack.lin_z = p((n, e, hv, dv), ("layers", "embed", "linear_heads", "head_dim"))  # output gate
    stack.lin_b = p((n, e, hv), ("layers", "embed", "linear_heads"))  # beta (write strength) logits
    stack.lin_a = p((n, e, hv), ("layers", "embed", "linear_heads"))  # decay-rate input
    stack.lin_dt_bias = p((n, hv), ("layers", "linear_heads"), "ones")
    a_log = p((n, hv), ("layers", "linear_heads"), "zeros")
    rngs = p.args[0]  # p is functools.partial(_param, rngs, cfg)
    a = jax.random.uniform(rngs.params(), (n, hv), jnp.float32, 0.01, 16.0)
    a_log.set_value(jnp.log(a).astype(a_log[...].dtype))
    stack.lin_a_log = a_log
    stack.lin_norm = p((n, dv), ("layers", "head_dim"), "ones")
    stack.lin_out = p((n, hv, dv, e), ("layers", "linear_heads", "head_dim", "embed"))
    return ["lin_qkv", "lin_conv", "lin_z", "lin_b", "lin_a", "lin_dt_bias", "lin_a_log", "lin_norm", "lin_out"]


def linear_block(p: dict, x, doc, state: LinearState | None = None, *, cfg: ModelConfig, rules):
    """One pre-norm block with the Gated DeltaNet mixer: x [B, T, E] -> (x [B, T, E], LinearState).

    ``doc`` [B, T] is ``gated_deltanet.document_index`` of the row's segment ids; ``state`` continues
    each row from an earlier call (decoding).
    """
    dt = jnp.dtype(cfg.dtype)
    p = remat_lib.cast_for_compute(p, dt, keep=lora_lib.matmul_weights(cfg, LINEAR_MATRICES))
    lin = cfg.linear_attention
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    act = ("batch", "length", "act_embed")
    adapted = set(cfg.lora.targets) if cfg.lora is not None else set()

    def project(inputs, name: str):  # the MLP's projections, as decoder_block's ``project``
        contract = lora_lib.PROJECTIONS[name]
        out = dense(inputs, p[name], contract)
        if f"{name}_bias" in p:
            out = out + p[f"{name}_bias"]
        if name in adapted:
            a, b = lora_lib.adapter_names(name)
            out = out + low_rank_update(inputs, p[a], p[b], cfg.lora.scale, contract)
        return checkpoint_name(out, remat_lib.PROJECTION_NAMES[name])

    x = constrain(x, act, rules)
    mixed, state = gated_deltanet(p, norm(x, p["attn_norm"]), doc, num_key_heads=lin.num_key_heads,
                                  key_head_dim=lin.key_head_dim, value_head_dim=lin.value_head_dim,
                                  eps=cfg.rms_norm_eps, chunk_size=cfg.delta_rule_chunk_size, state=state,
                                  lora_scale=cfg.lora.scale if cfg.lora is not None else None)
    x = x + constrain(mixed, act, rules)
    mlp_out = gated_mlp(norm(x, p["mlp_norm"]), project, activation=cfg.activation)
    return x + constrain(mlp_out, act, rules), state


def scan_groups(model, x, segment_ids, ropes: dict, block):
    """Hidden states after every layer of a hybrid model (before the final norm): x [B, T, E] -> [B, T, E].

    ``block(p, x, is_sliding, ropes)`` is the model's attention block (``decoder_block`` with its
    ``attend`` and remat already applied). The layers scan a pattern repeat at a time
    (``layer_groups.scan_layers``, which Gemma 4's layers of several shapes share).
    """
    cfg = model.config
    doc = document_index(segment_ids)  # [B, T]
    linear = functools.partial(linear_block, cfg=cfg, rules=model.rules)
    linear = remat_lib.checkpointed(linear, cfg)

    def layer(kind, p, h):
        if kind == LINEAR:
            return linear(p, h, doc)[0], {}
        return block(p, h, None, {kind: ropes[kind]})[0], {}

    arrays = model.layers.arrays()
    sets = {name: layer_groups.layers_of(cfg, name) for name in arrays}
    x, _ = layer_groups.scan_layers(cfg, arrays, sets, x, layer)
    return x


def init_linear_state(cfg: ModelConfig, batch: int) -> LinearState:
    """Empty decoding state of every linear layer: recurrent [L_linear, B, Hv, Dk, Dv], conv [L_linear, B, W-1, C]."""
    lin, n = cfg.linear_attention, len(cfg.linear_layers)
    recurrent = jnp.zeros((n, batch, lin.num_value_heads, lin.key_head_dim, lin.value_head_dim), jnp.float32)
    conv = jnp.zeros((n, batch, lin.conv_kernel - 1, lin.conv_channels), jnp.dtype(cfg.dtype))
    return LinearState(recurrent, conv)


def decode_groups(model, x, valid, ropes: dict, cache_k, cache_v, linear_state: LinearState, attention_block):
    """Decoding through a hybrid: tokens x [B, T, E] continue each row from the caches.

    ``cache_k``/``cache_v`` [L_attention, B, S, K, D] and ``linear_state`` (``init_linear_state``) are the
    caches before the call; ``attention_block(p, x, kind, k, v) -> (x, (k, v))`` runs one attention layer
    over its cache. ``valid`` [B, T] marks real tokens: a row's padding is its own document, so the
    state never sees it. Returns (x, new k, new v, new LinearState).
    """
    cfg = model.config
    doc = document_index(valid.astype(jnp.int32))  # [B, T]
    linear = functools.partial(linear_block, cfg=cfg, rules=model.rules)
    arrays = model.layers.arrays()
    sets = {name: layer_groups.layers_of(cfg, name) for name in arrays}
    # the caches scan beside the weights, each stacked over the layers it belongs to
    for name, value, layers in (("cache_k", cache_k, cfg.attention_layers), ("cache_v", cache_v, cfg.attention_layers),
                                (RECURRENT, linear_state.recurrent, cfg.linear_layers),
                                (CONV, linear_state.conv, cfg.linear_layers)):
        arrays[name], sets[name] = value, layers

    def layer(kind, p, h):
        if kind == LINEAR:
            h, state = linear(p, h, doc, LinearState(p.pop(RECURRENT), p.pop(CONV)))
            return h, {RECURRENT: state.recurrent, CONV: state.conv.astype(linear_state.conv.dtype)}
        h, (k, v) = attention_block(p, h, kind, p.pop("cache_k"), p.pop("cache_v"))
        return h, {"cache_k": k, "cache_v": v}

    x, out = layer_groups.scan_layers(cfg, arrays, sets, x, layer)
    return x, out["cache_k"], out["cache_v"], LinearState(out[RECURRENT], out[CONV])

"""The decoder-only transformer as a Flax NNX module, with layers stacked and scanned.

All layers' weights live in one ``LayerStack`` with a leading ``layers`` axis, and
the forward pass runs ``jax.lax.scan`` over it: compile time stays flat in depth and
one set of rules shards every layer alike. Every parameter carries its logical axes
in an ``axes`` metadata field; ``jaxcpt.sharding`` turns those into shardings.

What families do differently (Gemma's ``(1 + w)`` norms and extra norms, GeGLU, q/k
norms, soft-capping, a local/global layer pattern ...) are options of ``ModelConfig``
that the block below reads; it never asks which family it is. A layer pattern stays
inside the scan: each layer's kind is scanned data, and ``lax.cond`` picks that
layer's window and RoPE tables.

    model = init_model(cfg, mesh)                       # random init, sharded
    logits = model(input_ids, segment_ids, positions)   # [B, T, vocab_size] float32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from jaxcpt.config import ConfigError
from jaxcpt.model import expert_lora, hybrid
from jaxcpt.model import layer_groups, mla, per_layer_input
from jaxcpt.model.attention import choose_attention
from jaxcpt.model.context_parallel import ContextLayout
from jaxcpt.model.config import ModelConfig
from jaxcpt.model import lora as lora_lib
from jaxcpt.model import moe as moe_lib
from jaxcpt.model import moe_beside
from jaxcpt.model import remat as remat_lib
from jaxcpt.model.layers import dense, gated_mlp, low_rank_update, output_logits, rms_norm
from jaxcpt.model.rope import apply_rope, rope_cos_sin
from jaxcpt.sharding.rules import constrain, make_rules, named_sharding

FULL, SLIDING = "full_attention", "sliding_attention"
USES_ROPE = "uses_rope"  # the per-layer RoPE flag LayerStack.arrays() scans beside the weights (cfg.rope_layers)
SELECTION_BIAS = "selection_bias"  # the [L, X] selection bias of auxiliary-loss-free balancing, scanned beside the weights


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init: str = "normal") -> nnx.Param:
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


def _vocab_param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, vocab_axis: int, real_rows=None) -> nnx.Param:
    """A random vocabulary table whose padding rows (from vocab_size, or ``real_rows``, on) are zero."""
    param = _param(rngs, cfg, shape, axes)
    real = jnp.arange(shape[vocab_axis]) < (real_rows or cfg.vocab_size)
    param.set_value(jnp.where(jnp.expand_dims(real, 1 - vocab_axis), param[...], 0).astype(param[...].dtype))
    return param


class LayerStack(nnx.Module):
    """Weights of all decoder blocks, each with a leading [L] axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, E, H, K, D, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                            cfg.intermediate_size)
        p = functools.partial(_param, rngs, cfg)
        if layer_groups.grouped(cfg):  # layers of several shapes (Gemma 4): each weight over the layers that have it
            if cfg.lora is not None:  # no expert adapters here (jaxcpt.model.expert_lora)
                expert_lora.check_targets(cfg)
            self.names, self.rope_layers = tuple(layer_groups.create_params(self, cfg, p)), None
            return
        if cfg.mla is not None:  # DeepSeek-V3: latent attention, leading dense layers, then experts (model.mla)
            if cfg.lora is not None:  # refused by name (an HF start's config reaches here unvalidated)
                expert_lora.check_targets(cfg)
            self.names, self.rope_layers = tuple(mla.create_params(self, cfg, p)), None
            return
        norm_init = "zeros" if cfg.norm_plus_one else "ones"  # (1 + w) norms start at w = 0
        La = len(cfg.attention_layers)  # attention weights exist for attention layers only (all but linear ones)
        Hq = 2 * H if cfg.attn_output_gate else H  # query and gate heads interleaved, as Qwen3.5's q_proj
        self.q = p((La, E, Hq, D), ("layers", "embed", "heads", "head_dim"))
        self.k = p((La, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = p((La, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = p((La, H, D, E), ("layers", "heads", "head_dim", "embed"))
        names = ["q", "k", "v", "o"]
        if cfg.moe is None:
            self.gate = p((L, E, F), ("layers", "embed", "mlp"))
            self.up = p((L, E, F), ("layers", "embed", "mlp"))
            self.down = p((L, F, E), ("layers", "mlp", "embed"))
            names += ["gate", "up", "down"]
        else:  # stacked experts and a router instead of the dense MLP (jaxcpt.model.moe)
            for name, (shape, axes) in moe_lib.expert_param_shapes(cfg.moe, E, L).items():
                setattr(self, name, p(shape, axes, "zeros" if name.endswith("_bias") else "normal"))
                names.append(name)
        if cfg.pre_norms:
            self.attn_norm = p((L, E), ("layers", "norm"), norm_init)
            self.mlp_norm = p((L, E), ("layers", "norm"), norm_init)
            names += ["attn_norm", "mlp_norm"]
        if cfg.qkv_bias:
            self.q_bias = p((L, H, D), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
            names += ["q_bias", "k_bias", "v_bias"]
        if cfg.o_bias:
            self.o_bias = p((L, E), ("layers", "embed"), "zeros")
            names.append("o_bias")
        if cfg.attention_sinks:  # one logit per query head (gpt-oss); 0 = a sink as likely as a key of score 0
            self.sinks = p((La, H), ("layers", "heads"), "zeros")
            names.append("sinks")
        if cfg.mlp_bias:
            self.gate_bias = p((L, F), ("layers", "mlp"), "zeros")
            self.up_bias = p((L, F), ("layers", "mlp"), "zeros")
            self.down_bias = p((L, E), ("layers", "embed"), "zeros")
            names += ["gate_bias", "up_bias", "down_bias"]
        if cfg.qk_norm and cfg.qk_norm_scope == "projection":  # one scale per channel of the whole projection
            self.q_norm = p((La, H, D), ("layers", "heads", "head_dim"), norm_init)
            self.k_norm = p((La, K, D), ("layers", "kv_heads", "head_dim"), norm_init)
            names += ["q_norm", "k_norm"]
        elif cfg.qk_norm:  # one scale per head_dim channel, shared by all heads
            self.q_norm = p((La, D), ("layers", "head_dim"), norm_init)
            self.k_norm = p((La, D), ("layers", "head_dim"), norm_init)
            names += ["q_norm", "k_norm"]
        if cfg.linear_layers:  # Gated DeltaNet weights, [L_linear, ...] (jaxcpt.model.hybrid)
            names += hybrid.linear_params(self, cfg, p)
        if cfg.post_norms:
            self.post_attn_norm = p((L, E), ("layers", "norm"), norm_init)
            self.post_mlp_norm = p((L, E), ("layers", "norm"), norm_init)
            names += ["post_attn_norm", "post_mlp_norm"]
        if cfg.lora is not None:  # layers.{target}_lora_a / _lora_b beside each target (jaxcpt.model.lora)
            lora_lib.check_targets(cfg.lora, bool(cfg.linear_layers))
            names += expert_lora.create(self, cfg, rngs)  # the experts' adapters (jaxcpt.model.expert_lora)
            for target in [t for t in cfg.lora.targets if t not in expert_lora.TARGETS]:
                a, b = lora_lib.adapter_params(rngs.params(), getattr(self, target), target, cfg.lora.rank)
                for name, param in zip(lora_lib.adapter_names(target), (a, b)):
                    setattr(self, name, param)
                    names.append(name)
        self.names = tuple(names)
        self.rope_layers = cfg.rope_layers  # static per-layer flags (not parameters), scanned with the weights

    def arrays(self) -> dict[str, jax.Array]:
        """This stack's weights by name, each [L, ...]; with per-layer RoPE flags also ``uses_rope`` [L] bool."""
        out = {name: getattr(self, name)[...] for name in self.names}
        if self.rope_layers is not None:
            out[USES_ROPE] = jnp.asarray(self.rope_layers, bool)
        return out


def decoder_block(p: dict, x, is_sliding, ropes: dict, *, cfg: ModelConfig, rules, attend, valid=None):
    """One block on x [B, T, E] -> (x [B, T, E], aux) (pre-norm; post-norm only with pre_norms off, as OLMo);
    ``p`` holds this layer's weights (no [L] axis), and its ``uses_rope`` flag when some layers have no RoPE.

    With ``cfg.moe`` the MLP is the mixture of experts and aux becomes (attention aux,
    ``moe.RouterStats`` of this layer over the tokens ``valid`` [B, T] marks; None: all).

    ``ropes`` maps each layer kind to its (cos, sin) [B, T, D]; ``is_sliding`` is this
    layer's kind as a scanned boolean, or None when every layer is of the one kind in ``ropes``.
    ``attend(q, k, v, kind) -> (out [B, T, H, D], aux)`` attends rotated queries to rotated
    keys: within the packed row in training (``packed_attention``), over a KV cache when
    decoding (``jaxcpt.model.decode``, whose aux is the updated cache).
    """
    dt = jnp.dtype(cfg.dtype)
    uses_rope = p.get(USES_ROPE)  # () bool when some layers have no RoPE (NoPE), else None
    matrices = lora_lib.matmul_weights(cfg)  # cast by ``dense`` itself, where the backward can redo the cast
    selection_bias = p.get(SELECTION_BIAS)  # [X] float32 selection bias (jaxcpt.train.balance), else None; never cast
    p = remat_lib.cast_for_compute({name: w for name, w in p.items() if name not in (USES_ROPE, SELECTION_BIAS)},
                                   dt, keep=matrices)
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)
    act = ("batch", "length", "act_embed")
    x = constrain(x, act, rules)
    adapted = set(cfg.lora.targets) if cfg.lora is not None else set()

    def project(inputs, name: str):
        """The projection ``name`` of ``inputs``, its bias and its LoRA update (when it has them) included,
        named for remat policies (``jaxcpt.model.remat``)."""
        contract = lora_lib.PROJECTIONS[name]
        out = dense(inputs, p[name], contract)
        if f"{name}_bias" in p:
            out = out + p[f"{name}_bias"]
        if name in adapted:  # added last, as peft adds it to the base layer's output
            a, b = lora_lib.adapter_names(name)
            out = out + low_rank_update(inputs, p[a], p[b], cfg.lora.scale, contract)
        return checkpoint_name(out, remat_lib.PROJECTION_NAMES[name])

    h = norm(x, p["attn_norm"]) if cfg.pre_norms else x
    q = project(h, "q")  # [B, T, H, D] ([B, T, 2H, D] with the output gate)
    if cfg.attn_output_gate:  # Qwen3.5: per head, D query dims then D gate dims
        q, out_gate = jnp.moveaxis(q.reshape(*q.shape[:2], -1, 2, q.shape[-1]), 3, 0)  # 2 x [B, T, H, D]
    if "k" in p:
        k = project(h, "k")  # [B, T, K, D]
        v = project(h, "v") if "v" in p else k  # [B, T, K, D]; attention_k_eq_v (Gemma 4): the keys' projection
    else:  # a KV-shared layer (Gemma 4): ``attend`` brings an earlier layer's rotated keys and values
        k = v = None
    if cfg.qk_norm and cfg.qk_norm_scope == "projection":  # RMS over all heads' channels at once (OLMo)
        q, k = projection_norm(q, p["q_norm"], norm), projection_norm(k, p["k_norm"], norm)
    elif cfg.qk_norm:
        q, k = norm(q, p["q_norm"]), (None if k is None else norm(k, p["k_norm"]))
    if cfg.value_norm and v is not None:  # Gemma 4: each head's values RMS-normed, without a scale
        v = rms_norm(v, jnp.ones(v.shape[-1], v.dtype), cfg.rms_norm_eps)
    q = constrain(q, ("batch", "length", "act_heads", None), rules)
    if k is not None:
        k = constrain(k, ("batch", "length", "act_kv_heads", None), rules)
        v = constrain(v, ("batch", "length", "act_kv_heads", None), rules)

    def rotated(kind):
        cos, sin = ropes[kind]
        q_rot, k_rot = apply_rope(q, cos, sin), (None if k is None else apply_rope(k, cos, sin))
        if uses_rope is not None:  # a NoPE layer attends to the unrotated q and k
            q_rot, k_rot = jnp.where(uses_rope, q_rot, q), jnp.where(uses_rope, k_rot, k)
        if cfg.attention_sinks:  # this layer's per-head sink logits [H] (gpt-oss)
            return attend(q_rot, k_rot, v, kind, sinks=p["sinks"])
        return attend(q_rot, k_rot, v, kind)

    if is_sliding is None:
        (kind,) = ropes
        attn, aux = rotated(kind)
    else:
        attn, aux = jax.lax.cond(is_sliding, lambda: rotated(SLIDING), lambda: rotated(FULL))
    attn = checkpoint_name(attn, remat_lib.ATTENTION_OUT)  # [B, T, H, D]
    if cfg.attn_output_gate:
        attn = attn * jax.nn.sigmoid(out_gate)
    attn_out = project(attn, "o")  # [B, T, E]
    if cfg.post_norms:
        attn_out = norm(attn_out, p["post_attn_norm"])
    x = x + constrain(attn_out, act, rules)

    h = norm(x, p["mlp_norm"]) if cfg.pre_norms else x
    if cfg.moe is not None and cfg.moe.beside_mlp:  # Gemma 4: the dense MLP and the experts, each normed, summed
        mlp_out, stats = moe_beside.mlp_and_experts(x, h, p, project, cfg, valid, rules, selection_bias)
        aux = (aux, stats)
    elif cfg.moe is not None:
        mlp_out, stats = moe_lib.moe_mlp(h, p, cfg.moe, cfg.activation, valid, rules, selection_bias,
                                          lora=cfg.lora)
        aux = (aux, stats)
    else:
        mlp_out = gated_mlp(h, project, activation=cfg.activation)
    if cfg.post_norms:
        mlp_out = norm(mlp_out, p["post_mlp_norm"])
    x = x + constrain(mlp_out, act, rules)
    if "ple_gate" in p:  # Gemma 4: this layer's per-layer input, gated into the residual stream
        x = x + constrain(per_layer_input.branch(p, x, cfg, norm), act, rules)
    if "layer_scalar" in p:  # Gemma 4
        x = x * p["layer_scalar"]
    return x, aux


def projection_norm(x, scale, norm):
    """RMSNorm of x [B, T, N, D] over all N*D channels of the projection, scale [N, D]."""
    b, t, n, d = x.shape
    return norm(x.reshape(b, t, n * d), scale.reshape(n * d)).reshape(b, t, n, d)


def packed_attention(cfg: ModelConfig, attention_fn, segment_ids):
    """``attend`` for ``decoder_block`` over packed rows: causal within each document, no aux."""

    def attend(q, k, v, kind, sinks=None):
        window = cfg.sliding_window if kind == SLIDING else None
        extra = {} if sinks is None else {"sinks": sinks}  # only the kernels that have sinks take them
        return attention_fn(q, k, v, segment_ids, window, scale=cfg.attention_scale, softcap=cfg.attn_logit_softcap,
                            **extra), None

    return attend


def rope_tables(cfg: ModelConfig, kind: str, positions, segment_ids):
    """(cos, sin) [B, T, D] of the layers of ``kind``: sliding layers may have their own, unscaled base."""
    theta, scaling = cfg.rope_theta, cfg.rope_scaling
    if kind == SLIDING and cfg.rope_local_theta is not None:
        theta, scaling = cfg.rope_local_theta, None
    dim = int(cfg.kind_head_dim(kind) * cfg.partial_rotary_factor)  # cfg.rotary_dim unless full layers have their own
    cos, sin = rope_cos_sin(positions, segment_ids, theta=theta, scaling=scaling, dim=dim,
                            max_positions=cfg.max_position_embeddings)
    if kind == FULL and cfg.rope_proportion != 1.0:  # Gemma 4's proportional RoPE
        cos, sin = layer_groups.proportional_rope(cos, sin, cfg.rope_proportion)
    return cos, sin


class Transformer(nnx.Module):
    """Decoder-only LM: ``model(input_ids, segment_ids=None, positions=None) -> logits [B, T, vocab_size]``.

    ``segment_ids`` [B, T] (1, 2, ... per packed document, 0 = padding) keep documents
    from attending to each other; ``positions`` [B, T] restart at 0 per document.
    Without them the row is one document at positions 0..T-1.

    The embedding and output projection hold ``cfg.padded_vocab_size`` rows; the rows
    past ``vocab_size`` stay zero, and logits are only ever returned for the real ones.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=None):
        self.config = cfg
        self.rules = rules if rules is not None else make_rules()
        vocab, width = cfg.padded_vocab_size, cfg.hidden_size
        self.embedding = _vocab_param(rngs, cfg, (vocab, width), ("vocab", "embed"), vocab_axis=0)
        self.layers = LayerStack(cfg, rngs)
        self.final_norm = _param(rngs, cfg, (width,), ("norm",), "zeros" if cfg.norm_plus_one else "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _vocab_param(rngs, cfg, (width, vocab), ("embed", "vocab"), vocab_axis=1)
        if cfg.per_layer_input:  # Gemma 4's per-layer input embeddings (jaxcpt.model.per_layer_input)
            ple = cfg.num_layers * cfg.per_layer_input
            self.per_layer_embedding = _vocab_param(rngs, cfg, (per_layer_input.padded_vocab(cfg), ple),
                                                    ("vocab", "per_layer"), vocab_axis=0,
                                                    real_rows=cfg.per_layer_vocab_size or cfg.vocab_size)
            self.per_layer_projection = _param(rngs, cfg, (width, ple), ("embed", "per_layer"))
            self.per_layer_norm = _param(rngs, cfg, (cfg.per_layer_input,), ("norm",), "ones")

    def output_weights(self) -> jax.Array:
        """The output projection [E, padded vocab] (the embedding, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.embedding[...].T
        return self.lm_head[...]

    def embed(self, input_ids) -> jax.Array:
        """Token embeddings [B, T, E] in the compute dtype (scaled by sqrt(E) where the family does)."""
        cfg = self.config
        x = jnp.take(self.embedding[...], input_ids, axis=0).astype(cfg.dtype)  # [B, T, E]
        if cfg.scale_embeddings:  # the scale rounded to the compute dtype first, as transformers does
            x = x * jnp.asarray(cfg.hidden_size**0.5, cfg.dtype)
        return x

    def rope_and_kinds(self, positions, segment_ids) -> tuple[dict, jax.Array | None]:
        """({layer kind: (cos, sin) [B, T, D]}, the [L] is-sliding flags, or None when all layers are alike)."""
        kinds = tuple(kind for kind in self.config.layer_kinds() if kind != hybrid.LINEAR)  # linear layers: no RoPE
        ropes = {kind: rope_tables(self.config, kind, positions, segment_ids) for kind in sorted(set(kinds))}
        # [L] layer kinds as scanned data when the layers differ; None keeps a uniform model cond-free
        is_sliding = jnp.asarray([kind == SLIDING for kind in kinds]) if len(ropes) > 1 else None
        return ropes, is_sliding

    def final_norm_of(self, x) -> jax.Array:
        cfg = self.config
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps, plus_one=cfg.norm_plus_one)

    def hidden_states(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        """Final-norm hidden states [B, T, E] in the compute dtype."""
        return self.hidden_states_and_router(input_ids, segment_ids, positions)[0]

    def hidden_states_and_router(self, input_ids, segment_ids=None, positions=None, router_bias=None):
        """(final-norm hidden states [B, T, E], ``moe.RouterStats`` with a leading [L] axis, or None when dense).

        ``router_bias`` [L, X]: an MoE model's selection bias (auxiliary-loss-free balancing), or None."""
        cfg = self.config
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        context = ContextLayout.current(length, self.rules)  # a 'context' mesh axis: rows split, ring attention
        if context is not None:
            input_ids, segment_ids, positions = context.inputs(input_ids, segment_ids, positions)
        x = self.embed(input_ids)  # [B, T, E]
        ropes, is_sliding = self.rope_and_kinds(positions, segment_ids)
        attention_fn = choose_attention(cfg.attention, cfg.dtype, length, self.rules, softcap=cfg.attn_logit_softcap,
                                        sinks=cfg.attention_sinks, cudnn_documents_per_row=cfg.cudnn_documents_per_row)
        if context is not None:
            if cfg.attention_sinks:  # the ring's blockwise softmax has no sink term
                raise ConfigError("context parallelism (a 'context' mesh axis) does not support attention sinks "
                                  "(model.attention_sinks, gpt-oss); drop the context axis from mesh")
            attention_fn = context.attention(cfg.attention)
        if cfg.mla is not None:  # DeepSeek-V3's blocks: two scans, dense layers then MoE layers (jaxcpt.model.mla)
            if context is not None:
                raise ConfigError("context parallelism (a 'context' mesh axis) is not supported for MLA models "
                                  "(DeepSeek-V3) yet; drop the context axis from mesh")
            x, router = mla.forward(self, x, ropes[FULL], packed_attention(cfg, attention_fn, segment_ids),
                                    segment_ids != 0, router_bias)
            return self.final_norm_of(x), router
        block = functools.partial(decoder_block, cfg=cfg, rules=self.rules,
                                  attend=packed_attention(cfg, attention_fn, segment_ids), valid=segment_ids != 0)
        block = remat_lib.checkpointed(block, cfg)

        if layer_groups.grouped(cfg):  # layers of several shapes (Gemma 4): scanned in segments
            if context is not None:
                raise ConfigError("context parallelism (a 'context' mesh axis) is not supported yet for models whose "
                                  "layers differ in shape (Gemma 4); drop the context axis from mesh")
            per_layer = per_layer_input.inputs(self, input_ids, x) if cfg.per_layer_input else None
            block = functools.partial(decoder_block, cfg=cfg, rules=self.rules, valid=segment_ids != 0)
            scanned = {} if router_bias is None else {SELECTION_BIAS: router_bias}  # [L, X]
            x, router = layer_groups.forward(self, x, per_layer, ropes, block,
                                             packed_attention(cfg, attention_fn, segment_ids), scanned)
            return self.final_norm_of(x), router
        if cfg.linear_layers:  # a hybrid: scanned a repeat of the layer pattern at a time
            if context is not None:  # the ring layout reorders positions; a recurrence needs them in order
                raise ConfigError("context parallelism (a 'context' mesh axis) is not supported for models with "
                                  "linear-attention layers (Gated DeltaNet); drop the context axis from mesh")
            return self.final_norm_of(hybrid.scan_groups(self, x, segment_ids, ropes, block)), None

        def scan_body(carry, layer):
            layer_params, layer_is_sliding = layer
            x, aux = block(layer_params, carry, layer_is_sliding, ropes)
            return x, (aux[1] if cfg.moe is not None else None)

        arrays = self.layers.arrays()
        if router_bias is not None:
            arrays[SELECTION_BIAS] = router_bias  # [L, X], scanned: layer l chooses with router_bias[l]
        x, router = jax.lax.scan(scan_body, x, (arrays, is_sliding))
        if context is not None:
            x = context.outputs(x)
        return self.final_norm_of(x), router

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> logits [..., vocab_size] in float32, soft-capped when the model says so.

        The matmul runs in the compute dtype with float32 accumulation; padded columns are dropped.
        """
        cfg = self.config
        w = self.output_weights()  # as stored: ``dense`` casts it to the hidden states' dtype
        return output_logits(hidden, w, vocab_size=cfg.vocab_size, cap=cfg.final_logit_softcap)[..., : cfg.vocab_size]

    def __call__(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        out = self.logits(self.hidden_states(input_ids, segment_ids, positions))
        return constrain(out, ("batch", "length", "act_vocab"), self.rules)


def abstract_model(cfg: ModelConfig, rules=None) -> Transformer:
    """The model with ShapeDtypeStruct leaves: structure, shapes and axes, no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), rules=rules))


def variable_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedSharding for every variable of ``state``, from its ``axes`` metadata and the rule table."""

    def one(variable):
        axes = variable.get_metadata().get("axes")
        if axes is None:
            return named_sharding(mesh, rules, ())
        moe_lib.check_expert_split(axes, variable.get_value().shape, mesh, rules)
        return named_sharding(mesh, rules, axes, variable.get_value().shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_model(cfg: ModelConfig, mesh: Mesh, rules=None, seed: int = 0) -> Transformer:
    """A randomly initialised model whose parameters are created directly in their shardings."""
    rules = rules if rules is not None else make_rules()
    abstract = abstract_model(cfg, rules)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = variable_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def create():
        model = Transformer(cfg, rngs=nnx.Rngs(seed), rules=rules)
        return nnx.state(model)

    with jax.set_mesh(mesh):
        state = create()
    return nnx.merge(graphdef, state)

"""The Llama-family decoder as a Flax NNX module, with layers stacked and scanned.

All layers' weights live in one ``LayerStack`` with a leading ``layers`` axis, and
the forward pass runs ``jax.lax.scan`` over it: compile time stays flat in depth and
one set of rules shards every layer alike. Every parameter carries its logical axes
in an ``axes`` metadata field; ``jaxcpt.sharding`` turns those into shardings.

    model = init_model(cfg, mesh)                       # random init, sharded
    logits = model(input_ids, segment_ids, positions)   # [B, T, V] float32
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxcpt.model.config import ModelConfig
from jaxcpt.model.attention import choose_attention
from jaxcpt.model.layers import apply_rope, dense, rms_norm, rope_cos_sin, rope_inv_freq, swiglu
from jaxcpt.sharding.rules import constrain, make_rules, named_sharding

REMAT_POLICIES = {
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _param(rngs: nnx.Rngs, cfg: ModelConfig, shape, axes, init: str = "normal") -> nnx.Param:
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = (cfg.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=tuple(axes))


class LayerStack(nnx.Module):
    """Weights of all decoder blocks, each with a leading [L] axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L, E, H, K, D, F = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                            cfg.intermediate_size)
        p = functools.partial(_param, rngs, cfg)
        self.attn_norm = p((L, E), ("layers", "norm"), "ones")
        self.q = p((L, E, H, D), ("layers", "embed", "heads", "head_dim"))
        self.k = p((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.v = p((L, E, K, D), ("layers", "embed", "kv_heads", "head_dim"))
        self.o = p((L, H, D, E), ("layers", "heads", "head_dim", "embed"))
        self.mlp_norm = p((L, E), ("layers", "norm"), "ones")
        self.gate = p((L, E, F), ("layers", "embed", "mlp"))
        self.up = p((L, E, F), ("layers", "embed", "mlp"))
        self.down = p((L, F, E), ("layers", "mlp", "embed"))
        names = ["attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"]
        if cfg.qkv_bias:
            self.q_bias = p((L, H, D), ("layers", "heads", "head_dim"), "zeros")
            self.k_bias = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
            self.v_bias = p((L, K, D), ("layers", "kv_heads", "head_dim"), "zeros")
            names += ["q_bias", "k_bias", "v_bias"]
        if cfg.o_bias:
            self.o_bias = p((L, E), ("layers", "embed"), "zeros")
            names.append("o_bias")
        if cfg.mlp_bias:
            self.gate_bias = p((L, F), ("layers", "mlp"), "zeros")
            self.up_bias = p((L, F), ("layers", "mlp"), "zeros")
            self.down_bias = p((L, E), ("layers", "embed"), "zeros")
            names += ["gate_bias", "up_bias", "down_bias"]
        self.names = tuple(names)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}


def decoder_block(p: dict, x, cos, sin, segment_ids, *, cfg: ModelConfig, rules, attention_fn):
    """One pre-norm block on x [B, T, E]; ``p`` holds this layer's weights (no [L] axis)."""
    dt = jnp.dtype(cfg.dtype)
    p = {name: w.astype(dt) for name, w in p.items()}
    act = ("batch", "length", "act_embed")
    x = constrain(x, act, rules)

    h = rms_norm(x, p["attn_norm"], cfg.rms_norm_eps)
    q = dense(h, p["q"])  # [B, T, H, D]
    k = dense(h, p["k"])  # [B, T, K, D]
    v = dense(h, p["v"])  # [B, T, K, D]
    if cfg.qkv_bias:
        q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
    q = constrain(q, ("batch", "length", "act_heads", None), rules)
    k = constrain(k, ("batch", "length", "act_kv_heads", None), rules)
    v = constrain(v, ("batch", "length", "act_kv_heads", None), rules)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    attn = attention_fn(q, k, v, segment_ids, cfg.sliding_window)  # [B, T, H, D]
    attn_out = dense(attn, p["o"], contract=2)  # [B, T, E]
    if cfg.o_bias:
        attn_out = attn_out + p["o_bias"]
    x = x + constrain(attn_out, act, rules)

    h = rms_norm(x, p["mlp_norm"], cfg.rms_norm_eps)
    mlp_out = swiglu(h, p["gate"], p["up"], p["down"], p.get("gate_bias"), p.get("up_bias"), p.get("down_bias"))
    return x + constrain(mlp_out, act, rules)


class Transformer(nnx.Module):
    """Decoder-only LM: ``model(input_ids, segment_ids=None, positions=None) -> logits [B, T, V]``.

    ``segment_ids`` [B, T] (1, 2, ... per packed document, 0 = padding) keep documents
    from attending to each other; ``positions`` [B, T] restart at 0 per document.
    Without them the row is one document at positions 0..T-1.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, rules=None, tokenizer_dir: str | None = None):
        self.config = cfg
        self.rules = rules if rules is not None else make_rules()
        self.tokenizer_dir = tokenizer_dir  # HF tokenizer files to ship with an export, if any
        self.embedding = _param(rngs, cfg, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"))
        self.layers = LayerStack(cfg, rngs)
        self.final_norm = _param(rngs, cfg, (cfg.hidden_size,), ("norm",), "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, cfg, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"))

    def output_weights(self) -> jax.Array:
        """The output projection [E, V] (the embedding, transposed, when tied)."""
        if self.config.tie_word_embeddings:
            return self.embedding[...].T
        return self.lm_head[...]

    def hidden_states(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        """Final-norm hidden states [B, T, E] in the compute dtype."""
        cfg = self.config
        batch, length = input_ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
        x = jnp.take(self.embedding[...], input_ids, axis=0).astype(cfg.dtype)  # [B, T, E]
        cos, sin = rope_cos_sin(positions, rope_inv_freq(cfg))  # [B, T, D]
        attention_fn = choose_attention(cfg.attention, cfg.dtype, length, self.rules)
        block = functools.partial(decoder_block, cfg=cfg, rules=self.rules, attention_fn=attention_fn)
        if cfg.remat != "none":
            block = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat])

        def scan_body(carry, layer_params):
            return block(layer_params, carry, cos, sin, segment_ids), None

        x, _ = jax.lax.scan(scan_body, x, self.layers.arrays())
        return rms_norm(x, self.final_norm[...], cfg.rms_norm_eps)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., E] -> logits [..., V] in float32 (matmul in the compute dtype, f32 accumulation)."""
        w = self.output_weights().astype(self.config.dtype)
        return dense(hidden, w, out_dtype=jnp.float32)

    def __call__(self, input_ids, segment_ids=None, positions=None) -> jax.Array:
        out = self.logits(self.hidden_states(input_ids, segment_ids, positions))
        return constrain(out, ("batch", "length", "act_vocab"), self.rules)


def abstract_model(cfg: ModelConfig, rules=None, tokenizer_dir: str | None = None) -> Transformer:
    """The model with ShapeDtypeStruct leaves: structure, shapes and axes, no memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), rules=rules, tokenizer_dir=tokenizer_dir))


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedSharding for every variable of ``state``, from its ``axes`` metadata and the rule table."""

    def one(variable):
        axes = variable.get_metadata().get("axes")
        if axes is None:
            return named_sharding(mesh, rules, ())
        return named_sharding(mesh, rules, axes, variable.get_value().shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def init_model(cfg: ModelConfig, mesh: Mesh, rules=None, seed: int = 0, tokenizer_dir: str | None = None) -> Transformer:
    """A randomly initialised model whose parameters are created directly in their shardings."""
    rules = rules if rules is not None else make_rules()
    abstract = abstract_model(cfg, rules, tokenizer_dir)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def create():
        model = Transformer(cfg, rngs=nnx.Rngs(seed), rules=rules, tokenizer_dir=tokenizer_dir)
        return nnx.state(model)

    with jax.set_mesh(mesh):
        state = create()
    return nnx.merge(graphdef, state)

"""DeepSeek-V3's decoder: multi-head latent attention (MLA), leading dense layers, then MoE layers.

MLA (DeepSeek-V2, arXiv 2405.04434) compresses keys and values into a small latent per token and
splits every head into a part without position (``nope``) and a rotated part (``rope``) whose key is
shared by all heads; as transformers' ``DeepseekV3Attention`` computes it:

    q      = q_b(rmsnorm(q_a(h)))  or  q(h)            [B, T, H, Dn + Dr]   (q_lora_rank set / null)
    latent, k_rope = split(kv_a(h), [R, Dr])           [B, T, R], [B, T, Dr]
    k_nope, v = split(kv_b(rmsnorm(latent)), [Dn, Dv]) [B, T, H, Dn], [B, T, H, Dv]
    q = [q_nope, rope(q_rope)],  k = [k_nope, rope(k_rope) for every head]
    out = o(attention(q, k, v))                        scale (Dn + Dr)**-0.5 (x mscale**2 under YaRN)

The q and k heads (Dn + Dr, 192 in DeepSeek-V3) are wider than the v heads (Dv, 128). Every
attention kernel here takes one head width, so v is zero-padded to Dn + Dr and the output cut back
to Dv: probs @ [v, 0] = [probs @ v, 0] exactly, so every kernel (reference, xla, cudnn, splash)
computes MLA honestly, at the price of (Dn + Dr - Dv) / Dv more work in the probs @ v product only
(flash-attention implementations of MLA pad the same way).

``rope_interleave`` (every released DeepSeek-V3 checkpoint): the rotated dims come in interleaved
pairs (x0, x1), (x2, x3) ...; transformers rotates them as [evens | odds] halves, so the q and k rope
parts are de-interleaved into that layout here and rotated as ``apply_rope`` does any head.

Weights, [L] over all layers unless said (E hidden, H heads, R kv_lora_rank, Rq q_lora_rank):

    q_a [L, E, Rq], q_a_norm [L, Rq], q_b [L, Rq, H, Dn+Dr]   (or q [L, E, H, Dn+Dr])
    kv_a [L, E, R + Dr], kv_a_norm [L, R], kv_b [L, R, H, Dn+Dv], o [L, H, Dv, E]
    attn_norm, mlp_norm [L, E]
    gate, up [Ld, E, F], down [Ld, F, E]     the first Ld = moe.first_dense_layers layers' dense MLP
    router, expert_*, shared_* [Lm, ...], selection_bias [Lm, X]   the other Lm layers' MoE (jaxcpt.model.moe)

The layers run as two scans (the dense ones, then the MoE ones), each over its own weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxcpt.config import ConfigError, field
from jaxcpt.model import moe as moe_lib
from jaxcpt.model import remat as remat_lib
from jaxcpt.model.layers import ACTIVATIONS, dense, rms_norm
from jaxcpt.sharding.rules import constrain

LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with DeepseekV3RMSNorm's default eps
SELECTION_BIAS = "selection_bias"  # = transformer.SELECTION_BIAS (the scanned key route() reads)
DENSE_MLP = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, Moonlight): its widths, as in config.json."""

    q_lora_rank: int | None = field(1536, help="width of the compressed query (q_a_proj -> q_a_layernorm -> "
                                    "q_b_proj); null: one q_proj")
    kv_lora_rank: int = field(512, help="width of the compressed key/value latent (kv_a_proj_with_mqa)")
    qk_nope_head_dim: int = field(128, help="per-head query/key dims without RoPE")
    qk_rope_head_dim: int = field(64, help="per-head query/key dims with RoPE; the rotated key is shared by all "
                                  "heads (model.head_dim must equal it: the RoPE tables are this wide)")
    v_head_dim: int = field(128, help="per-head value width")
    rope_interleave: bool = field(True, help="the rotated dims are interleaved pairs (DeepSeek's checkpoints; "
                                  "transformers' rope_interleave)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self) -> None:
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.mla.{name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ConfigError(f"model.mla.q_lora_rank must be >= 1 or null, got {self.q_lora_rank}")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"model.mla.qk_rope_head_dim ({self.qk_rope_head_dim}) must be even for RoPE")


def softmax_scale(mla: MlaConfig, scaling) -> float:
    """transformers' ``yarn_apply_mscale(rope_parameters, qk_head_dim**-0.5)``: under a scaled RoPE with
    ``mscale_all_dim``, the scale of every dim (not only the rotated ones) grows by mscale**2."""
    scale = mla.qk_head_dim ** -0.5
    if scaling is not None and scaling.mscale_all_dim:
        mscale = 1.0 if scaling.factor <= 1 else 0.1 * scaling.mscale_all_dim * math.log(scaling.factor) + 1.0
        scale = scale * mscale * mscale
    return scale


def validate(cfg) -> None:
    """What an MLA model combines with; each refusal names the option and the fix."""
    mla = cfg.mla
    if mla is None:
        if cfg.moe is not None and cfg.moe.first_dense_layers:
            raise ConfigError("model.moe.first_dense_layers needs the DeepSeek-V3 block (model.mla); the shared "
                              "decoder puts experts on every layer")
        if cfg.moe is not None and cfg.moe.score_correction_bias:  # the parameter exists in the MLA stack only
            raise ConfigError("model.moe.score_correction_bias (a selection bias held as a model parameter) needs the "
                              "DeepSeek-V3 block (model.mla); for auxiliary-loss-free balancing on another MoE model "
                              "set model.moe.router_bias_update_rate alone (the bias is then kept in the train state)")
        return
    mla.validate()
    if cfg.head_size != mla.qk_rope_head_dim:
        raise ConfigError(f"an MLA model's head_dim is the rotated width: set head_dim = mla.qk_rope_head_dim "
                          f"({mla.qk_rope_head_dim}), got {cfg.head_size}")
    if cfg.num_kv_heads != cfg.num_heads:
        raise ConfigError(f"MLA expands its latent into every head: num_kv_heads ({cfg.num_kv_heads}) must equal "
                          f"num_heads ({cfg.num_heads})")
    if cfg.moe is not None and cfg.moe.first_dense_layers >= cfg.num_layers:
        raise ConfigError(f"model.moe.first_dense_layers ({cfg.moe.first_dense_layers}) leaves no MoE layer of "
                          f"{cfg.num_layers}; lower it or set model.moe to null")
    others = [name for name, on in (
        ("lora", cfg.lora is not None), ("qk_norm", cfg.qk_norm), ("qkv_bias", cfg.qkv_bias), ("o_bias", cfg.o_bias),
        ("mlp_bias", cfg.mlp_bias), ("post_norms", cfg.post_norms), ("pre_norms=false", not cfg.pre_norms),
        ("attention_sinks", cfg.attention_sinks), ("attn_output_gate", cfg.attn_output_gate),
        ("sliding_window", cfg.sliding_window is not None), ("layer_types", cfg.layer_types is not None),
        ("rope_layers", cfg.rope_layers is not None), ("partial_rotary_factor", cfg.partial_rotary_factor != 1.0),
        ("attn_logit_softcap", cfg.attn_logit_softcap is not None), ("norm_plus_one", cfg.norm_plus_one),
        ("value_norm", cfg.value_norm),
        ("moe.beside_mlp, router_norm or per_expert_scale (Gemma 4's MoE block)",
         cfg.moe is not None and (cfg.moe.beside_mlp or cfg.moe.router_norm or cfg.moe.per_expert_scale))) if on]
    if others:
        raise ConfigError(f"the MLA block (model.mla, DeepSeek-V3) does not combine with {', '.join(others)}; no "
                          "DeepSeek-V3-style checkpoint has them (LoRA on MLA's projections is not built yet)")


def dense_layers(cfg) -> int:
    """Layers with a dense MLP: the first moe.first_dense_layers, or all of them in a model without experts."""
    return cfg.num_layers if cfg.moe is None else cfg.moe.first_dense_layers


def param_shapes(cfg) -> dict[str, tuple[tuple, tuple, str]]:
    """{name: (shape, logical axes, init)} of every LayerStack weight of an MLA model."""
    mla, L, E, H = cfg.mla, cfg.num_layers, cfg.hidden_size, cfg.num_heads
    dn, dr, dv, r = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim, mla.kv_lora_rank
    out = {"attn_norm": ((L, E), ("layers", "norm"), "ones"), "mlp_norm": ((L, E), ("layers", "norm"), "ones")}
    if mla.q_lora_rank is None:
        out["q"] = ((L, E, H, dn + dr), ("layers", "embed", "heads", "head_dim"), "normal")
    else:
        rq = mla.q_lora_rank
        out["q_a"] = ((L, E, rq), ("layers", "embed", "latent"), "normal")
        out["q_a_norm"] = ((L, rq), ("layers", "norm"), "ones")
        out["q_b"] = ((L, rq, H, dn + dr), ("layers", "latent", "heads", "head_dim"), "normal")
    out["kv_a"] = ((L, E, r + dr), ("layers", "embed", "latent"), "normal")
    out["kv_a_norm"] = ((L, r), ("layers", "norm"), "ones")
    out["kv_b"] = ((L, r, H, dn + dv), ("layers", "latent", "heads", "head_dim"), "normal")
    out["o"] = ((L, H, dv, E), ("layers", "heads", "head_dim", "embed"), "normal")
    ld, f = dense_layers(cfg), cfg.intermediate_size
    if ld:
        out["gate"] = ((ld, E, f), ("layers", "embed", "mlp"), "normal")
        out["up"] = ((ld, E, f), ("layers", "embed", "mlp"), "normal")
        out["down"] = ((ld, f, E), ("layers", "mlp", "embed"), "normal")
    if cfg.moe is not None:
        lm = L - ld
        for name, (shape, axes) in moe_lib.expert_param_shapes(cfg.moe, E, lm).items():
            out[name] = (shape, axes, "zeros" if name.endswith("_bias") else "normal")
        if cfg.moe.score_correction_bias:  # float32 whatever param_dtype: transformers keeps it so
            out[SELECTION_BIAS] = ((lm, cfg.moe.num_experts), ("layers", None), "zeros")
    return out


def create_params(stack, cfg, p) -> list[str]:
    """Create an MLA model's weights on ``stack`` (``p(shape, axes, init)``: ``transformer._param``)."""
    for name, (shape, axes, init) in param_shapes(cfg).items():
        param = p(shape, axes, init)
        if name == SELECTION_BIAS:
            param.set_value(param[...].astype(jnp.float32))
        setattr(stack, name, param)
    return list(param_shapes(cfg))


def num_params(cfg) -> tuple[int, int]:
    """(total, active per token) parameters of an MLA model as stored."""
    total = sum(math.prod(shape) for shape, _, _ in param_shapes(cfg).values())
    vocab, e = cfg.padded_vocab_size, cfg.hidden_size
    total += vocab * e * (1 if cfg.tie_word_embeddings else 2) + e
    if cfg.moe is None:
        return total, total
    per_layer, active = cfg.moe.params_per_layer(e)
    return total, total - (cfg.num_layers - dense_layers(cfg)) * (per_layer - active)


def _deinterleave(x):
    """[..., Dr] interleaved pairs (x0, x1), (x2, x3) ... -> [evens | odds], the rotate-half layout."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def block(p: dict, x, cos_sin, *, cfg, rules, attend, valid=None):
    """One DeepSeek-V3 layer on x [B, T, E] -> (x, RouterStats or None); ``p`` this layer's weights."""
    from jaxcpt.model.rope import apply_rope  # rope imports model.config, which imports this module

    mla, dt = cfg.mla, jnp.dtype(cfg.dtype)
    selection_bias = p.get(SELECTION_BIAS)  # [X] float32, never cast
    p = remat_lib.cast_for_compute({n: w for n, w in p.items() if n != SELECTION_BIAS}, dt)
    norm = functools.partial(rms_norm, eps=cfg.rms_norm_eps)
    dn, dv = mla.qk_nope_head_dim, mla.v_head_dim
    act = ("batch", "length", "act_embed")
    x = constrain(x, act, rules)

    h = norm(x, p["attn_norm"])  # [B, T, E]
    if "q_a" in p:
        q = dense(rms_norm(dense(h, p["q_a"]), p["q_a_norm"], LATENT_NORM_EPS), p["q_b"])  # [B, T, H, Dn+Dr]
    else:
        q = dense(h, p["q"])  # [B, T, H, Dn+Dr]
    q = checkpoint_name(q, remat_lib.PROJECTION_NAMES["q"])
    kv = dense(h, p["kv_a"])  # [B, T, R+Dr]
    latent, k_rope = kv[..., : mla.kv_lora_rank], kv[..., mla.kv_lora_rank:]  # [B, T, R], [B, T, Dr]
    kv = dense(rms_norm(latent, p["kv_a_norm"], LATENT_NORM_EPS), p["kv_b"])  # [B, T, H, Dn+Dv]
    kv = checkpoint_name(kv, remat_lib.PROJECTION_NAMES["k"])
    k_nope, v = kv[..., :dn], kv[..., dn:]  # [B, T, H, Dn], [B, T, H, Dv]
    q_nope, q_rope = q[..., :dn], q[..., dn:]  # [B, T, H, Dn], [B, T, H, Dr]
    k_rope = k_rope[:, :, None, :]  # [B, T, 1, Dr]: one rotated key for all heads
    if mla.rope_interleave:
        q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
    cos, sin = cos_sin  # [B, T, Dr]
    q_rope, k_rope = apply_rope(q_rope, cos, sin), apply_rope(k_rope, cos, sin)
    q = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, H, Dn+Dr]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (*k_nope.shape[:3], k_rope.shape[-1]))], axis=-1)
    width = q.shape[-1]
    if dv < width:  # one head width for every kernel: zero columns of v add zero columns to the output
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, width - dv)))  # [B, T, H, Dn+Dr]
    elif dv > width:  # zero dims of q and k add nothing to the scores (the scale is passed explicitly)
        q, k = (jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, dv - width))) for a in (q, k))
    q = constrain(q, ("batch", "length", "act_heads", None), rules)
    k = constrain(k, ("batch", "length", "act_kv_heads", None), rules)
    v = constrain(v, ("batch", "length", "act_kv_heads", None), rules)
    attn, _ = attend(q, k, v, "full_attention")
    attn = checkpoint_name(attn[..., :dv], remat_lib.ATTENTION_OUT)  # [B, T, H, Dv]
    attn_out = checkpoint_name(dense(attn, p["o"], 2), remat_lib.PROJECTION_NAMES["o"])  # [B, T, E]
    x = x + constrain(attn_out, act, rules)

    h = norm(x, p["mlp_norm"])
    stats = None
    if "router" in p:
        mlp_out, stats = moe_lib.moe_mlp(h, p, cfg.moe, cfg.activation, valid, rules, selection_bias)
    else:
        hidden = ACTIVATIONS[cfg.activation](dense(h, p["gate"])) * dense(h, p["up"])  # [B, T, F]
        mlp_out = dense(hidden, p["down"])
    return x + constrain(mlp_out, act, rules), stats


def forward(model, x, cos_sin, attend, valid, router_bias=None):
    """Every layer of an MLA model on x [B, T, E]: the dense layers' scan, then the MoE layers'.

    Returns (x, RouterStats [Lm, ...] or None). ``router_bias`` [Lm, X]: a selection bias kept beside the
    parameters (jaxcpt.train.balance), which replaces the model's own ``selection_bias`` when given."""
    cfg = model.config
    arrays = model.layers.arrays()
    if router_bias is not None:
        arrays[SELECTION_BIAS] = router_bias
    ld = dense_layers(cfg)
    moe_names = set(moe_lib.expert_param_shapes(cfg.moe, 1, 1)) | {SELECTION_BIAS} if cfg.moe is not None else set()
    one = remat_lib.checkpointed(functools.partial(block, cfg=cfg, rules=model.rules, attend=attend, valid=valid),
                                 cfg)

    def body(carry, layer):
        return one(layer, carry, cos_sin)

    router = None
    for start, stop, own in ((0, ld, set(DENSE_MLP)), (ld, cfg.num_layers, moe_names)):
        if stop == start:
            continue
        shared = {n: a[start:stop] for n, a in arrays.items() if n not in set(DENSE_MLP) | moe_names}
        x, stats = jax.lax.scan(body, x, {**shared, **{n: a for n, a in arrays.items() if n in own}})
        router = stats if own is moe_names else router
    return x, router

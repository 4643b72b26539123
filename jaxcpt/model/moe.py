"""The mixture-of-experts MLP: dropless token-choice top-k routing and grouped matmuls.

Each token's router logits (float32) pick its ``top_k`` experts; the token's copies are
sorted by expert so that each expert's rows are contiguous, and the three expert
projections run as ``jax.lax.ragged_dot`` over those groups (one grouped matmul per
projection, no padding to a capacity: no token is ever dropped). The weighted expert
outputs are scattered back onto their tokens.

Experts are one stacked parameter per projection, with the logical axis ``exp``:

    layers.router        [L, E, X]      (layers, embed, None)       X = num_experts
    layers.expert_gate   [L, X, E, Fe]  (layers, exp, embed, mlp)   Fe = expert_intermediate_size
    layers.expert_up     [L, X, E, Fe]  (layers, exp, embed, mlp)
    layers.expert_down   [L, X, Fe, E]  (layers, exp, mlp, embed)

so the one rule table (``exp`` -> the ``expert`` mesh axis) shards them.

gpt-oss adds, as options of ``MoeConfig``: a router bias ``layers.router_bias`` [L, X]
(``router_bias``), expert biases ``layers.expert_gate_bias`` / ``expert_up_bias`` [L, X, Fe] and
``expert_down_bias`` [L, X, E] (``expert_bias``), and its clamped SwiGLU (``swiglu_limit``).

Every layer also returns its routing statistics (``RouterStats``, float32, over the real tokens
only) for the load-balancing losses and the routing metrics.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError, field
from jaxcpt.errors import UserError
from jaxcpt.model import expert_lora, expert_parallel
from jaxcpt.model.layers import ACTIVATIONS, clamped_swiglu
from jaxcpt.sharding.rules import make_rules

EXPERT_PARAMS = ("router", "expert_gate", "expert_up", "expert_down")
ROUTER_PARAMS = ("router", "router_bias", "router_scale", "per_expert_scale")  # used by the routing, not the experts
# MoeConfig's load-balancing choices: how a run trains the router, not what the model is (a run from an HF
# directory or a checkpoint may set them; jaxcpt.train.config)
BALANCING_FIELDS = ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs in place of the dense MLP (Qwen3-MoE, Mixtral, OLMoE)."""

    num_experts: int = field(8, help="experts per MoE layer (HF num_experts / num_local_experts)")
    top_k: int = field(2, help="experts each token is routed to (HF num_experts_per_tok)")
    expert_intermediate_size: int = field(
        1024, help="width of each expert's MLP (HF moe_intermediate_size; Mixtral: intermediate_size)")
    norm_topk_prob: bool = field(
        True, help="renormalise the top-k softmax probabilities to sum to 1 (Qwen3-MoE norm_topk_prob, Mixtral); "
        "false: use them as they are (OLMoE)")
    router_aux_loss_coef: float = field(
        0.0, help="weight of the Switch-Transformer load-balancing loss added to the training objective, computed as "
        "transformers' load_balancing_loss_func over all layers (HF router_aux_loss_coef; written on export); 0 = off")
    router_z_loss_coef: float = field(
        0.0, help="weight of the router z-loss (ST-MoE: mean over tokens and layers of logsumexp(router logits)^2); "
        "0 = off")
    router_bias: bool = field(False, help="a learned bias on the router logits, used for selection and weights "
                              "alike (gpt-oss)")
    expert_bias: bool = field(False, help="biases on every expert's gate, up and down projections (gpt-oss)")
    swiglu_limit: float | None = field(
        None, help="the experts' clamped SwiGLU (gpt-oss): gate clamped to at most this, up to [-limit, limit], "
        "hidden = (up + 1) * gate * sigmoid(swiglu_alpha * gate); null: the model's activation(gate) * up")
    swiglu_alpha: float = field(1.702, help="sigmoid gain of the clamped SwiGLU (with swiglu_limit only)")
    router_bias_update_rate: float = field(
        0.0, help="auxiliary-loss-free balancing (DeepSeek-V3): a per-layer, per-expert bias added to the router "
        "probabilities for the choice of experts only (the combine weights stay unbiased), moved by this much per "
        "step against each expert's load outside the optimiser (jaxcpt/train/balance.py; e.g. 0.001); 0 = off. "
        "Of the transformers MoE families only deepseek_v3 holds such a bias (its e_score_correction_bias, a "
        "model parameter then, moved in place); for the others see export.router_bias")
    # DeepSeek-V3's router (jaxcpt/hf/families/deepseek_v3.py); the defaults are the softmax routers above
    scoring: Literal["softmax", "sigmoid"] = field(
        "softmax", help="router scores: softmax over the experts, or each expert's sigmoid (DeepSeek-V3's "
        "scoring_func); the top-k weights are these scores (renormalised with norm_topk_prob)")
    num_groups: int = field(1, help="experts are split into this many equal groups and a token chooses only among "
                            "the top_groups groups whose two best (selection-biased) scores sum highest (DeepSeek-V3's "
                            "n_group); 1 = no group limit")
    top_groups: int = field(1, help="groups a token may choose experts from (DeepSeek-V3's topk_group)")
    routed_scaling_factor: float = field(1.0, help="the routed experts' weights are multiplied by this, after "
                                         "norm_topk_prob (DeepSeek-V3's routed_scaling_factor)")
    shared_experts: int = field(0, help="an always-on dense MLP of shared_experts x expert_intermediate_size added "
                                "to every MoE layer's output (DeepSeek-V3's n_shared_experts); 0 = none")
    first_dense_layers: int = field(0, help="the first N layers have a dense MLP of model.intermediate_size instead "
                                    "of experts (DeepSeek-V3's first_k_dense_replace; needs model.mla)")
    score_correction_bias: bool = field(
        False, help="the model holds its selection bias as a parameter, layers.selection_bias [L_moe, X] float32 "
        "(DeepSeek-V3's e_score_correction_bias, imported and exported): added to the scores for the choice only; "
        "router_bias_update_rate moves it in place")
    # Gemma 4's MoE block (enable_moe_block; jaxcpt/model/moe_beside.py)
    beside_mlp: bool = field(
        False, help="the experts run beside the dense MLP instead of replacing it, each branch with its own norms, "
        "their outputs added (Gemma 4's enable_moe_block); the router then reads the residual stream, not the MLP's "
        "normed input")
    router_norm: bool = field(
        False, help="the router reads its input RMS-normed without a weight, times a learned scale "
        "(layers.router_scale [L, E]) and hidden_size**-0.5 (Gemma 4's router; with beside_mlp)")
    per_expert_scale: bool = field(
        False, help="each chosen expert's combine weight, after renormalisation, times a learned scale of that expert "
        "(layers.per_expert_scale [L, X]; Gemma 4's router; with beside_mlp)")

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ConfigError(f"model.moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"model.moe.top_k ({self.top_k}) must be between 1 and num_experts "
                              f"({self.num_experts}); lower top_k or add experts")
        if self.expert_intermediate_size < 1:
            raise ConfigError(f"model.moe.expert_intermediate_size must be >= 1, got {self.expert_intermediate_size}")
        for name in BALANCING_FIELDS:
            if getattr(self, name) < 0:
                raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.swiglu_limit is not None and self.swiglu_limit <= 0:
            raise ConfigError(f"model.moe.swiglu_limit must be > 0 or null, got {self.swiglu_limit}")
        for name in ("router_norm", "per_expert_scale"):
            if getattr(self, name) and not self.beside_mlp:
                raise ConfigError(f"model.moe.{name} is part of Gemma 4's router, which sits beside the dense MLP; "
                                  "set model.moe.beside_mlp=true as well, or set it off")
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ConfigError(f"model.moe.num_groups ({self.num_groups}) must divide num_experts ({self.num_experts})")
        if not 1 <= self.top_groups <= self.num_groups:
            raise ConfigError(f"model.moe.top_groups ({self.top_groups}) must be between 1 and num_groups "
                              f"({self.num_groups})")
        if self.num_groups > 1 and self.num_experts // self.num_groups < 2:
            raise ConfigError("model.moe.num_groups leaves fewer than 2 experts per group; groups are scored by "
                              "their two best experts (DeepSeek-V3), so use fewer groups")
        if self.num_groups > 1 and self.top_k > self.top_groups * (self.num_experts // self.num_groups):
            raise ConfigError(f"model.moe.top_k ({self.top_k}) exceeds the experts of the top_groups groups "
                              f"({self.top_groups} x {self.num_experts // self.num_groups}); raise top_groups")
        if self.shared_experts < 0 or self.first_dense_layers < 0:
            raise ConfigError("model.moe.shared_experts and first_dense_layers must be >= 0")

    def params_per_layer(self, hidden_size: int) -> tuple[int, int]:
        """(total, active per token) parameters of one MoE MLP, router (and biases) included."""
        f = self.expert_intermediate_size
        expert = 3 * hidden_size * f + ((2 * f + hidden_size) if self.expert_bias else 0)
        router = (hidden_size + (1 if self.router_bias else 0) + (1 if self.score_correction_bias else 0)) * \
            self.num_experts
        router += (hidden_size if self.router_norm else 0) + (self.num_experts if self.per_expert_scale else 0)
        shared = 3 * hidden_size * f * self.shared_experts  # always active
        return router + shared + self.num_experts * expert, router + shared + self.top_k * expert


def expert_param_shapes(moe: MoeConfig, hidden_size: int, num_layers: int) -> dict:
    """{name: (shape, logical axes)} of the MoE parameters of the layer stack."""
    L, E, X, F = num_layers, hidden_size, moe.num_experts, moe.expert_intermediate_size
    shapes = {
        "router": ((L, E, X), ("layers", "embed", None)),
        "expert_gate": ((L, X, E, F), ("layers", "exp", "embed", "mlp")),
        "expert_up": ((L, X, E, F), ("layers", "exp", "embed", "mlp")),
        "expert_down": ((L, X, F, E), ("layers", "exp", "mlp", "embed")),
    }
    if moe.router_bias:
        shapes["router_bias"] = ((L, X), ("layers", None))
    if moe.router_norm:  # Gemma 4: initialised to ones (jaxcpt.model.moe_beside)
        shapes["router_scale"] = ((L, E), ("layers", "norm"))
    if moe.per_expert_scale:
        shapes["per_expert_scale"] = ((L, X), ("layers", None))
    if moe.shared_experts:  # DeepSeek-V3's shared experts: one dense MLP of shared_experts x F
        fs = moe.shared_experts * F
        shapes.update(shared_gate=((L, E, fs), ("layers", "embed", "mlp")),
                      shared_up=((L, E, fs), ("layers", "embed", "mlp")),
                      shared_down=((L, fs, E), ("layers", "mlp", "embed")))
    if moe.expert_bias:
        shapes.update(expert_gate_bias=((L, X, F), ("layers", "exp", "mlp")),
                      expert_up_bias=((L, X, F), ("layers", "exp", "mlp")),
                      expert_down_bias=((L, X, E), ("layers", "exp", "embed")))
    return shapes


def check_expert_split(axes, shape, mesh, rules) -> None:
    """Refuse an ``exp`` axis whose mesh axes do not divide the expert count (the rule table would silently
    replicate the experts on every device instead of splitting them)."""
    if "exp" not in axes:
        return
    mesh_axes = dict(rules).get("exp") or ()
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    size = 1
    for name in mesh_axes:
        size *= dict(mesh.shape).get(name, 1)
    experts = shape[list(axes).index("exp")]
    if experts % size:
        raise UserError(f"{experts} experts cannot be split over the mesh's {'x'.join(mesh_axes)} axis of size {size}; "
                        f"make mesh.expert a divisor of {experts} (e.g. {math.gcd(experts, size)})")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RouterStats:
    """One layer's routing over the real tokens of a batch (float32; scanned layers add a leading [L])."""

    counts: jax.Array  # [X] top-k assignments per expert
    prob_sum: jax.Array  # [X] router softmax probability summed over tokens
    tokens: jax.Array  # [] real tokens routed
    z_sum: jax.Array  # [] sum over tokens of logsumexp(router logits)^2


def route(x: jax.Array, router_w: jax.Array, moe: MoeConfig, bias: jax.Array | None = None,
          selection_bias: jax.Array | None = None, expert_scale: jax.Array | None = None):
    """Top-k routing of tokens x [N, E] with router_w [E, X] (and a bias [X] when the router has one).

    Returns (logits [N, X] float32, weights [N, k] float32, experts [N, k] int32). Logits and
    softmax are float32 whatever the compute dtype: the choice of experts must not flip with rounding.

    ``bias`` [X] is the router's own bias (gpt-oss): added to the logits, it counts for the choice and the
    weights alike. ``selection_bias`` [X] (float32; auxiliary-loss-free balancing, jaxcpt.train.balance)
    is added to the probabilities for the choice of experts only: the weights are the unbiased probabilities of the
    chosen experts, so the bias changes the gradients only through which experts are chosen.

    ``expert_scale`` [X] (Gemma 4's ``per_expert_scale``) multiplies each chosen expert's weight after the
    renormalisation; the choice does not see it.
    DeepSeek-V3 (``moe.scoring`` sigmoid, ``num_groups`` > 1, ``routed_scaling_factor``): sigmoid scores, the
    choice limited to the best groups (``group_limited``), the weights renormalised then scaled.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))  # [N, X]
    if bias is not None:  # gpt-oss: the bias counts for the choice and the weights alike
        logits = logits + bias.astype(jnp.float32)
    probs = jax.nn.sigmoid(logits) if moe.scoring == "sigmoid" else jax.nn.softmax(logits, axis=-1)  # [N, X]
    if selection_bias is None and moe.num_groups == 1:
        weights, experts = jax.lax.top_k(probs, moe.top_k)  # [N, k] each
    else:  # DeepSeek-V3: selection on probs + bias; the bias has no gradient path into the weights
        choice = probs if selection_bias is None else \
            probs + jax.lax.stop_gradient(selection_bias.astype(jnp.float32))  # [N, X]
        if moe.num_groups > 1:
            choice = group_limited(choice, moe.num_groups, moe.top_groups)
        _, experts = jax.lax.top_k(choice, moe.top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)  # [N, k]
    # Renormalised top-k probabilities are the softmax over the top-k logits (gpt-oss computes it that way).
    if moe.norm_topk_prob:  # DeepSeek-V3 adds 1e-20 to the sum (its sigmoid weights can all be tiny)
        weights = weights / (weights.sum(-1, keepdims=True) + (1e-20 if moe.scoring == "sigmoid" else 0.0))
    if moe.routed_scaling_factor != 1.0:
        weights = weights * moe.routed_scaling_factor
    if expert_scale is not None:
        weights = weights * jnp.take(expert_scale.astype(jnp.float32), experts)  # [N, k]
    return logits, weights, experts


def group_limited(choice: jax.Array, num_groups: int, top_groups: int) -> jax.Array:
    """DeepSeek-V3's group-limited choice: scores [N, X] with every expert outside the token's ``top_groups`` best
    groups set to -inf. A group's score is the sum of its two best scores (transformers' DeepseekV3TopkRouter)."""
    n, x = choice.shape
    grouped = choice.reshape(n, num_groups, x // num_groups)  # [N, G, X/G]
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
    _, best = jax.lax.top_k(group_scores, top_groups)  # [N, g]
    keep = jax.nn.one_hot(best, num_groups, dtype=jnp.bool_).any(1)  # [N, G]
    return jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, x)  # [N, X]


def router_stats(logits: jax.Array, experts: jax.Array, valid: jax.Array, num_experts: int) -> RouterStats:
    """logits [N, X], experts [N, k], valid [N] (1 for real tokens) -> this layer's ``RouterStats``."""
    valid = valid.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # [N, X]
    one_hot = jax.nn.one_hot(experts, num_experts, dtype=jnp.float32).sum(1)  # [N, X]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [N]
    return RouterStats(
        counts=jax.lax.stop_gradient(one_hot * valid[:, None]).sum(0),
        prob_sum=(probs * valid[:, None]).sum(0),
        tokens=valid.sum(),
        z_sum=(lse * lse * valid).sum(),
    )


def grouped_experts(x, experts, weights, w_gate, w_up, w_down, activation: str, *, biases=None, glu=None,
                    adapters=None, lora_scale: float = 1.0):
    """The experts' gated MLPs on their tokens, combined: x [N, E] -> [N, E].

    experts/weights [N, k]; w_gate/w_up [X, E, F], w_down [X, F, E]. The N*k token copies are
    sorted by expert (stable, so ties keep token order) and each projection is one ragged_dot
    over the per-expert groups. ``biases``: (gate [X, F], up [X, F], down [X, E]) per expert, or
    None; ``glu(gate, up) -> hidden`` replaces activation(gate) * up (``expert_glu``). ``adapters``: the
    experts' LoRA adapters by name (``jaxcpt.model.expert_lora``), scaled by ``lora_scale``, or None.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)  # [N*k] copies, grouped by expert
    token = order // k  # [N*k] which token each sorted copy is
    group_sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)  # [X]
    xs = jnp.take(x, token, axis=0)  # [N*k, E]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)  # [N*k, F]
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)  # [N*k, F]
    lora = expert_lora.gate_up_update(xs, group_sizes, adapters, lora_scale) if adapters else None
    if lora is not None:  # each copy's expert's low-rank update, two more ragged_dots through the rank
        gate, up = gate + lora[0], up + lora[1]
    if biases is not None:  # each sorted copy takes its expert's bias row
        owner = jnp.take(flat, order)  # [N*k] expert of each sorted copy
        # an id outside [0, X) (expert parallelism's slots for other devices' experts, weight 0) takes no bias:
        # jnp.take's default fill for such rows is NaN, which the zero weight would not remove
        b_gate, b_up, b_down = (jnp.take(b, owner, axis=0, mode="fill", fill_value=0)
                                for b in biases)  # [N*k, F], [N*k, F], [N*k, E]
        gate, up = gate + b_gate, up + b_up
    hidden = glu(gate, up) if glu is not None else ACTIVATIONS[activation](gate) * up  # [N*k, F]
    out = jax.lax.ragged_dot(hidden, w_down, group_sizes)  # [N*k, E]
    lora = expert_lora.down_update(hidden, group_sizes, adapters, lora_scale) if adapters else None
    if lora is not None:
        out = out + lora
    if biases is not None:
        out = out + b_down
    out = out * jnp.take(weights.reshape(-1), order)[:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[token].add(out)  # [N, E]


def expert_glu(moe: MoeConfig):
    """The experts' ``glu(gate, up)`` when it is not activation(gate) * up (gpt-oss's clamped SwiGLU), else None."""
    if moe.swiglu_limit is None:
        return None
    return functools.partial(clamped_swiglu, alpha=moe.swiglu_alpha, limit=moe.swiglu_limit)


def moe_mlp(h: jax.Array, p: dict, moe: MoeConfig, activation: str, valid: jax.Array | None, rules=None,
            selection_bias: jax.Array | None = None, router_input: jax.Array | None = None, lora=None):
    """The MoE MLP of one layer: h [B, T, E] -> (out [B, T, E], RouterStats).

    ``p`` holds this layer's router and expert weights (and biases, when the config has them);
    ``valid`` [B, T] marks real tokens (segment id != 0) for the statistics (None: all are). When the
    mesh splits the experts (``rules``: the sharding rule table, None = the default one), they run
    expert-parallel (``jaxcpt.model.expert_parallel``). ``selection_bias`` [X]: this layer's bias of
    auxiliary-loss-free balancing (``route``), or None. ``router_input`` [B, T, E]: what the router reads when it
    is not ``h`` (Gemma 4's router reads the normed residual stream, ``jaxcpt.model.moe_beside``). ``lora``: the
    model's ``LoraConfig`` (its expert targets adapt the experts, ``jaxcpt.model.expert_lora``), or None.
    """
    batch, length, width = h.shape
    x = h.reshape(batch * length, width)  # [N, E]
    routed = x if router_input is None else router_input.reshape(batch * length, width)  # [N, E]
    logits, weights, experts = route(routed, p["router"], moe, p.get("router_bias"), selection_bias,
                                     p.get("per_expert_scale"))
    shapes = expert_param_shapes(moe, width, 1)
    params = {name: p[name] for name in shapes
              if name not in ROUTER_PARAMS and not name.startswith("shared_")}  # each [X, ...]
    adapters = expert_lora.layer_adapters(p, lora)  # each [X, ...], split on exp like the experts, or None
    if adapters:
        shapes |= expert_lora.shapes(moe, width, 1, lora.rank, lora.targets)
        params |= adapters
    glu = expert_glu(moe)

    def experts_fn(x, experts, weights, w):  # x [N, E], experts/weights [N, k] -> [N, E]
        biases = (w["expert_gate_bias"], w["expert_up_bias"], w["expert_down_bias"]) if moe.expert_bias else None
        return grouped_experts(x, experts, weights, w["expert_gate"], w["expert_up"], w["expert_down"], activation,
                               biases=biases, glu=glu, adapters={n: w[n] for n in adapters} if adapters else None,
                               lora_scale=lora.scale if adapters else 1.0)

    rules = make_rules() if rules is None else rules
    if expert_parallel.is_active(rules, moe.num_experts):
        axes = {name: shapes[name][1][1:] for name in params}  # logical axes without "layers"
        k = experts.shape[-1]
        out = expert_parallel.experts_over_mesh(h, experts.reshape(batch, length, k), weights.reshape(batch, length, k),
                                                params, axes, experts_fn, rules).reshape(batch * length, width)
    else:
        out = experts_fn(x, experts, weights, params)
    out = out.reshape(batch, length, width)
    if moe.shared_experts:  # DeepSeek-V3: the shared experts' dense MLP sees every token
        gate = jnp.einsum("bte,ef->btf", h, p["shared_gate"], preferred_element_type=jnp.float32).astype(h.dtype)
        up = jnp.einsum("bte,ef->btf", h, p["shared_up"], preferred_element_type=jnp.float32).astype(h.dtype)
        out = out + jnp.einsum("btf,fe->bte", ACTIVATIONS[activation](gate) * up, p["shared_down"],
                               preferred_element_type=jnp.float32).astype(h.dtype)  # [B, T, E]
    valid = jnp.ones((batch * length,), jnp.float32) if valid is None else valid.reshape(-1)
    return out, router_stats(logits, experts, valid, moe.num_experts)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
    """transformers' ``load_balancing_loss_func`` from the per-layer stats [L, X] (Switch Transformer eq. 4-6).

    As transformers accumulates it: assignments and probabilities are summed over all layers
    and divided by all layers' tokens before the product, X * sum_e f_e P_e.
    """
    rows = jnp.maximum(stats.tokens.sum(), 1.0)
    fraction = stats.counts.sum(0) / rows  # [X] sums to top_k
    prob = stats.prob_sum.sum(0) / rows  # [X]
    return stats.counts.shape[-1] * jnp.sum(fraction * prob)


def z_loss(stats: RouterStats) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens and layers of logsumexp(router logits)^2."""
    return stats.z_sum.sum() / jnp.maximum(stats.tokens.sum(), 1.0)


def router_objective(stats: RouterStats | None, moe: MoeConfig | None) -> jax.Array:
    """The weighted balancing terms to add to the mean token loss (0 for a dense model)."""
    if stats is None or moe is None:
        return jnp.zeros((), jnp.float32)
    total = jnp.zeros((), jnp.float32)
    if moe.router_aux_loss_coef:
        total = total + moe.router_aux_loss_coef * load_balancing_loss(stats)
    if moe.router_z_loss_coef:
        total = total + moe.router_z_loss_coef * z_loss(stats)
    return total

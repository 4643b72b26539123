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

Every layer also returns its routing statistics (``RouterStats``, float32, over the real tokens
only) for the load-balancing losses and the routing metrics.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError, field
from jaxcpt.errors import UserError
from jaxcpt.model.layers import ACTIVATIONS

EXPERT_PARAMS = ("router", "expert_gate", "expert_up", "expert_down")
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
    router_bias_update_rate: float = field(
        0.0, help="auxiliary-loss-free balancing (DeepSeek-V3): a per-layer, per-expert bias added to the router "
        "probabilities for the choice of experts only (the combine weights stay unbiased), moved by this much per "
        "step against each expert's load outside the optimiser (jaxcpt/train/balance.py; e.g. 0.001); 0 = off. "
        "No transformers MoE family holds such a bias: see export.router_bias")

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

    def params_per_layer(self, hidden_size: int) -> tuple[int, int]:
        """(total, active per token) parameters of one MoE MLP, router included."""
        expert = 3 * hidden_size * self.expert_intermediate_size
        router = hidden_size * self.num_experts
        return router + self.num_experts * expert, router + self.top_k * expert


def expert_param_shapes(moe: MoeConfig, hidden_size: int, num_layers: int) -> dict:
    """{name: (shape, logical axes)} of the MoE parameters of the layer stack."""
    L, E, X, F = num_layers, hidden_size, moe.num_experts, moe.expert_intermediate_size
    return {
        "router": ((L, E, X), ("layers", "embed", None)),
        "expert_gate": ((L, X, E, F), ("layers", "exp", "embed", "mlp")),
        "expert_up": ((L, X, E, F), ("layers", "exp", "embed", "mlp")),
        "expert_down": ((L, X, F, E), ("layers", "exp", "mlp", "embed")),
    }


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


def route(x: jax.Array, router_w: jax.Array, moe: MoeConfig, bias: jax.Array | None = None):
    """Top-k routing of tokens x [N, E] with router_w [E, X].

    Returns (logits [N, X] float32, weights [N, k] float32, experts [N, k] int32). Logits and
    softmax are float32 whatever the compute dtype: the choice of experts must not flip with rounding.

    ``bias`` [X] (float32; auxiliary-loss-free balancing, jaxcpt.train.balance) is added to the
    probabilities for the choice of experts only: the weights are the unbiased probabilities of the
    chosen experts, so the bias changes the gradients only through which experts are chosen.
    """
    logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32))  # [N, X]
    probs = jax.nn.softmax(logits, axis=-1)  # [N, X]
    if bias is None:
        weights, experts = jax.lax.top_k(probs, moe.top_k)  # [N, k] each
    else:  # DeepSeek-V3: selection on probs + bias; bias has no gradient path into the weights
        _, experts = jax.lax.top_k(probs + jax.lax.stop_gradient(bias.astype(jnp.float32)), moe.top_k)  # [N, k]
        weights = jnp.take_along_axis(probs, experts, axis=-1)  # [N, k]
    if moe.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return logits, weights, experts


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


def grouped_experts(x, experts, weights, w_gate, w_up, w_down, activation: str):
    """The experts' gated MLPs on their tokens, combined: x [N, E] -> [N, E].

    experts/weights [N, k]; w_gate/w_up [X, E, F], w_down [X, F, E]. The N*k token copies are
    sorted by expert (stable, so ties keep token order) and each projection is one ragged_dot
    over the per-expert groups.
    """
    n, k = experts.shape
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)  # [N*k] copies, grouped by expert
    token = order // k  # [N*k] which token each sorted copy is
    group_sizes = jnp.bincount(flat, length=w_gate.shape[0]).astype(jnp.int32)  # [X]
    xs = jnp.take(x, token, axis=0)  # [N*k, E]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)  # [N*k, F]
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)  # [N*k, F]
    out = jax.lax.ragged_dot(ACTIVATIONS[activation](gate) * up, w_down, group_sizes)  # [N*k, E]
    out = out * jnp.take(weights.reshape(-1), order)[:, None].astype(out.dtype)
    return jnp.zeros_like(x).at[token].add(out)  # [N, E]


def moe_mlp(h: jax.Array, p: dict, moe: MoeConfig, activation: str, valid: jax.Array | None,
            bias: jax.Array | None = None):
    """The MoE MLP of one layer: h [B, T, E] -> (out [B, T, E], RouterStats).

    ``p`` holds this layer's router and expert weights; ``valid`` [B, T] marks real tokens
    (segment id != 0) for the statistics (None: all are); ``bias`` [X]: this layer's selection bias
    (``route``), or None.
    """
    batch, length, width = h.shape
    x = h.reshape(batch * length, width)  # [N, E]
    logits, weights, experts = route(x, p["router"], moe, bias)
    out = grouped_experts(x, experts, weights, p["expert_gate"], p["expert_up"], p["expert_down"], activation)
    valid = jnp.ones((batch * length,), jnp.float32) if valid is None else valid.reshape(-1)
    return out.reshape(batch, length, width), router_stats(logits, experts, valid, moe.num_experts)


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

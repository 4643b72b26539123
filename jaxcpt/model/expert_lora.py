"""LoRA adapters on the experts of an MoE model (``model.lora.targets: [expert_gate_up, expert_down]``).

Each expert gets its own low-rank update, stacked like the experts themselves (``jaxcpt.model.moe``):

    layers.expert_gate_up_lora_a  [L, X, E, r]      (layers, exp, embed, lora_rank)
    layers.expert_gate_up_lora_b  [L, X, r, 2, Fe]  (layers, exp, lora_rank, None, mlp)   [:, :, :, 0] gate, 1 up
    layers.expert_down_lora_a     [L, X, Fe, r]     (layers, exp, mlp, lora_rank)
    layers.expert_down_lora_b     [L, X, r, E]      (layers, exp, lora_rank, embed)

so expert ``j`` computes ``gate|up = x (W_gate|W_up)[j] + s (x A[j]) B[j]`` and
``down = h W_down[j] + s (h A_down[j]) B_down[j]``, s = alpha / r as for the dense projections.

Why gate and up share one adapter (one A, a B over both): transformers 5 keeps each MoE layer's experts
fused as ``mlp.experts.gate_up_proj`` [X, 2Fe, E] (gpt-oss: [X, E, 2Fe], interleaved) and ``down_proj``,
and peft (0.21) adapts exactly those tensors (``LoraConfig.target_parameters``, its ``ParamWrapper``): one
rank-r factor pair per expert of each fused tensor. Adapting the same two tensors here is what a peft user
trains and what peft loads without conversion (``jaxcpt.hf.peft_experts``); it also costs one A product
for gate and up instead of two. The B's separate ``2`` axis keeps gate's and up's columns apart whatever
splits the ``mlp`` axis (a [.., 2Fe] axis split over ``tensor`` would give one shard all of gate's columns).

Applied inside the grouped matmul (``moe.grouped_experts``): the token copies sorted by expert go
through two more ``ragged_dot``s with the same group sizes, [N*k, E] -> [N*k, r] -> [N*k, 2, Fe];
nothing of size [X, E, Fe] is formed. Under expert parallelism the adapters are split on ``exp`` like
the experts and travel into the ``shard_map`` beside them (``jaxcpt.model.expert_parallel``): each
device updates its own experts. The router takes no adapter: it is one [E, X] matrix per layer (X
columns), small enough to train whole when wanted (``model.lora.train_router``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# target -> the expert parameters it adapts, in the order of B's part axis
TARGETS = {"expert_gate_up": ("expert_gate", "expert_up"), "expert_down": ("expert_down",)}
RANK_AXIS = "lora_rank"


def adapter_names(target: str) -> tuple[str, str]:
    return f"{target}_lora_a", f"{target}_lora_b"


def shapes(moe, hidden_size: int, num_layers: int, rank: int, targets) -> dict:
    """{adapter name: (shape, logical axes)} of the expert adapters among ``targets``."""
    L, E, X, F = num_layers, hidden_size, moe.num_experts, moe.expert_intermediate_size
    table = {
        "expert_gate_up": (((L, X, E, rank), ("layers", "exp", "embed", RANK_AXIS)),
                           ((L, X, rank, 2, F), ("layers", "exp", RANK_AXIS, None, "mlp"))),
        "expert_down": (((L, X, F, rank), ("layers", "exp", "mlp", RANK_AXIS)),
                        ((L, X, rank, E), ("layers", "exp", RANK_AXIS, "embed"))),
    }
    return {name: entry for t in targets if t in TARGETS for name, entry in zip(adapter_names(t), table[t])}


def check_targets(cfg) -> None:
    """Refuse expert targets (or ``train_router``) on a dense model and dense MLP targets on an MoE model, naming
    the fix. Checked where the adapters are created, on the model's real config (a run from an HF directory or
    a checkpoint validates ``model.lora`` before it knows whether the model has experts), and by
    ``ModelConfig.validate`` when the config says."""
    from jaxcpt.config import ConfigError

    from jaxcpt.model import layer_groups

    lora = cfg.lora
    if cfg.mla is not None:  # before the MoE advice below, which an MLA model could not follow
        raise ConfigError("model.lora is not supported on MLA models (DeepSeek-V3) yet: its latent attention and "
                          "dense/expert layers take no adapters; set model.lora to null (full CPT), or train part of "
                          "the model with optim.trainable")
    if set(lora.targets) & set(TARGETS) and (layer_groups.grouped(cfg) or cfg.linear_layers):
        raise ConfigError("model.lora expert targets (expert_gate_up, expert_down) are supported on MoE models of "
                          "one layer shape without linear-attention layers only (their blocks build their own MLPs); "
                          "drop them from model.lora.targets (the attention projections still take adapters)")
    if cfg.moe is not None and cfg.moe.beside_mlp:  # Gemma 4: gate/up/down adapt the dense MLP beside the experts
        if lora.train_router:
            raise ConfigError("model.lora.train_router is not supported for experts beside a dense MLP (Gemma 4's "
                              "router has its own norm and scales); set model.lora.train_router: false")
        return
    if cfg.moe is not None:
        dense = [t for t in lora.targets if t in ("gate", "up", "down")]
        if dense:
            keep = [t for t in lora.targets if t not in dense] + list(TARGETS)
            raise ConfigError(f"model.lora.targets names {', '.join(dense)} (the default lists gate, up, down), but an "
                              "MoE model has experts instead of a dense MLP; adapt the experts with expert_gate_up and "
                              "expert_down (jaxcpt/model/expert_lora.py), e.g. "
                              f"model.lora.targets=[{', '.join(dict.fromkeys(keep))}]")
        return
    experts = [t for t in lora.targets if t in TARGETS]
    if experts or lora.train_router:
        raise ConfigError(f"model.lora {'targets ' + ', '.join(experts) if experts else 'train_router'} needs an MoE "
                          "model (model.moe), but this model is dense; target its MLP as gate, up, down"
                          + ("" if experts else ", and set train_router off"))


def create(stack, cfg, rngs: nnx.Rngs) -> list[str]:
    """Set the expert adapters of ``cfg.lora`` on the layer stack (A Kaiming-uniform as peft's default, B zero,
    both float32: they train); returns their names (none for a dense model, after ``check_targets``)."""
    check_targets(cfg)
    if cfg.moe is None:
        return []
    names = []
    for name, (shape, axes) in shapes(cfg.moe, cfg.hidden_size, cfg.num_layers, cfg.lora.rank,
                                      cfg.lora.targets).items():
        if name.endswith("_lora_a"):
            bound = 1.0 / math.sqrt(shape[2])  # per expert, fan_in = its input width: peft's Linear(in, r * X) init
            value = jax.random.uniform(rngs.params(), shape, jnp.float32, -bound, bound)
        else:
            value = jnp.zeros(shape, jnp.float32)
        setattr(stack, name, nnx.Param(value, axes=axes))
        names.append(name)
    return names


def layer_adapters(p: dict, lora) -> dict | None:
    """This layer's expert adapters from the block's weights ``p`` (no [L] axis), or None without any."""
    if lora is None:
        return None
    names = [n for t in lora.targets if t in TARGETS for n in adapter_names(t)]
    return {n: p[n] for n in names} or None


def gate_up_update(xs, group_sizes, adapters: dict, scale: float):
    """scale * (xs A) B of each copy's expert: xs [N*k, E] sorted by expert -> (gate, up) updates [N*k, Fe] each,
    or None when gate and up take no adapter."""
    if "expert_gate_up_lora_a" not in adapters:
        return None
    a, b = adapters["expert_gate_up_lora_a"], adapters["expert_gate_up_lora_b"]  # [X, E, r], [X, r, 2, Fe]
    low = jax.lax.ragged_dot(xs, a, group_sizes)  # [N*k, r]
    x_, r, _, f = b.shape
    both = jax.lax.ragged_dot(low, b.reshape(x_, r, 2 * f), group_sizes)  # [N*k, 2 * Fe]
    both = scale * both.reshape(-1, 2, f)  # [N*k, 2, Fe]
    return both[:, 0], both[:, 1]


def down_update(hidden, group_sizes, adapters: dict, scale: float):
    """scale * (hidden A) B of each copy's expert: hidden [N*k, Fe] -> [N*k, E], or None without a down adapter."""
    if "expert_down_lora_a" not in adapters:
        return None
    low = jax.lax.ragged_dot(hidden, adapters["expert_down_lora_a"], group_sizes)  # [N*k, r]
    return scale * jax.lax.ragged_dot(low, adapters["expert_down_lora_b"], group_sizes)  # [N*k, E]


def adapted_by(param: str) -> tuple[str, int] | None:
    """(target, part of B) adapting the expert parameter ``param`` (``expert_up`` -> (expert_gate_up, 1))."""
    for target, params in TARGETS.items():
        if param in params:
            return target, params.index(param)
    return None


def fold(w: jax.Array, a: jax.Array, b: jax.Array, part: int, scale: float) -> jax.Array:
    """W + scale * A @ B[part] in float32 at the highest precision, for any leading axes ([L, X], [X] or one
    expert's []): w [.., in, out], a [.., in, r], b [.., r, out] (down) or [.., r, 2, out] (gate_up)."""
    if b.ndim == a.ndim + 1:
        b = b[..., part, :]  # [.., r, out]
    delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return w.astype(jnp.float32) + scale * delta


def num_params(cfg, active: bool = False) -> int:
    """Parameters of the expert adapters (all layers); ``active``: those of the top_k experts a token uses."""
    if cfg.lora is None or cfg.moe is None:
        return 0
    experts = cfg.moe.top_k if active else cfg.moe.num_experts
    sizes = shapes(cfg.moe, cfg.hidden_size, cfg.num_layers, cfg.lora.rank, cfg.lora.targets)
    return sum(math.prod(shape) for shape, _ in sizes.values()) // cfg.moe.num_experts * experts

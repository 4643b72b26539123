"""LoRA adapters as ordinary parameters of the layer stack (``model.lora``).

A target projection ``W`` [L, *in, *out] (``layers.q`` [L, E, H, D], ``layers.o`` [L, H, D, E] ...)
gets two more parameters beside it,

    layers.{name}_lora_a   [L, *in, r]    logical axes: layers, the input axes of W, lora_rank
    layers.{name}_lora_b   [L, r, *out]   logical axes: layers, lora_rank, the output axes of W

and the block computes ``x W + s (x A) B`` with ``s = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA, Kalajdzievski 2023). A starts as peft's default (Kaiming-uniform: U(-1/sqrt(fan_in),
1/sqrt(fan_in))), B at zero, so step 0 computes exactly the base model. Because A and B carry the
input and output axes of W, the one rule table shards them like W (A split like W's input, B
like its output), and everything that handles parameters handles them unchanged: checkpoints,
resume, re-sharding, the EMA. What trains is ``optim.trainable``: with LoRA on and no
``optim.trainable`` given, only the adapters (and, when asked, the embeddings and norms), so the
frozen base carries no optimizer state and may be stored in bfloat16 (``model.param_dtype``);
the adapters are always float32, because they train.

An MoE model's experts take their own targets, ``expert_gate_up`` and ``expert_down``: one adapter per
expert, stacked on the ``exp`` axis and applied inside the grouped matmul (``jaxcpt.model.expert_lora``).

Why not qwix (Google's quantisation and LoRA library for Flax)? ``qwix.apply_lora_to_model``
intercepts ``dot_general`` / ``einsum`` calls made inside a module's methods and finds the weight
operand among *that module's* ``nnx.Param`` attributes (by identity, by a chain of unary ops back
to the parameter, or by shape). Here the projections are slices of stacked [L, ...] arrays inside
``lax.scan``, multiplied in ``dense``'s custom-VJP matmul after a reshape, so the operand is a
scan-body value that leads back to no parameter of the calling module; all seven projections
live in one ``LayerStack`` module, which qwix's per-module rules cannot tell apart; it creates
the adapters lazily during the first call (not possible inside the scan) and shards them from
the base array's concrete ``NamedSharding`` rather than from logical axes. Rewriting the model
into one module per projection and per layer to suit it would undo the scan (compile time
flat in depth) and the one rule table. What LoRA needs here is small: two parameters per target,
one extra low-rank product in the block, and the fold for the merged export, so we keep it in
jaxcpt, where the export to peft's format (``jaxcpt.hf.peft_export``) has to live anyway.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcpt.config import ConfigError, field
from jaxcpt.model import expert_lora

# Projections that can take an adapter: {name: how many leading dims of W (after [L]) are its input}.
# The lin_* ones are the Gated DeltaNet layers' (hybrid models, jaxcpt.model.gated_deltanet; stacked over those
# layers only): in_proj_qkv, in_proj_z, in_proj_b, in_proj_a and out_proj in transformers' Qwen3.5.
PROJECTIONS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1,
               "lin_qkv": 1, "lin_z": 1, "lin_b": 1, "lin_a": 1, "lin_out": 2}
ATTENTION, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")
LINEAR_ATTENTION = ("lin_qkv", "lin_z", "lin_b", "lin_a", "lin_out")
# transformers' module names -> jaxcpt's, for the error a target spelled the HF way gets
HF_NAMES = {f"{name}_proj": name for name in ATTENTION + MLP} | {
    "in_proj_qkv": "lin_qkv", "in_proj_z": "lin_z", "in_proj_b": "lin_b", "in_proj_a": "lin_a", "out_proj": "lin_out"}
# Gated DeltaNet weights that are not matrices: no low-rank update exists for them (see LoraConfig.validate)
NOT_ADAPTABLE = {
    "lin_conv": "the depthwise convolution (conv1d) has conv_kernel weights per channel and no input-by-output "
                "matrix to factor",
    "conv1d": "the depthwise convolution (conv1d) has conv_kernel weights per channel and no input-by-output "
              "matrix to factor",
}
RANK_AXIS = "lora_rank"
# Expert targets of an MoE model (jaxcpt.model.expert_lora): transformers' fused expert tensors
EXPERTS = tuple(expert_lora.TARGETS)
# names a user may try for the experts -> the target that adapts them, and why (the error of LoraConfig.validate)
EXPERT_HINTS = {
    "expert_gate": "expert_gate_up", "expert_up": "expert_gate_up", "gate_up_proj": "expert_gate_up",
    "experts": "expert_gate_up, expert_down",
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the attention and/or MLP projections; the base model stays frozen."""

    rank: int = field(16, help="rank r of each adapter (A [in, r], B [r, out])")
    alpha: float = field(32.0, help="the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)")
    targets: list[str] = field(
        list(ATTENTION + MLP), help="projections that get an adapter, by jaxcpt parameter name: q, k, v, o "
        "(attention), gate, up, down (MLP); exports name them q_proj ... down_proj. The default, all seven, is "
        "what Biderman et al. 2024 ('LoRA Learns Less and Forgets Less') found best for continued pretraining. A "
        "hybrid (Qwen3.5) adapts q, k, v, o on its attention layers only; its Gated DeltaNet layers take lin_qkv, "
        "lin_z, lin_b, lin_a, lin_out (in_proj_qkv ... out_proj). An MoE model takes q, k, v, o and, per expert, "
        "expert_gate_up (gate and up together, transformers' mlp.experts.gate_up_proj) and expert_down (down_proj) "
        "instead of gate, up, down: list them, e.g. [q, k, v, o, expert_gate_up, expert_down]")
    rslora: bool = field(False, help="scale by alpha / sqrt(rank) (rank-stabilised LoRA) instead of alpha / rank")
    train_embeddings: bool = field(
        False, help="also train the input embedding and output projection (exported as peft modules_to_save); "
        "only when optim.trainable is empty, which otherwise says what trains")
    train_norms: bool = field(False, help="also train every RMSNorm scale (exported as peft modules_to_save); only "
                                          "when optim.trainable is empty")
    train_router: bool = field(
        False, help="MoE models: also train each layer's router whole (and its bias; exported as peft "
        "modules_to_save mlp.gate / mlp.router); off by default, so routing changes only through the adapted "
        "hidden states. Only when optim.trainable is empty")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"rank must be >= 1, got {self.rank}; set e.g. model.lora.rank=16")
        if not self.targets:
            raise ConfigError(f"targets is empty; name projections among {', '.join(PROJECTIONS)}, or "
                              "remove model.lora to train without adapters")
        for target in self.targets:
            if target in EXPERTS:
                continue
            if target in EXPERT_HINTS:
                raise ConfigError(f"targets: '{target}' is not a target; did you mean '{EXPERT_HINTS[target]}'? An MoE "
                                  "model's experts take expert_gate_up (one adapter per expert over gate and up "
                                  "together, as transformers fuses them into mlp.experts.gate_up_proj and peft adapts "
                                  "that tensor) and expert_down (mlp.experts.down_proj)")
            if target in NOT_ADAPTABLE:
                raise ConfigError(f"targets: '{target}' cannot take a LoRA adapter: {NOT_ADAPTABLE[target]}. To "
                                  "train it, train it whole: optim.trainable=[{params: ['layers.*_lora_a', "
                                  "'layers.*_lora_b', 'layers.lin_conv']}]")
            if target not in PROJECTIONS:
                close = [HF_NAMES[target]] if target in HF_NAMES else difflib.get_close_matches(target, list(PROJECTIONS), n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                raise ConfigError(f"targets: unknown projection '{target}'; {hint}targets are jaxcpt's "
                                  f"parameter names: {', '.join(ATTENTION)} (attention), {', '.join(MLP)} (MLP), "
                                  f"{', '.join(LINEAR_ATTENTION)} (Gated DeltaNet layers of a hybrid), "
                                  f"{', '.join(EXPERTS)} (the experts of an MoE model)")
        if len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"targets lists a projection twice: {self.targets}")


def check_targets(lora: LoraConfig, has_linear_layers: bool) -> None:
    """Refuse Gated DeltaNet targets on a model without such layers. Checked where the adapters are created, on the
    model's real config: a run that starts from a checkpoint validates ``model.lora`` before it knows the layers."""
    linear = [t for t in lora.targets if t in LINEAR_ATTENTION]
    if linear and not has_linear_layers:
        raise ConfigError(f"model.lora.targets names {', '.join(linear)}, projections of Gated DeltaNet layers, but "
                          "this model has no linear_attention layers; drop them from the targets")


def adapter_names(target: str) -> tuple[str, str]:
    return f"{target}_lora_a", f"{target}_lora_b"


def matmul_weights(cfg, extra=()) -> frozenset[str]:
    """The block weights that reach ``layers.dense`` only: the projections, their adapters and ``extra``.

    ``layers.dense`` casts these to the compute dtype itself (see ``remat.cast_for_compute``)."""
    names = set(PROJECTIONS) | set(extra)
    for target in (cfg.lora.targets if cfg.lora is not None else ()):
        if target not in EXPERTS:  # expert adapters go to ragged_dot, cast with the experts (cast_for_compute)
            names.update(adapter_names(target))
    return frozenset(names)


def is_adapter(path: str) -> bool:
    """A dotted parameter path (``layers.q_lora_a``) of a LoRA adapter."""
    return path.rsplit(".", 1)[-1].endswith(("_lora_a", "_lora_b"))


def adapter_params(key: jax.Array, base: nnx.Param, target: str, rank: int) -> tuple[nnx.Param, nnx.Param]:
    """(A, B) for the stacked projection ``base`` [L, *in, *out]: A Kaiming-uniform as peft's default, B zero.

    Both are float32 whatever the base's dtype: they train.
    """
    shape, axes = base.get_value().shape, base.get_metadata()["axes"]
    n_in = PROJECTIONS[target]
    layers, inputs, outputs = shape[:1], shape[1 : 1 + n_in], shape[1 + n_in :]
    bound = 1.0 / math.sqrt(math.prod(inputs))  # kaiming_uniform(a=sqrt(5)), torch's nn.Linear init and peft's for A
    a = jax.random.uniform(key, (*layers, *inputs, rank), jnp.float32, -bound, bound)  # [L, *in, r]
    b = jnp.zeros((*layers, rank, *outputs), jnp.float32)  # [L, r, *out]
    a_axes = (axes[0], *axes[1 : 1 + n_in], RANK_AXIS)
    b_axes = (axes[0], RANK_AXIS, *axes[1 + n_in :])
    return nnx.Param(a, axes=a_axes), nnx.Param(b, axes=b_axes)


def fold(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale * A @ B in float32: w [*lead, *in, *out], a [*lead, *in, r], b [*lead, r, *out].

    ``lead`` is [L] for a stacked parameter or nothing for one layer's slice. Computed at the
    highest precision (TPUs multiply float32 in bf16 passes by default), so the merged export
    equals the adapter applied in float32.
    """
    lead = a.ndim + b.ndim - 2 - w.ndim
    rank = a.shape[-1]
    a2 = a.astype(jnp.float32).reshape(*a.shape[:lead], -1, rank)  # [*lead, in, r]
    b2 = b.astype(jnp.float32).reshape(*b.shape[:lead], rank, -1)  # [*lead, r, out]
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [*lead, in, out]
    return w.astype(jnp.float32) + scale * delta.reshape(w.shape)


def default_trainable(lora: LoraConfig | None, param_paths) -> list:
    """``optim.trainable`` when none is given: [] (everything) without LoRA, else the adapters and the
    embeddings / norms the LoRA config selects."""
    from jaxcpt.optim.trainable import TrainablePhase

    if lora is None:
        return []
    patterns = ["layers.*_lora_a", "layers.*_lora_b"]
    if lora.train_embeddings:
        patterns += [p for p in ("embedding", "lm_head") if p in param_paths]  # no lm_head when tied
    if lora.train_norms:
        patterns += ["final_norm", "layers.*norm"]
    if lora.train_router:  # MoE: the router (and gpt-oss's router bias) whole
        patterns += [p for p in ("layers.router", "layers.router_bias") if p in param_paths]
    return [TrainablePhase(params=patterns)]

"""Parameter names and layouts: jaxcpt <-> Hugging Face decoder checkpoints.

HF stores each layer's weights separately, as torch Linear matrices [out, in];
jaxcpt stacks layers on a leading axis and keeps heads as their own axis:

    HF  model.layers.{i}.self_attn.q_proj.weight  [H*D, E]
    jax layers.q                                   [L, E, H, D]

Each ``Tensor`` row says how one HF tensor of one layer becomes one slice of a jaxcpt
parameter and back; both directions are exact reshapes/transposes (and, for the
vocabulary tables, zero rows appended or dropped), so a round trip is bit-identical.
``decoder_tensors`` builds the table every family shares; a family only names its norms.

The two vocabulary tables (embedding, untied lm_head) also say which jaxcpt axis is the
(padded) vocabulary and how a block of HF rows maps to a block along it, so import and
export can move them a vocabulary block at a time (``jaxcpt.hf.tensor_io``): whole, each is
the largest tensor of a model (Llama-3-8B: 128256 x 4096, 2 GiB in float32).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
    path: tuple[str, ...]  # jaxcpt state path, e.g. ('layers', 'q')
    hf_name: str  # HF name; '{i}' is the layer index for stacked parameters
    to_jax: Callable[[np.ndarray], np.ndarray]  # HF layout -> one jaxcpt slice
    to_hf: Callable[[np.ndarray], np.ndarray]  # one jaxcpt slice -> HF layout
    hf_shape: tuple[int, ...]  # shape of the HF tensor (one layer)
    # Vocabulary tables only: the jaxcpt axis of the padded vocabulary (HF's is always axis 0),
    # and HF rows [n, E] <-> the jaxcpt block of those n vocabulary entries (no padding involved).
    vocab_axis: int | None = None
    rows_to_jax: Callable[[np.ndarray], np.ndarray] | None = None
    rows_to_hf: Callable[[np.ndarray], np.ndarray] | None = None
    # MoE experts: HF keeps one tensor per expert ('{j}' in hf_name); jaxcpt stacks them on the
    # axis after [L], so to_jax / to_hf map one expert's tensor <-> one [E, F]-like slice.
    experts: int = 0
    # Stacked rows of a hybrid model's sub-stack (attention or linear-attention weights): the HF layer
    # number of each stack index; None: stack index = layer number (every layer has the tensor).
    layers: tuple[int, ...] | None = None
    # One share of an HF tensor that holds several jaxcpt parameters (gpt-oss's gate_up_proj: gate and up
    # interleaved): ``parts`` lists the paths of all of them. Import reads each share with its own row's to_jax;
    # export writes the tensor once, from the row of parts[0]: join(layer slices of every part, in parts order).
    parts: tuple[tuple[str, ...], ...] = ()
    join: Callable[..., np.ndarray] | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    def stack_size(self, num_layers: int) -> int:
        return num_layers if self.layers is None else len(self.layers)

    def layer_of(self, index: int) -> int:
        """The HF layer number of stack index ``index``."""
        return index if self.layers is None else self.layers[index]

    def name_at(self, index: int) -> str:
        """The HF name of stack index ``index``."""
        return self.hf_name.format(i=self.layer_of(index))


def _same(x):
    return x


def _t(x):
    return np.ascontiguousarray(x.T)


# The norms every decoder has, as (jaxcpt leaf, HF name inside model.layers.{i}.). Families
# with more norms (Gemma) or other names pass their own list.
LLAMA_NORMS = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
QK_NORMS = (("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm"))


def decoder_tensors(cfg: ModelConfig, norms=LLAMA_NORMS, experts: "ExpertNames | None" = None) -> list[Tensor]:
    """Every parameter of a model with config ``cfg``, in the order HF checkpoints list them.

    ``experts``: the family's MoE tensor names, for a model with ``cfg.moe``.

    ``norms``: (jaxcpt leaf, HF name) of the per-layer norm weights; q/k norms (``cfg.qk_norm``)
    and biases come from the config.
    """
    E, H, K, D, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.intermediate_size
    V, padded = cfg.vocab_size, cfg.padded_vocab_size

    def proj_in(heads):  # HF [heads*D, E] <-> jax [E, heads, D]
        return (lambda w: np.ascontiguousarray(w.T.reshape(E, heads, D)),
                lambda w: np.ascontiguousarray(w.reshape(E, heads * D).T))

    def bias(heads):  # HF [heads*D] <-> jax [heads, D]
        return (lambda b: b.reshape(heads, D), lambda b: b.reshape(heads * D))

    def pad_rows(w):  # HF [V, E] -> [Vp, E], zero rows appended
        return np.pad(w, ((0, padded - V), (0, 0)))

    pre = "model.layers.{i}."
    attention = None if not cfg.linear_layers else cfg.attention_layers  # a hybrid's attention layers
    rows = [Tensor(("embedding",), "model.embed_tokens.weight", pad_rows, lambda w: np.ascontiguousarray(w[:V]), (V, E),
                   vocab_axis=0, rows_to_jax=_same, rows_to_hf=_same)]
    for leaf, hf in norms:
        rows.append(Tensor(("layers", leaf), pre + f"{hf}.weight", _same, _same, (E,)))
    q_heads = 2 * H if cfg.attn_output_gate else H  # Qwen3.5's q_proj: per head D query rows, then D gate rows
    for name, heads in (("q", q_heads), ("k", K), ("v", K)):
        to_jax, to_hf = proj_in(heads)
        rows.append(Tensor(("layers", name), pre + f"self_attn.{name}_proj.weight", to_jax, to_hf, (heads * D, E),
                           layers=attention))
        if cfg.qkv_bias:
            to_jax, to_hf = bias(heads)
            rows.append(Tensor(("layers", f"{name}_bias"), pre + f"self_attn.{name}_proj.bias", to_jax, to_hf,
                               (heads * D,), layers=attention))
    if cfg.qk_norm and cfg.qk_norm_scope == "projection":  # HF [heads*D] <-> jax [heads, D]
        rows += [Tensor(("layers", leaf), pre + f"{hf}.weight", *bias(heads), (heads * D,), layers=attention)
                 for (leaf, hf), heads in zip(QK_NORMS, (H, K))]
    elif cfg.qk_norm:
        rows += [Tensor(("layers", leaf), pre + f"{hf}.weight", _same, _same, (D,), layers=attention)
                 for leaf, hf in QK_NORMS]
    # o_proj: HF [E, H*D] <-> jax [H, D, E]
    rows.append(Tensor(("layers", "o"), pre + "self_attn.o_proj.weight",
                       lambda w: np.ascontiguousarray(w.T.reshape(H, D, E)),
                       lambda w: np.ascontiguousarray(w.reshape(H * D, E).T), (E, H * D), layers=attention))
    if cfg.o_bias:
        rows.append(Tensor(("layers", "o_bias"), pre + "self_attn.o_proj.bias", _same, _same, (E,), layers=attention))
    if cfg.attention_sinks:  # gpt-oss: one logit per query head
        rows.append(Tensor(("layers", "sinks"), pre + "self_attn.sinks", _same, _same, (H,), layers=attention))
    if cfg.moe is not None and cfg.moe.beside_mlp:  # only gemma4_text's own table holds them
        raise HFFormatError(f"family '{cfg.family}' has no experts beside the dense MLP (model.moe.beside_mlp, Gemma 4's "
                            "MoE block); export it as model.family=gemma4_text, or set beside_mlp off")
    if cfg.moe is not None:  # a family whose checkpoints fuse the experts gives a function of cfg instead of names
        rows += experts(cfg) if callable(experts) else moe_tensors(cfg, experts)
    for name, shape in (("gate", (F, E)), ("up", (F, E)), ("down", (E, F))) if cfg.moe is None else ():
        rows.append(Tensor(("layers", name), pre + f"mlp.{name}_proj.weight", _t, _t, shape))
        if cfg.mlp_bias:
            rows.append(Tensor(("layers", f"{name}_bias"), pre + f"mlp.{name}_proj.bias", _same, _same, (shape[0],)))
    rows.append(Tensor(("final_norm",), "model.norm.weight", _same, _same, (E,)))
    if not cfg.tie_word_embeddings:  # HF [V, E] <-> jax [E, Vp]
        rows.append(Tensor(("lm_head",), "lm_head.weight", lambda w: _t(pad_rows(w)), lambda w: _t(w[:, :V]), (V, E),
                           vocab_axis=1, rows_to_jax=_t, rows_to_hf=_t))
    return rows


@dataclasses.dataclass(frozen=True)
class ExpertNames:
    """An MoE family's names inside model.layers.{i}.: the router and one expert's three projections ('{j}')."""

    router: str  # e.g. 'mlp.gate.weight', HF [X, E]
    gate: str  # e.g. 'mlp.experts.{j}.gate_proj.weight', HF [F, E]
    up: str
    down: str  # HF [E, F]


def moe_tensors(cfg: ModelConfig, names: ExpertNames | None) -> list[Tensor]:
    """The router and per-expert rows of an MoE model: HF one torch Linear per expert, jaxcpt [L, X, in, out]."""
    if names is None:
        raise ValueError(f"family '{cfg.family}' declares no MoE tensor names, but the model config has moe set")
    moe = cfg.moe
    if moe.router_bias or moe.expert_bias or moe.swiglu_limit is not None:
        raise HFFormatError(f"family '{cfg.family}' has no router or expert biases and no clamped SwiGLU "
                            "(model.moe.router_bias, expert_bias, swiglu_limit: gpt-oss's); set them off, or use "
                            "family gpt_oss")
    E, X, F = cfg.hidden_size, cfg.moe.num_experts, cfg.moe.expert_intermediate_size
    pre = "model.layers.{i}."
    rows = [Tensor(("layers", "router"), pre + names.router, _t, _t, (X, E))]
    for leaf, hf, shape in (("expert_gate", names.gate, (F, E)), ("expert_up", names.up, (F, E)),
                            ("expert_down", names.down, (E, F))):
        rows.append(Tensor(("layers", leaf), pre + hf, _t, _t, shape, experts=X))
    return rows


def hf_names(row: Tensor, num_layers: int) -> list[str]:
    if row.experts:
        return [row.hf_name.format(i=row.layer_of(i), j=j) for i in range(row.stack_size(num_layers))
                for j in range(row.experts)]
    return [row.name_at(i) for i in range(row.stack_size(num_layers))] if row.stacked else [row.hf_name]

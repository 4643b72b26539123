"""Dense-to-MoE upcycling (Komatsuzaki et al. 2023): a dense HF model becomes an MoE model of the same function.

Every MLP becomes a sparse block of experts that are copies of it, plus a router. The MoE
families transformers ships all weigh the chosen experts with a softmax over the router
logits restricted to the top k and renormalised to sum to one (Mixtral always; Qwen2-MoE
and Qwen3-MoE with ``norm_topk_prob: true``, which we set). Over identical experts E = MLP::

    moe(x) = sum_{e in topk(x)} w_e(x) * MLP(x) = MLP(x) * sum_e w_e(x) = MLP(x)

whatever the router, so the router starts random (seeded, std ``initializer_range``) and the
model still computes the dense function, up to float rounding of sum_e w_e = 1.

Granular upcycling (``split`` G > 1): each of the ``experts`` copies is cut into G experts,
each holding a 1/G slice of the intermediate dimension (MLP(x) = sum_s down_s(act(gate_s x) *
up_s x) exactly), and top-k is scaled to ``top_k * G``, so the active parameters per token
stay those of the unsplit model. Fine expert f = copy * G + slice holds slice f mod G of copy
f // G, with its down projection multiplied by G, and the G experts of one copy share one
(random) router row. Their logits are then equal, so the top ``top_k * G`` experts are the G
experts of each of the ``top_k`` best copies, each copy's experts weigh the same w_c / G, and::

    moe(x) = sum_{c in top copies} (w_c / G) * sum_s G * slice_s(x) = sum_c w_c * MLP(x) = MLP(x)

whatever the router's values: the function is preserved, and nothing depends on how top-k breaks
ties (torch.topk does not promise an order among equal values: over six equal logits it returns
indices 3 and 5). The conditions, exactly:

- no ``noise``;
- a non-zero router. A zero router ties every logit, and the function is then kept only when
  top-k breaks ties by whole copies (``jax.lax.top_k`` takes the lowest indices, copies
  0..top_k-1, so it does; torch's does not promise it), so it is recorded as not preserved;
- the logits of two different copies are not exactly equal at the top-k boundary for a token
  (probability ~0 in float32; in bfloat16 two logits can round to the same value, and for that
  token the top-k may split a copy);
- the x G scale is exact in the storage dtype when G is a power of two (otherwise it rounds once).

Router rows shared within a copy move apart from the first step: the slices' outputs differ, so
their gradients do. ``noise`` (Drop-Upcycling's point, Nakamura et al. 2025: identical experts
learn alike) adds Gaussian noise of ``noise`` times each tensor's std to every expert copy, which
breaks the exact start on purpose. What was done, and whether the function is preserved, is
recorded in ``jaxcpt_adaptation.json`` under ``moe``.

Targets, chosen so that every non-MLP tensor carries over unchanged:

- Llama, Mistral -> Mixtral (no attention or MLP biases: a Llama with ``attention_bias`` or
  ``mlp_bias`` is refused; Mistral's sliding window carries over).
- Qwen3 -> Qwen3-MoE (same attention: QK-norm, optional biases).
- Qwen2 -> Qwen2-MoE, not Qwen3-MoE: Qwen3-MoE normalises q and k per head (QK-norm), which no
  weight setting turns into the identity, so a Qwen2 model cannot keep its function there.
  Qwen2-MoE has Qwen2's q/k/v biases; its shared expert (always present) starts as a copy of
  slice 0 with a zero down projection and a zero gate, so it adds exactly zero.

Weights are streamed: one dense tensor (or one layer's MLP) in host memory at a time, written
in the layout transformers' ``save_pretrained`` writes (per-expert tensors, ``experts.{e}.*``;
transformers 5 fuses them into 3-D parameters when it loads).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from jaxcpt.errors import UserError

# Dense model_type -> MoE model_type whose attention, norms and embeddings match it exactly.
MOE_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen3": "qwen3_moe", "qwen2": "qwen2_moe"}
ALREADY_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "qwen3_next", "phimoe")

# The dense MLP tensors every source family names alike.
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
# Where each target keeps the router and the experts' (gate, up, down) projections.
_ROUTER = {"mixtral": "model.layers.{i}.block_sparse_moe.gate.weight",
           "qwen3_moe": "model.layers.{i}.mlp.gate.weight", "qwen2_moe": "model.layers.{i}.mlp.gate.weight"}
_EXPERT = {"mixtral": ("model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
                       "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
                       "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
           "qwen3_moe": tuple(f"model.layers.{{i}}.mlp.experts.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
           "qwen2_moe": tuple(f"model.layers.{{i}}.mlp.experts.{{e}}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))}
_SHARED = tuple(f"model.layers.{{i}}.mlp.shared_expert.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj"))
_SHARED_GATE = "model.layers.{i}.mlp.shared_expert_gate.weight"

# The jaxcpt parameter path the MoE families give the router stack [L, E, H]; optim.trainable globs match it
# (``{params: ["layers.router"], steps: N}`` trains the routers first).
ROUTER_PARAM = "layers.router"


@dataclasses.dataclass(frozen=True)
class UpcyclePlan:
    """What the upcycled model will be; derived from the dense config.json and the options, validated."""

    source_type: str  # dense model_type
    target_type: str  # MoE model_type
    num_layers: int
    hidden: int
    dense_intermediate: int
    experts: int  # copies of the dense MLP
    top_k: int  # of the copies
    split: int  # G: slices per copy
    router_std: float  # std of the router's initial weights (0: zero router)
    noise: float  # relative std of the noise added to each expert copy
    seed: int

    @property
    def num_experts(self) -> int:  # fine experts
        return self.experts * self.split

    @property
    def experts_per_token(self) -> int:
        return self.top_k * self.split

    @property
    def expert_intermediate(self) -> int:
        return self.dense_intermediate // self.split

    def preservation(self) -> tuple[bool, str]:
        """(does the upcycled model compute the dense function at step 0, why / why not)."""
        if self.noise > 0:
            return False, f"noise {self.noise} was added to the expert copies"
        if self.split == 1:
            return True, ("every expert is a copy of the dense MLP and the top-k weights are renormalised to sum to 1, "
                          "so the router does not change the output")
        if self.router_std == 0:
            return False, ("a zero router ties every logit: the 1/G slices are summed whole only if top-k breaks ties by "
                           "whole copies (jax.lax.top_k does, torch.topk does not promise it)")
        exact_scale = self.split & (self.split - 1) == 0
        return True, (f"the {self.split} experts of each copy share one router row, so top-{self.experts_per_token} "
                      f"takes whole copies and weighs their slices alike; down projections are scaled by {self.split}"
                      + ("" if exact_scale else " (not a power of two: rounded once, ~1 ulp)"))


def plan_upcycle(dense: dict, *, experts: int, top_k: int, split: int = 1, noise: float = 0.0,
                 router_std: float | None = None, seed: int = 0) -> UpcyclePlan:
    """Validate the options against the dense config.json; errors name the thing and the fix."""
    model_type = dense.get("model_type")
    if model_type in ALREADY_MOE:
        raise UserError(f"the model is already a mixture of experts ({model_type}); upcycle takes a dense model")
    if model_type not in MOE_TARGET:
        known = ", ".join(f"{d} -> {m}" for d, m in MOE_TARGET.items())
        raise UserError(f"model_type '{model_type}' has no MoE counterpart that keeps its function ({known}); "
                        "upcycle one of those families")
    if experts < 2:
        raise UserError(f"--experts must be >= 2 (one expert is the dense model), got {experts}")
    if not 1 <= top_k <= experts:
        raise UserError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    if split < 1:
        raise UserError(f"--split must be >= 1, got {split}")
    intermediate = int(dense["intermediate_size"])
    if intermediate % split:
        raise UserError(f"--split {split} does not divide the MLP's intermediate size {intermediate}; "
                        f"choose a divisor of it")
    if noise < 0 or (router_std is not None and router_std < 0):
        raise UserError("--noise and --router-std must be >= 0")
    if model_type == "llama" and (dense.get("attention_bias") or dense.get("mlp_bias")):
        raise UserError("this Llama has attention_bias/mlp_bias, which Mixtral lacks: its function cannot be kept. "
                        "No transformers MoE family matches it")
    if model_type == "qwen3" and dense.get("use_sliding_window"):
        raise UserError("this Qwen3 uses per-layer sliding windows (use_sliding_window), which Qwen3-MoE lacks; "
                        "set use_sliding_window false in its config.json if it was never used, or keep it dense")
    if dense.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act '{dense.get('hidden_act')}': the MoE families' experts use silu")
    if router_std is None:  # random: breaks the symmetry between copies, and keeps the function (module docstring)
        router_std = float(dense.get("initializer_range", 0.02))
    return UpcyclePlan(model_type, MOE_TARGET[model_type], int(dense["num_hidden_layers"]), int(dense["hidden_size"]),
                       intermediate, experts, top_k, split, float(router_std), float(noise), seed)


def moe_config(dense: dict, plan: UpcyclePlan) -> dict:
    """The target's config.json: the dense one (attention, rope, norms, vocabulary kept) plus the MoE fields."""
    cfg = {k: v for k, v in dense.items() if k not in ("architectures", "model_type", "mlp_bias", "pretraining_tp")}
    arch = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
    cfg.update(model_type=plan.target_type, architectures=[arch[plan.target_type]],
               num_experts_per_tok=plan.experts_per_token, output_router_logits=False)
    if plan.target_type == "mixtral":
        cfg.update(num_local_experts=plan.num_experts, intermediate_size=plan.expert_intermediate,
                   router_jitter_noise=0.0, router_aux_loss_coef=dense.get("router_aux_loss_coef", 0.001))
        cfg.pop("attention_bias", None)
    else:  # Qwen: experts use moe_intermediate_size; intermediate_size is kept for the (unused) dense layers
        cfg.update(num_experts=plan.num_experts, moe_intermediate_size=plan.expert_intermediate,
                   norm_topk_prob=True,  # renormalised top-k: what makes identical experts the dense MLP
                   decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001)
    if plan.target_type == "qwen2_moe":
        cfg.update(qkv_bias=True, shared_expert_intermediate_size=plan.expert_intermediate)
    return cfg


def _dense_mlp_names(weight_map: dict[str, str], num_layers: int) -> None:
    for i in range(num_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if f"model.layers.{i}.mlp.{proj}.weight" not in weight_map:
                raise UserError(f"'model.layers.{i}.mlp.{proj}.weight' is missing from the checkpoint; upcycle needs "
                                "a gated MLP (gate/up/down) in every layer")
    biases = [n for n in weight_map if re.match(r"^model\.layers\.\d+\.mlp\..*\.bias$", n)]
    if biases:
        raise UserError(f"the dense MLP has biases ('{biases[0]}'), which the MoE experts lack; cannot keep the function")


def output_tensors(weight_map: dict[str, str], shapes, plan: UpcyclePlan) -> list[tuple[str, tuple[int, ...], tuple]]:
    """(name, shape, how to make it) of every output tensor, in file order: each layer's MoE block where its MLP was."""
    out, done = [], set()
    inter, hidden = plan.expert_intermediate, plan.hidden
    for name in sorted(weight_map, key=_natural):
        match = _DENSE_MLP.match(name)
        if not match:
            out.append((name, shapes(name), ("copy", name)))
            continue
        layer = int(match[1])
        if layer in done:
            continue
        done.add(layer)
        out.append((_ROUTER[plan.target_type].format(i=layer), (plan.num_experts, hidden), ("router", layer)))
        for e in range(plan.num_experts):
            for proj, template in zip(("gate", "up", "down"), _EXPERT[plan.target_type]):
                shape = (hidden, inter) if proj == "down" else (inter, hidden)
                out.append((template.format(i=layer, e=e), shape, ("expert", layer, e, proj)))
        if plan.target_type == "qwen2_moe":
            for proj, template in zip(("gate", "up", "down"), _SHARED):
                shape = (hidden, inter) if proj == "down" else (inter, hidden)
                out.append((template.format(i=layer), shape, ("shared", layer, proj)))
            out.append((_SHARED_GATE.format(i=layer), (1, hidden), ("zeros",)))
    return out


def _natural(name: str) -> tuple:
    """Sort key that orders layer 2 before layer 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def expert_slice(mlp: dict[str, np.ndarray], proj: str, piece: int, split: int) -> np.ndarray:
    """Slice ``piece`` of G of one dense projection, float32: gate/up [I/G, H] rows, down [H, I/G] columns x G."""
    weight = mlp[proj].astype(np.float32)
    size = weight.shape[1 if proj == "down" else 0] // split
    if proj == "down":
        return weight[:, piece * size:(piece + 1) * size] * np.float32(split)  # [H, I/G]
    return weight[piece * size:(piece + 1) * size]  # [I/G, H]


def tensors(reader, plan: UpcyclePlan, order, np_dtype) -> Iterator[tuple[str, np.ndarray]]:
    """The output tensors in ``order``, in the storage dtype; host memory holds one layer's dense MLP at a time."""
    mlp_layer, mlp = None, {}
    for name, shape, (kind, *what) in order:
        if kind == "copy":
            value = reader.get(name)
        elif kind == "zeros":
            value = np.zeros(shape, np.float32)
        elif kind == "router":  # [E, H]: one row per copy [copies, H], repeated for its G slices; seeded per layer
            rng = np.random.default_rng([plan.seed, what[0], 0])
            rows = rng.normal(0.0, plan.router_std, (plan.experts, shape[1])).astype(np.float32)
            value = np.repeat(rows, plan.split, axis=0)  # [copies * G, H]; expert f = copy f // G
        else:
            layer = what[0]
            if layer != mlp_layer:
                mlp_layer = layer
                mlp = {p: reader.get(f"model.layers.{layer}.mlp.{p}_proj.weight") for p in ("gate", "up", "down")}
            if kind == "shared":  # Qwen2-MoE's shared expert adds zero: its down projection is zero
                proj = what[1]
                value = np.zeros(shape, np.float32) if proj == "down" else expert_slice(mlp, proj, 0, plan.split)
            else:
                expert, proj = what[1], what[2]
                value = expert_slice(mlp, proj, expert % plan.split, plan.split)
                if plan.noise > 0:  # seeded per (layer, expert, projection)
                    rng = np.random.default_rng([plan.seed, layer, 1 + expert, ("gate", "up", "down").index(proj)])
                    value = value + rng.normal(0.0, plan.noise * float(np.std(value)), value.shape).astype(np.float32)
        if tuple(value.shape) != tuple(shape):
            raise AssertionError(f"'{name}': made {value.shape}, planned {shape}")
        yield name, np.asarray(value).astype(np_dtype, copy=False)  # a copied tensor in its own dtype: no second copy


def upcycle(source: str | Path, out: str | Path, *, experts: int, top_k: int, split: int = 1, noise: float = 0.0,
            router_std: float | None = None, seed: int = 0, max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False) -> tuple[Path, UpcyclePlan]:
    """Write the upcycled HF directory ``out`` (atomically: all of it or nothing); returns it and the plan."""
    from jaxcpt.adapt import metadata
    from jaxcpt.adapt.model_io import hf_weights_dtype
    from jaxcpt.hf.convert import NUMPY_DTYPES, copy_companion_files
    from jaxcpt.hf.tensor_io import SafetensorsReader
    from jaxcpt.merge.writer import ShardedWriter, atomic_directory

    source = Path(source)
    if not (source / "config.json").is_file():
        raise UserError(f"'{source}' has no config.json; upcycle takes a Hugging Face model directory "
                        "(export a jaxcpt run first with jaxcpt export-hf)")
    dense = json.loads((source / "config.json").read_text())
    plan = plan_upcycle(dense, experts=experts, top_k=top_k, split=split, noise=noise, router_std=router_std, seed=seed)
    reader = SafetensorsReader(source)
    _dense_mlp_names(reader.weight_map, plan.num_layers)
    dtype = hf_weights_dtype(source)
    order = output_tensors(reader.weight_map, reader.shape, plan)
    previous = metadata.read_adaptation(source)
    with atomic_directory(Path(out), overwrite) as tmp:
        copy_companion_files(source, tmp)  # tokenizer, generation config (and an old adaptation record, replaced below)
        writer = ShardedWriter(tmp, [(name, shape) for name, shape, _ in order], dtype, max_shard_bytes)
        for name, value in tensors(reader, plan, order, NUMPY_DTYPES[dtype]):
            writer.write(name, value)
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(moe_config(dense, plan), indent=2) + "\n")
        metadata.write_adaptation(tmp, adaptation_record(previous, plan, source=str(source.resolve()),
                                                         vocab_size=int(dense["vocab_size"])))
    return Path(out), plan


def adaptation_record(previous: dict | None, plan: UpcyclePlan, *, source: str, vocab_size: int) -> dict:
    """``jaxcpt_adaptation.json`` after upcycling: earlier steps carried forward, ``moe`` describing this one."""
    from jaxcpt.adapt.metadata import FORMAT

    record = dict(previous) if previous else {"format": FORMAT, "base": source, "vocab_size": vocab_size,
                                              "num_layers": plan.num_layers, "new_token_ids": None,
                                              "inserted_layers": [], "history": []}
    preserved, why = plan.preservation()
    moe = {"family": plan.target_type, "num_experts": plan.num_experts, "experts_per_token": plan.experts_per_token,
           "copies": plan.experts, "copies_per_token": plan.top_k, "split": plan.split,
           "expert_intermediate_size": plan.expert_intermediate, "router_std": plan.router_std, "noise": plan.noise,
           "seed": plan.seed, "function_preserved": preserved, "why": why,
           # Each fine expert f holds slice f % split of copy f // split of the dense MLP.
           "expert_slice": [f % plan.split for f in range(plan.num_experts)],
           # New parameters (the routers, and Qwen2-MoE's shared expert) and the pattern that trains them first.
           "router_param": ROUTER_PARAM, "router_hf_name": _ROUTER[plan.target_type]}
    record.update(num_layers=plan.num_layers, moe=moe)
    step = {"operation": "upcycle", "source": source, "from": plan.source_type, **moe}
    record["history"] = list(record.get("history", [])) + [step]
    return record

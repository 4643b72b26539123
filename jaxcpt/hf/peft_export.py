"""A LoRA model's adapters as a PEFT adapter directory, which ``PeftModel.from_pretrained(base, DIR)`` loads.

    adapter_config.json          peft's LoraConfig: r, lora_alpha, use_rslora, target_modules (q_proj ...),
                                 modules_to_save, base_model_name_or_path, task_type CAUSAL_LM
    adapter_model.safetensors    base_model.model.{module}.lora_A.weight [r, in] and .lora_B.weight [out, r]
                                 for every target of every layer, and the whole tensors of modules_to_save
                                 (base_model.model.{HF tensor name})

Names and layouts come from the family's tensor table (``jaxcpt.hf.mapping``), so they are the
HF module names the merged export uses: ``layers.q_lora_a`` [L, E, r] of ``layers.q``
(HF ``model.layers.{i}.self_attn.q_proj.weight`` [H*D, E]) becomes
``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`` [r, E], and
``layers.q_lora_b`` [L, r, H, D] becomes its ``lora_B.weight`` [H*D, r] (heads major, as
q_proj's rows). peft computes ``base(x) + scale * lora_B(lora_A(x))``, jaxcpt's block the same.

Parameters other than adapters that trained (``optim.trainable``, e.g. ``model.lora.train_embeddings``)
go into ``modules_to_save``, whole (also when only some rows trained). peft matches those names as
suffixes of module paths, so they are written as the path after ``model.layers.{i}.`` (``input_layernorm``,
``self_attn.q_norm``) or the full path (``model.embed_tokens``, ``model.norm``, ``lm_head``). A tied
embedding sets ``ensure_weight_tying``, so peft ties the output projection to the saved embedding
and saves it as ``lm_head.weight`` too, as peft itself does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcpt.errors import UserError
from jaxcpt.hf.convert import NUMPY_DTYPES, StagedExport, copy_companion_files, to_host, value_at
from jaxcpt.hf.families import tensor_table
from jaxcpt.hf import peft_experts
from jaxcpt.hf.mapping import Tensor
from jaxcpt.model import expert_lora, layer_groups
from jaxcpt.model import lora as lora_lib
from jaxcpt.model.transformer import Transformer

ROUTER, ROUTER_BIAS = ("layers", "router"), ("layers", "router_bias")  # an MoE model's routers (model.lora.train_router)
PREFIX = "base_model.model."  # where PeftModel keeps the transformers model
ADAPTER_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"


def _module(row: Tensor) -> str:
    """The HF module of a tensor row: model.layers.{i}.self_attn.q_proj.weight -> model.layers.{i}.self_attn.q_proj."""
    return row.hf_name.removesuffix(".weight")


def _save_name(row: Tensor) -> str:
    """The modules_to_save entry of a row: peft matches it as a suffix of the module's path."""
    return _module(row).split("{i}.", 1)[-1]


def adapter_config(model: Transformer, base_model_name_or_path: str | None, modules_to_save: list[str],
                   tie: bool) -> dict:
    """The adapter_config.json fields, as peft's ``LoraConfig`` reads them."""
    lora = model.config.lora
    table = {row.path: row for row in tensor_table(model.config)}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "use_rslora": lora.rslora,
        "target_modules": sorted(_module(table[("layers", layer_groups.adapted_stacks(model.config, t)[0])])
                                 .rsplit(".", 1)[-1] for t in lora.targets if t not in expert_lora.TARGETS),
        "target_parameters": peft_experts.target_parameters(model.config) or None,  # MoE experts (peft_experts)
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save or None,
        "ensure_weight_tying": tie,
        "inference_mode": True,
    }


def save_peft_adapter(model: Transformer, path: str | os.PathLike, *, base_model_name_or_path: str | None,
                      trained: tuple[str, ...] = (), dtype: str = "bfloat16", overwrite: bool = False,
                      tokenizer_dir: str | None = None) -> Path | None:
    """Write ``model``'s adapters (and the trained non-adapter tensors ``trained``, dotted parameter paths)
    as a PEFT LoRA directory. Every process must call this; only process 0 writes.

    ``base_model_name_or_path``: the HF directory the adapter applies to (written into the config;
    peft loads the base from it when given only the adapter directory). The tokenizer files of
    ``tokenizer_dir`` (if given) are copied beside the adapter, as peft's own saves do.
    """
    cfg = model.config
    if cfg.lora is None:
        raise UserError("this model has no LoRA adapters (model.lora is null); export it as an HF directory instead")
    if dtype not in NUMPY_DTYPES:
        raise UserError(f"export dtype '{dtype}' is not one of {', '.join(NUMPY_DTYPES)}")
    rows = tensor_table(cfg)
    by_path = {row.path: row for row in rows}
    for row in rows:  # before anything is staged: a refusal writes nothing
        if ".".join(row.path) in trained and row.path in (ROUTER, ROUTER_BIAS) and \
                cfg.family not in peft_experts.ROUTER_MODULE:
            raise UserError(f"'{'.'.join(row.path)}' (the router) trained, but jaxcpt writes a trained router into a "
                            f"peft adapter only for {', '.join(sorted(peft_experts.ROUTER_MODULE))}, not {cfg.family}; "
                            "export the merged model instead (export.lora=merged, or jaxcpt export-hf RUN --lora merged)")
        if ".".join(row.path) in trained and not row.hf_name.endswith(".weight") and row.path != ROUTER_BIAS:
            raise UserError(
                f"'{'.'.join(row.path)}' trained, but its HF tensor '{row.hf_name}' is a parameter of the module "
                f"'{row.hf_name.rsplit('.', 1)[0]}', not a module of its own, and peft's modules_to_save holds whole "
                "modules; export the merged model instead (export.lora=merged, or jaxcpt export-hf RUN --lora merged)")
    state = nnx.state(model)
    staged = StagedExport(path, overwrite)
    tensors: dict[str, np.ndarray] = {}

    def host(value) -> np.ndarray:  # a gather on every process; the array on process 0
        return to_host(value.astype(jnp.dtype(dtype)))

    for target in [t for t in cfg.lora.targets if t in expert_lora.TARGETS]:  # MoE experts: peft's target_parameters
        a_all, b_all = (state["layers"][name][...] for name in expert_lora.adapter_names(target))
        for layer in range(a_all.shape[0]):
            for name, value in peft_experts.layer_tensors(cfg, target, layer, host(a_all[layer]),
                                                          host(b_all[layer])).items():
                tensors[PREFIX + name] = value
    for target in [s for t in cfg.lora.targets if t not in expert_lora.TARGETS
                   for s in layer_groups.adapted_stacks(cfg, t)]:  # Gemma 4: per shape
        module = _module(by_path[("layers", target)])
        a_all, b_all = (state["layers"][name][...] for name in lora_lib.adapter_names(target))
        row = by_path[("layers", target)]
        for layer in range(a_all.shape[0]):  # stack index: a hybrid's attention weights skip the linear layers
            a, b = host(a_all[layer]), host(b_all[layer])  # [*in, r], [r, *out]
            rank = a.shape[-1]
            name = PREFIX + module.format(i=row.layer_of(layer))
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)  # [r, in]
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)  # [out, r]

    modules_to_save = []
    for row in rows:
        if ".".join(row.path) not in trained:
            continue
        router = row.path in (ROUTER, ROUTER_BIAS)  # named as transformers 5's module (mixtral's checkpoints differ)
        save = peft_experts.ROUTER_MODULE[cfg.family] if router else _save_name(row)
        modules_to_save += [save] if save not in modules_to_save else []
        value = value_at(state, row.path)[...]
        for layer in range(row.stack_size(cfg.num_layers)) if row.stacked else [None]:
            name = row.name_at(layer) if layer is not None else row.hf_name
            if router:
                name = f"model.layers.{layer}.{save}.{row.hf_name.rsplit('.', 1)[-1]}"
            tensors[PREFIX + name] = row.to_hf(host(value if layer is None else value[layer]))
    tie = cfg.tie_word_embeddings and "embedding" in trained
    if tie:  # peft ties lm_head to the saved embedding and expects it saved as well
        tensors[PREFIX + "lm_head.weight"] = tensors[PREFIX + by_path[("embedding",)].hf_name]

    if staged.writer:
        from safetensors.numpy import save_file

        save_file(tensors, str(staged.tmp / ADAPTER_FILE), metadata={"format": "pt"})
        config = adapter_config(model, base_model_name_or_path, modules_to_save, tie)
        (staged.tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer_dir:
            copy_companion_files(tokenizer_dir, staged.tmp)
    return staged.publish("jaxcpt.save_peft_adapter")

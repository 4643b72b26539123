"""A model as plain pytrees: parameters out of and back into the NNX module, merged and base models.

Checkpoints store parameters as a nested dict of arrays (``{'layers': {'q': ...}, ...}``)
so their layout does not depend on Flax internals; the model config travels in the
checkpoint's ``meta`` item. Opening a model from a path is ``jaxcpt.open_model``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxcpt import __version__
from jaxcpt.config import from_dict, to_dict
from jaxcpt.model import expert_lora, layer_groups
from jaxcpt.model import lora as lora_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import Transformer, abstract_model, variable_shardings
from jaxcpt.sharding.rules import make_rules


def params_of(model: Transformer) -> dict:
    """The model's parameters as a nested dict of arrays (no Flax types)."""
    return nnx.state(model, nnx.Param).to_pure_dict()


def abstract_params(cfg: ModelConfig, mesh: Mesh, rules) -> dict:
    """Parameters as ``ShapeDtypeStruct`` leaves carrying their target sharding (for restores)."""
    state = nnx.state(abstract_model(cfg, rules), nnx.Param)
    shardings = variable_shardings(state, mesh, rules).to_pure_dict()
    shapes = state.to_pure_dict()
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def model_from_params(cfg: ModelConfig, params: dict, rules=None) -> Transformer:
    rules = rules if rules is not None else make_rules()
    graphdef, state = nnx.split(abstract_model(cfg, rules))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def fresh_adapters(cfg: ModelConfig, mesh: Mesh, rules, seed: int = 0) -> dict[str, jax.Array]:
    """{'q_lora_a': [L, E, r], ...}: new adapters of ``cfg.lora`` (A random, B zero), created in their shardings.

    The whole model is traced but only the adapters are returned, so XLA drops the base weights'
    initialisation: nothing of the base is materialised.
    """
    names = [name for target in cfg.lora.targets for stack in layer_groups.adapted_stacks(cfg, target)
             for name in lora_lib.adapter_names(stack)]
    layer_shardings = variable_shardings(nnx.state(abstract_model(cfg, rules), nnx.Param), mesh, rules)["layers"]

    @functools.partial(jax.jit, out_shardings={name: layer_shardings[name] for name in names})
    def create():
        layers = nnx.state(Transformer(cfg, rngs=nnx.Rngs(seed), rules=rules).layers, nnx.Param)
        return {name: layers[name].get_value() for name in names}

    with jax.set_mesh(mesh):
        return create()


def with_adapters(params: dict, adapters: dict[str, jax.Array]) -> dict:
    """Base parameters with adapters (``fresh_adapters``) added to their layer stack."""
    return {**params, "layers": {**params["layers"], **adapters}}


def merged_model(model: Transformer) -> Transformer:
    """The model with every LoRA update folded into its projection (in float32, stored back in the
    projection's dtype) and no adapters; a model without LoRA is returned as it is."""
    cfg = model.config
    if cfg.lora is None:
        return model
    params = params_of(model)
    layers = dict(params["layers"])
    for target in [s for t in cfg.lora.targets for s in layer_groups.adapted_stacks(cfg, t)]:  # Gemma 4: per shape
        a, b = (layers.pop(name) for name in lora_lib.adapter_names(target))
        if target in expert_lora.TARGETS:  # one adapter over several expert parameters (gate and up)
            for part, name in enumerate(expert_lora.TARGETS[target]):
                fold = jax.jit(lambda w, a, b, part=part: expert_lora.fold(w, a, b, part, cfg.lora.scale).astype(w.dtype),
                               out_shardings=layers[name].sharding)
                layers[name] = fold(layers[name], a, b)
            continue
        w = layers[target]
        fold = jax.jit(lambda w, a, b: lora_lib.fold(w, a, b, cfg.lora.scale).astype(w.dtype), out_shardings=w.sharding)
        layers[target] = fold(w, a, b)
    return model_from_params(dataclasses.replace(cfg, lora=None), {**params, "layers": layers}, model.rules)


def base_model(model: Transformer) -> Transformer:
    """The model without its LoRA adapters (what they apply to); a model without LoRA as it is."""
    cfg = model.config
    if cfg.lora is None:
        return model
    params = params_of(model)
    adapters = {name for target in cfg.lora.targets for stack in layer_groups.adapted_stacks(cfg, target)
                for name in lora_lib.adapter_names(stack)}
    layers = {name: value for name, value in params["layers"].items() if name not in adapters}
    return model_from_params(dataclasses.replace(cfg, lora=None), {**params, "layers": layers}, model.rules)


def model_meta(model: Transformer) -> dict:
    return {"model_config": to_dict(model.config), "jaxcpt_version": __version__}


def config_from_meta(meta: dict) -> ModelConfig:
    """The ``ModelConfig`` a checkpoint's meta records.

    Checkpoints written before vocabulary padding existed have no ``vocab_pad_multiple``;
    their tables hold exactly ``vocab_size`` rows, which is a multiple of 1.
    """
    fields = dict(meta["model_config"])
    fields.setdefault("vocab_pad_multiple", 1)
    return from_dict(ModelConfig, fields, prefix="model")

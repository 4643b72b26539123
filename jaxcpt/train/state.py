"""The training state pytree ``{'params', 'opt_state', 'step'[, 'ema'][, 'router_bias']}``: its shardings, and
where it starts (``router_bias``: an MoE model's selection bias, jaxcpt.train.balance).

``params`` is the model's nested parameter dict. The optimizer state and the EMA cover
only the *trainable view*: a flat ``{dotted path: array}`` dict of the parameters some
phase of ``optim.trainable`` trains (all of them by default), so frozen parameters carry
no optimizer state. Shardings come from the parameters' logical axes; the optimizer state
mirrors them (Adam's moments have the parameters' shapes and get their shardings), every
other optimizer leaf (counts, scalars) is replicated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcpt.model.config import ModelConfig
from jaxcpt.errors import UserError
from jaxcpt.model.persist import abstract_params, fresh_adapters, params_of, with_adapters
from jaxcpt.model.transformer import Transformer, abstract_model, init_model
from jaxcpt.train import balance
from jaxcpt.train.config import ADDED_FIELDS, NUMERICS_FIELDS, TrainConfig
from jaxcpt.optim.trainable import ParamInfo
from jaxcpt.optim.ema import init_ema
from jaxcpt.open_model import ModelLocation, locate_model, open_model


def locate_start(cfg: TrainConfig) -> ModelLocation | None:
    """Where a fresh run's model comes from, resolved once (``jaxcpt.open_model``): the config, the
    tokenizer, the adaptation record and the checkpoint step of ``init.path``; None from scratch."""
    if cfg.init.source == "scratch":
        return None
    location = locate_model(cfg.init.path)
    if location.kind != cfg.init.source:
        what = {"hf": "an HF directory (config.json)", "checkpoint": "a jaxcpt checkpoint"}
        raise UserError(f"init.source={cfg.init.source}, but init.path '{cfg.init.path}' is {what[location.kind]}; "
                        f"set init.source={location.kind}")
    return location


def resolve_model_config(cfg: TrainConfig, start: ModelLocation | None = None) -> ModelConfig:
    """The model's config: architecture from the init source (``start``, located here when not
    given), numerics and adapters (LoRA) from ``cfg.model``, then ``cfg.model.rope``'s change
    (jaxcpt.model.rope_change)."""
    from jaxcpt.model.rope_change import apply_rope_change

    return apply_rope_change(_source_model_config(cfg, start), cfg.model.rope)


def _source_model_config(cfg: TrainConfig, start: ModelLocation | None) -> ModelConfig:
    if cfg.init.source == "scratch":
        return cfg.model
    numerics = {name: getattr(cfg.model, name) for name in NUMERICS_FIELDS + ADDED_FIELDS}
    source = (start or locate_start(cfg)).config
    if cfg.model.moe is not None:  # the run's load-balancing choices (jaxcpt.train.config.BALANCING_KEYS)
        if source.moe is None:
            raise UserError(f"model.moe is set, but init.path '{cfg.init.path}' is a dense model; drop model.moe "
                            "(its balancing options are for mixture-of-experts models)")
        from jaxcpt.model.moe import BALANCING_FIELDS

        numerics["moe"] = dataclasses.replace(source.moe, **{k: getattr(cfg.model.moe, k) for k in BALANCING_FIELDS})
    return dataclasses.replace(source, **numerics)


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh, rules, start: ModelLocation | None) -> dict:
    """A fresh run's parameters, from ``start`` (``locate_start``), or initialised from scratch.

    With ``model.lora`` the source gives the base and fresh adapters are added (B = 0: the same
    function). A checkpoint that has adapters of its own starts as its merged model.
    """
    if start is None:
        return params_of(init_model(model_cfg, mesh, rules, seed=cfg.init.seed))
    numerics = {name: getattr(model_cfg, name) for name in NUMERICS_FIELDS}
    params = open_model(start, lora="merged", mesh=mesh, rules=rules, **numerics).params
    if model_cfg.lora is not None:
        params = with_adapters(params, fresh_adapters(model_cfg, mesh, rules, seed=cfg.init.seed))
    return params


def opt_state_shardings(tx: optax.GradientTransformation, view_abstract: dict, mesh: Mesh):
    """Shardings for ``tx.init(view)``: each moment like its parameter, everything else replicated.

    The trainable view is a flat dict keyed by parameter path, so every parameter-shaped
    leaf of the optimizer state sits under its parameter's key (also inside optax's
    multi_transform, whose other groups hold MaskedNode placeholders there).
    """
    opt_shapes = jax.eval_shape(tx.init, view_abstract)
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in view_abstract and tuple(view_abstract[name].shape) == tuple(leaf.shape):
                return view_abstract[name].sharding
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, opt_shapes)


def param_infos(model_cfg: ModelConfig, rules) -> dict[str, ParamInfo]:
    """{dotted path: shape and logical axes} of every parameter, in the model's order."""
    state = nnx.state(abstract_model(model_cfg, rules), nnx.Param)
    out = {}
    for path, variable in state.flat_state():
        shape = tuple(variable.get_value().shape)
        axes = tuple(variable.get_metadata().get("axes") or (None,) * len(shape))
        out[".".join(str(p) for p in path)] = ParamInfo(shape, axes, str(variable.get_value().dtype))
    return out


def trainable_view(params: dict, keys) -> dict:
    """{path: leaf} for the trainable paths ``keys``: the tree the optimizer (and the EMA) work on."""
    flat = {".".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    return {key: flat[key] for key in keys}


def with_trainable(params: dict, view: dict) -> dict:
    """``params`` with the leaves of a trainable view put back in place."""
    def put(path, leaf):
        return view.get(".".join(str(getattr(k, "key", k)) for k in path), leaf)

    return jax.tree_util.tree_map_with_path(put, params)


def train_state_shardings(tx, model_cfg: ModelConfig, mesh: Mesh, rules, *, keys, ema: bool = False) -> dict:
    params_abstract = abstract_params(model_cfg, mesh, rules)
    param_shardings = jax.tree.map(lambda p: p.sharding, params_abstract)
    view = trainable_view(params_abstract, keys)
    out = {
        "params": param_shardings,
        "opt_state": opt_state_shardings(tx, view, mesh),
        "step": NamedSharding(mesh, PartitionSpec()),
    }
    if ema:
        out["ema"] = {k: v.sharding for k, v in view.items()}
    if balance.state_bias(model_cfg):
        out[balance.STATE_KEY] = NamedSharding(mesh, PartitionSpec())  # [L, X]: small, on every device
    return out


def abstract_state(tx, model_cfg: ModelConfig, mesh: Mesh, rules, *, keys, ema: bool = False) -> dict:
    """ShapeDtypeStruct leaves with target shardings: what a checkpoint restores into."""
    params_abstract = abstract_params(model_cfg, mesh, rules)
    view = trainable_view(params_abstract, keys)
    shardings = train_state_shardings(tx, model_cfg, mesh, rules, keys=keys, ema=ema)
    shapes = {"params": params_abstract, "opt_state": jax.eval_shape(tx.init, view),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if ema:
        shapes["ema"] = jax.eval_shape(init_ema, view)
    if balance.state_bias(model_cfg):
        shapes[balance.STATE_KEY] = balance.abstract_bias(model_cfg)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def fresh_state(params: dict, tx, shardings: dict, keys, model_cfg: ModelConfig | None = None) -> dict:
    """Step-0 state: ``params`` with a new optimizer state over the trainable ``keys`` (and EMA, if sharded for;
    and a zero router bias, if sharded for: ``model_cfg`` gives its shape)."""
    view = trainable_view(params, keys)
    init = jax.jit(tx.init, out_shardings=shardings["opt_state"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    state = {"params": params, "opt_state": init(view), "step": step}
    if "ema" in shardings:
        state["ema"] = jax.jit(init_ema, out_shardings=shardings["ema"])(view)
    if balance.STATE_KEY in shardings:
        state[balance.STATE_KEY] = jax.device_put(balance.zero_bias(model_cfg), shardings[balance.STATE_KEY])
    return state


def graphdef_of(model_cfg: ModelConfig, rules):
    return nnx.split(abstract_model(model_cfg, rules))[0]


def model_of(graphdef, params: dict) -> Transformer:
    return nnx.merge(graphdef, params)

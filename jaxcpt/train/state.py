"""The training state pytree ``{'params', 'opt_state', 'step'[, 'ema']}``: its shardings, and where it starts.

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
from jaxcpt.model.persist import abstract_params, fresh_adapters, load_model, merged_model, params_of, with_adapters
from jaxcpt.model.transformer import Transformer, abstract_model, init_model
from jaxcpt.train.config import ADDED_FIELDS, NUMERICS_FIELDS, TrainConfig
from jaxcpt.optim.trainable import ParamInfo
from jaxcpt.train.ema import init_ema


def resolve_model_config(cfg: TrainConfig) -> ModelConfig:
    """The model's config: architecture from the init source, numerics and adapters (LoRA) from ``cfg.model``,
    then ``cfg.model.rope``'s change (jaxcpt.model.rope_change)."""
    from jaxcpt.model.rope_change import apply_rope_change

    return apply_rope_change(_source_model_config(cfg), cfg.model.rope)


def _source_model_config(cfg: TrainConfig) -> ModelConfig:
    numerics = {name: getattr(cfg.model, name) for name in NUMERICS_FIELDS + ADDED_FIELDS}
    if cfg.init.source == "hf":
        from jaxcpt.hf.convert import read_hf_config

        return dataclasses.replace(read_hf_config(cfg.init.path), **numerics)
    if cfg.init.source == "checkpoint":
        from jaxcpt.checkpoint import read_meta
        from jaxcpt.model.persist import config_from_meta, resolve_run_checkpoints

        meta = read_meta(resolve_run_checkpoints(cfg.init.path))
        return dataclasses.replace(config_from_meta(meta), **numerics)
    return cfg.model


def init_tokenizer_dir(cfg: TrainConfig) -> str | None:
    """The HF tokenizer directory that comes with the init source, without loading any weights."""
    from pathlib import Path

    from jaxcpt.hf.convert import COMPANION_FILES

    if cfg.init.source == "hf":
        return cfg.init.path if any((Path(cfg.init.path) / f).is_file() for f in COMPANION_FILES) else None
    if cfg.init.source == "checkpoint":
        from jaxcpt.checkpoint import resolve_step_dir
        from jaxcpt.model.persist import resolve_run_checkpoints, tokenizer_dir_for

        return tokenizer_dir_for(resolve_step_dir(resolve_run_checkpoints(cfg.init.path)))
    return None


def init_adaptation(cfg: TrainConfig) -> dict | None:
    """The starting model's adaptation record (``jaxcpt_adaptation.json``, written by extend-vocab /
    expand-depth), or None. A checkpoint start reads it from the checkpoint's meta."""
    import json
    from pathlib import Path

    if cfg.init.source == "hf":
        path = Path(cfg.init.path) / "jaxcpt_adaptation.json"
        return json.loads(path.read_text()) if path.is_file() else None
    if cfg.init.source == "checkpoint":
        from jaxcpt.checkpoint import read_meta
        from jaxcpt.model.persist import resolve_run_checkpoints

        return read_meta(resolve_run_checkpoints(cfg.init.path)).get("adaptation")
    return None


def initial_params(cfg: TrainConfig, model_cfg: ModelConfig, mesh: Mesh, rules) -> tuple[dict, str | None]:
    """(params, tokenizer_dir) for a fresh run, from the configured source.

    With ``model.lora`` the source gives the base and fresh adapters are added (B = 0: the same
    function). A checkpoint that has adapters of its own starts as its merged model.
    """
    numerics = {name: getattr(model_cfg, name) for name in NUMERICS_FIELDS}
    if cfg.init.source == "scratch":
        model = init_model(model_cfg, mesh, rules, seed=cfg.init.seed)
        return params_of(model), model.tokenizer_dir
    if cfg.init.source == "hf":
        from jaxcpt.hf.convert import load_hf

        overrides = {k: v for k, v in numerics.items() if k not in ("dtype", "param_dtype")}
        model = load_hf(cfg.init.path, mesh=mesh, dtype=model_cfg.dtype, param_dtype=model_cfg.param_dtype,
                        rules=rules, **overrides)
    else:
        model = merged_model(load_model(cfg.init.path, mesh=mesh, rules=rules, **numerics))
    params = params_of(model)
    if model_cfg.lora is not None:
        params = with_adapters(params, fresh_adapters(model_cfg, mesh, rules, seed=cfg.init.seed))
    return params, model.tokenizer_dir


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


def state_shardings(tx, model_cfg: ModelConfig, mesh: Mesh, rules, *, keys, ema: bool = False) -> dict:
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
    return out


def abstract_state(tx, model_cfg: ModelConfig, mesh: Mesh, rules, *, keys, ema: bool = False) -> dict:
    """ShapeDtypeStruct leaves with target shardings: what a checkpoint restores into."""
    params_abstract = abstract_params(model_cfg, mesh, rules)
    view = trainable_view(params_abstract, keys)
    shardings = state_shardings(tx, model_cfg, mesh, rules, keys=keys, ema=ema)
    shapes = {"params": params_abstract, "opt_state": jax.eval_shape(tx.init, view),
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
    if ema:
        shapes["ema"] = jax.eval_shape(init_ema, view)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def fresh_state(params: dict, tx, shardings: dict, keys) -> dict:
    """Step-0 state: ``params`` with a new optimizer state over the trainable ``keys`` (and EMA, if sharded for)."""
    view = trainable_view(params, keys)
    init = jax.jit(tx.init, out_shardings=shardings["opt_state"])
    step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
    state = {"params": params, "opt_state": init(view), "step": step}
    if "ema" in shardings:
        state["ema"] = jax.jit(init_ema, out_shardings=shardings["ema"])(view)
    return state


def graphdef_of(model_cfg: ModelConfig, rules, tokenizer_dir: str | None = None):
    return nnx.split(abstract_model(model_cfg, rules, tokenizer_dir))[0]


def model_of(graphdef, params: dict) -> Transformer:
    return nnx.merge(graphdef, params)

"""Auxiliary-loss-free load balancing (DeepSeek-V3; Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing").

Each MoE layer l has a bias b[l] [X] that is added to the router probabilities when the top-k
experts are chosen, and only then: the combine weights are the unbiased probabilities
(``jaxcpt.model.moe.route``). After every optimizer step the bias moves against the load that
step saw, outside the optimiser and without a gradient:

    load[l, e] = top-k assignments of the step's real tokens to expert e of layer l   (all micro-batches)
    delta      = rate * sign(mean_e load[l, e] - load[l, e])     overloaded experts down, idle ones up
    b[l]      <- b[l] + delta - mean_e delta                     (centred, as torchtitan does: top-k is
                                                                  blind to a shift shared by all experts,
                                                                  so this changes no choice and keeps b
                                                                  from drifting as a whole)

Where it lives: ``state['router_bias']`` [L, X] float32, replicated, beside ``params`` (not a
parameter: Adam's weight decay and moments must not touch it, and ``optim.trainable`` does not
select it). The checkpoint saves it with the rest of the state, so a resumed run continues with
the same bias bit for bit. A step whose loss or gradient is not finite leaves it unchanged, as it
leaves the parameters. The counts are exact small integers in float32, so the sum over devices and
micro-batches is exact and the update is the same on every mesh.

Export: no transformers MoE family that jaxcpt writes (Qwen3-MoE, Mixtral; OLMoE; gpt-oss, whose
router bias is added to the logits and so changes the weights too) has a selection-only bias, so an
exported model would route without it: a different model from the one trained and evaluated.
``export.router_bias`` decides: ``refuse`` (the default; refused when the run is set up, before any
step, not at its end) or ``drop`` (exported without the bias, with a warning stating its size).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxcpt.config import ConfigError

log = logging.getLogger("jaxcpt.train")

STATE_KEY = "router_bias"
# HF families whose checkpoints hold a selection-only bias (DeepSeek-V3's e_score_correction_bias): the model
# holds it as a parameter, ``layers.selection_bias`` [L_moe, X] (model.moe.score_correction_bias), imported and
# exported with the weights; the update below moves that parameter in place and no state['router_bias'] is kept
FAMILIES_WITH_SELECTION_BIAS: frozenset[str] = frozenset({"deepseek_v3"})
PARAM_NAME = "selection_bias"  # the model's own bias in params['layers'] (= transformer.SELECTION_BIAS)


def bias_rate(model_cfg) -> float:
    """The bias update rate of ``model_cfg`` (0: no bias is kept)."""
    return model_cfg.moe.router_bias_update_rate if model_cfg.moe is not None else 0.0


def own_bias(model_cfg) -> bool:
    """Whether the model holds its selection bias as a parameter (DeepSeek-V3), moved there, not in the state."""
    return model_cfg.moe is not None and model_cfg.moe.score_correction_bias


def state_bias(model_cfg) -> bool:
    """Whether the training state keeps a selection bias beside the parameters (``STATE_KEY``)."""
    return bool(bias_rate(model_cfg)) and not own_bias(model_cfg)


def bias_shape(model_cfg) -> tuple[int, int]:
    # [L_moe, X]: the MoE layers only (all but DeepSeek-V3's leading dense layers)
    return model_cfg.num_layers - model_cfg.moe.first_dense_layers, model_cfg.moe.num_experts


def abstract_bias(model_cfg) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(bias_shape(model_cfg), jnp.float32)


def zero_bias(model_cfg) -> jax.Array:
    return jnp.zeros(bias_shape(model_cfg), jnp.float32)  # [L, X]: no expert favoured at the start


def updated_bias(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """bias [L, X] float32 moved against counts [L, X] (the step's top-k assignments per expert)."""
    delta = rate * jnp.sign(counts.mean(-1, keepdims=True) - counts)  # [L, X]: + for idle, - for busy experts
    return bias + (delta - delta.mean(-1, keepdims=True))


TRAIN_FIX = ("Set export.router_bias=drop to export without it (a warning states its size), or export.final=false "
             "and export.hf_every=0 to keep only checkpoints, or balance with model.moe.router_aux_loss_coef instead")


def check_export(model_cfg, choice: str, exports: bool, fix: str = TRAIN_FIX) -> None:
    """Refuse a model that keeps a bias and would be exported to a family that cannot hold it (a training
    run: when it is set up, before any step); ``fix`` says how, in the words of the caller's options."""
    if not bias_rate(model_cfg) or not exports or choice != "refuse":
        return
    if own_bias(model_cfg):  # a parameter of the model (DeepSeek-V3's e_score_correction_bias): exported with it
        return
    raise ConfigError(
        f"model.moe.router_bias_update_rate={bias_rate(model_cfg)} keeps a per-expert selection bias, but the "
        f"{model_cfg.family} family in transformers has no such bias: the exported model would route without it, "
        f"so it would not be the model this run trains and evaluates. {fix}")


def warn_dropped(bias) -> None:
    """The warning of an export that drops the bias (``export.router_bias=drop``)."""
    values = np.asarray(jax.device_get(bias), np.float64)
    log.warning("export.router_bias=drop: the exported model routes without the selection bias this run trained "
                "with (max |bias| %.4g, per-layer spread up to %.4g in router-probability units); its expert choices "
                "and loss can differ from the checkpoint's", float(np.abs(values).max()),
                float((values.max(-1) - values.min(-1)).max()))


def bias_summary(bias) -> dict:
    """{bias: [[...] per layer]} for metrics.jsonl: the float32 values exactly (a float64 holds each one, and JSON
    writes it back unchanged), so two runs can be compared bit for bit; 0 = an expert neither favoured nor held back."""
    return {"bias": np.asarray(jax.device_get(bias), np.float64).tolist()}

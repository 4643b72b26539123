"""The hot path: pure ``train_step(state, batch) -> (state, metrics)`` and ``eval_step``.

``state`` is a plain pytree ``{'params', 'opt_state', 'step'}``, plus ``'ema'`` (the
parameters' moving average, ``jaxcpt.optim.ema``) when one is kept and ``'router_bias'`` (an
MoE model's selection bias, ``jaxcpt.train.balance``) when one is kept; the model's static
structure (``graphdef``), the optimizer and the loss settings are bound with
``functools.partial`` before jitting, so nothing hidden reaches the compiled step.

``batch`` (all [B, T] unless noted): inputs, targets, segment_ids, positions,
loss_mask, source [B] (index of the row's data source).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxcpt.optim.accumulate import accumulate_gradients
from jaxcpt.optim.optimizer import skip_update
from jaxcpt.optim.ema import EMAConfig, decay_at, update_ema
from jaxcpt.model import moe as moe_lib
from jaxcpt.train import balance
from jaxcpt.train.loss import model_token_loss_sums
from jaxcpt.train.state import trainable_view, with_trainable


def _per_source(values, source, num_sources: int):
    """Sum per-row values [B] into per-source totals [S]."""
    return jax.ops.segment_sum(values, source, num_segments=num_sources)


def _loss_sums(params, batch, *, graphdef, num_sources: int, chunk_size: int, z_loss_weight: float,
               source_loss_weights: tuple[float, ...] | None = None, router_bias=None):
    """((objective_sum, tokens), aux) for gradient accumulation: sums, so micro-batches add exactly.

    ``source_loss_weights`` (data.sources[].loss_weight; None = all 1) weight each row's loss in the
    objective by its source; the reported sums stay unweighted. ``router_bias`` [L, X]: an MoE
    model's selection bias (None: none)."""
    model = nnx.merge(graphdef, params)
    hidden, router = model.hidden_states_and_router(batch["inputs"], batch["segment_ids"], batch["positions"],
                                                    router_bias=router_bias)
    loss_rows, lse2_rows = model_token_loss_sums(model, hidden, batch["targets"], batch["loss_mask"],
                                                 chunk_size=chunk_size)  # [B], [B]
    tokens_rows = batch["loss_mask"].astype(jnp.float32).sum(-1)  # [B]
    weighted = loss_rows if source_loss_weights is None else (
        loss_rows * jnp.asarray(source_loss_weights, jnp.float32)[batch["source"]])  # [B]
    objective_sum = weighted.sum() + z_loss_weight * lse2_rows.sum()
    # MoE balancing terms are per-token means: times the tokens, so micro-batches still add up
    objective_sum = objective_sum + moe_lib.router_objective(router, model.config.moe) * tokens_rows.sum()
    aux = {
        "loss_sum": loss_rows.sum(),
        "source_loss_sum": _per_source(loss_rows, batch["source"], num_sources),
        "source_tokens": _per_source(tokens_rows, batch["source"], num_sources),
    }
    if router is not None:  # RouterStats [L, X]: sums, so micro-batches add
        aux["router"] = router
    return (objective_sum, tokens_rows.sum()), aux


def train_step(state, batch, *, graphdef, tx: optax.GradientTransformation, schedule, num_sources: int,
               grad_accum_steps: int, chunk_size: int, z_loss_weight: float, trainable_keys,
               ema: EMAConfig | None = None, source_loss_weights: tuple[float, ...] | None = None,
               router_bias_rate: float = 0.0):
    """One optimizer step. A non-finite loss or gradient leaves params, optimizer state, EMA and router bias
    unchanged.

    Gradients, the optimizer and the EMA see only the trainable view (``trainable_keys``);
    frozen parameters are closed over, so no gradient or accumulator is made for them. With
    ``router_bias_rate`` the state's ``router_bias`` chooses experts in every micro-batch and then
    moves against the whole step's load (``jaxcpt.train.balance``).
    """
    params = state["params"]
    trainable = trainable_view(params, trainable_keys)
    bias = state.get(balance.STATE_KEY)  # [L, X] or None; the same for every micro-batch of the step

    def loss_fn(view, micro):
        return _loss_sums(with_trainable(params, view), micro, graphdef=graphdef, num_sources=num_sources,
                          chunk_size=chunk_size, z_loss_weight=z_loss_weight, source_loss_weights=source_loss_weights,
                          router_bias=bias)

    _, grads, aux = accumulate_gradients(loss_fn, trainable, batch, grad_accum_steps)
    grad_norm = optax.global_norm(grads)
    tokens = aux["source_tokens"].sum()
    loss = aux["loss_sum"] / jnp.maximum(tokens, 1.0)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    use_ema = ema is not None and ema.enabled

    def apply_update(carry):
        view, opt_state, average = carry
        updates, new_opt_state = tx.update(grads, opt_state, view)
        new_view = optax.apply_updates(view, updates)
        if use_ema:
            average = update_ema(average, new_view, decay_at(ema, state["step"] + 1))
        return new_view, new_opt_state, average

    def skip(carry):
        # Parameters, moments, Adam's update count and the average stay; the schedule's and the
        # phases' step counters advance, so they stay on the training step (optim.optimizer.skip_update).
        view, opt_state, average = carry
        return view, skip_update(opt_state), average

    # cond, not a select: only the taken branch runs, so a healthy step pays nothing for the check
    carry = (trainable, state["opt_state"], state.get("ema") if use_ema else None)
    new_view, new_opt_state, new_ema = jax.lax.cond(finite, apply_update, skip, carry)
    new_state = {"params": with_trainable(params, new_view), "opt_state": new_opt_state, "step": state["step"] + 1}
    if use_ema:
        new_state["ema"] = new_ema
    if bias is not None:  # counts summed over all micro-batches: the whole step's load
        moved = balance.updated_bias(bias, aux["router"].counts, router_bias_rate)
        new_state[balance.STATE_KEY] = jnp.where(finite, moved, bias)
    own = params.get("layers", {}).get(balance.PARAM_NAME) if router_bias_rate and bias is None else None
    if own is not None:  # the model's own bias (DeepSeek-V3's e_score_correction_bias), moved in place
        moved = balance.updated_bias(own, aux["router"].counts, router_bias_rate)
        new_state["params"] = with_trainable(new_state["params"], {f"layers.{balance.PARAM_NAME}": jnp.where(
            finite, moved, own).astype(own.dtype)})
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": schedule(state["step"]),
        "tokens": tokens,
        "finite": finite,
        "source_loss_sum": aux["source_loss_sum"],
        "source_tokens": aux["source_tokens"],
    }
    if "router" in aux:
        metrics["router_counts"] = aux["router"].counts  # [L, X]
        metrics["router_aux_loss"] = moe_lib.load_balancing_loss(aux["router"])
        metrics["router_z_loss"] = moe_lib.z_loss(aux["router"])
    if bias is not None:
        metrics["router_bias"] = new_state[balance.STATE_KEY]  # [L, X] after this step's update
    elif own is not None:
        metrics["router_bias"] = new_state["params"]["layers"][balance.PARAM_NAME]  # [L_moe, X] after the update
    return new_state, metrics


def eval_step(params, batch, router_bias=None, *, graphdef, chunk_size: int):
    """(loss_sum, tokens, bytes) of one evaluation batch, summed over its real target tokens.

    ``bytes`` sums ``batch['target_bytes']`` (the UTF-8 bytes each target token spells) when the
    batch has it, for bits per byte; else 0. ``router_bias`` [L, X]: the run's selection bias, so
    the model is evaluated routing as it trains (None: none).
    """
    model = nnx.merge(graphdef, params)
    hidden, router = model.hidden_states_and_router(batch["inputs"], batch["segment_ids"], batch["positions"],
                                                    router_bias=router_bias)
    loss_rows, _ = model_token_loss_sums(model, hidden, batch["targets"], batch["loss_mask"], chunk_size=chunk_size)
    target_bytes = batch["target_bytes"].sum() if "target_bytes" in batch else jnp.zeros((), jnp.float32)
    if router is not None:  # an MoE model: also its router counts [L, X], for routing per source
        return loss_rows.sum(), batch["loss_mask"].astype(jnp.float32).sum(), target_bytes, router.counts
    return loss_rows.sum(), batch["loss_mask"].astype(jnp.float32).sum(), target_bytes

"""AdamW for continual pretraining: global-norm clipping, a weight-decay mask read from parameter names.

    tx, schedule = build_optimizer(cfg.optim, total_steps)
    lr = schedule(step)             # what the trainer logs; the same function drives the updates

The learning rate is given to ``optax.adamw`` as the schedule itself, and optax's step
counter advances once per ``tx.update``, so ``schedule(step)`` for the training step is
exactly the lr of that update (gradient accumulation happens before the update, see
``jaxcpt.optim.accumulate``, and does not advance the counter).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from jaxcpt.optim.config import OptimConfig
from jaxcpt.optim.schedules import Schedule, build_schedule
from jaxcpt.optim.trainable import (
    PhaseState,
    TrainableSpec,
    gated,
    group_labels,
    has_row_masks,
    label_phases,
    row_masks,
)

# Path components that belong to the container (nnx.Variable's ``value``), not to the parameter name.
_CONTAINER_KEYS = ("value", "raw_value")


def _path_names(path: tuple) -> list[str]:
    """Lower-cased names along a pytree path, for dicts, attributes and sequences alike."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)).lower())
                break
        else:
            names.append(str(key).lower())
    while names and names[-1] in _CONTAINER_KEYS:
        names.pop()
    return names


def is_norm_or_bias(path: tuple) -> bool:
    """A path with a component containing 'norm' (RMSNorm / LayerNorm scales, q_norm ...) or ending in 'bias',
    or gpt-oss's attention ``sinks`` (a per-head logit, a bias of the softmax: decay would pull it toward 0)."""
    names = _path_names(path)
    return any("norm" in n for n in names) or bool(names and names[-1].endswith("bias")) or "sinks" in names


def is_input_embedding(path: tuple) -> bool:
    """A path with a component containing 'embed' ('embed', 'embed_tokens', 'embedding').

    The output projection ('lm_head') is an ordinary kernel and is decayed; with tied
    embeddings there is only the input table, and ``decay_embeddings`` decides for both.
    """
    return any("embed" in n for n in _path_names(path))


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """A pytree shaped like ``params`` with True where AdamW should apply weight decay.

    Works on any pytree whose paths carry parameter names: nested dicts, flax
    ``nnx.State`` (its ``.value`` leaf key is ignored), dataclasses. Norm scales and biases
    are never decayed: decay would pull a norm's scale toward 0, not toward the identity.
    The input embedding is decayed only with ``decay_embeddings``: rows of tokens that the
    new data never uses get no gradient, so decay alone would shrink them (forgetting).
    """

    def decays(path, _leaf) -> bool:
        if is_norm_or_bias(path):
            return False
        if is_input_embedding(path):
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(cfg: OptimConfig, total_steps: int,
                    trainable: TrainableSpec | None = None) -> tuple[optax.GradientTransformation, Schedule]:
    """``(tx, schedule)``: clip (if on) then AdamW with the masked decay and the lr schedule of ``cfg``.

    ``trainable`` (``jaxcpt.optim.trainable``): with phases or row selections, the optimizer
    works on the flat ``{path: array}`` view of the trainable parameters, one phase-gated
    Adam per group of parameters that train in the same phases, row masks around it, and the
    learning rate applied last on the global step. Without (or when everything trains for
    the whole run) it is plain ``optax.adamw``.
    """
    cfg.validate()
    schedule = build_schedule(cfg.schedule, total_steps)
    b1, b2 = cfg.betas

    def decay_mask(params):
        return weight_decay_mask(params, cfg.decay_embeddings)

    clip = [optax.clip_by_global_norm(cfg.clip_grad_norm)] if cfg.clip_grad_norm else []  # 0 and None both mean off
    if trainable is None or (len(trainable.phases) == 1 and not has_row_masks(trainable)):
        adamw = optax.adamw(learning_rate=schedule, b1=b1, b2=b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            mask=decay_mask)
        return optax.chain(*clip, adamw) if clip else adamw, schedule

    def adam_with_decay():  # optax.adamw without its learning rate, which is applied after the gates
        return optax.chain(optax.scale_by_adam(b1=b1, b2=b2, eps=cfg.eps),
                           optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))

    labels = group_labels(trainable)
    groups = {label: gated(adam_with_decay(), label_phases(label), trainable.starts) for label in sorted(set(labels.values()))}
    masks = [row_masks(trainable)] if has_row_masks(trainable) else []
    tx = optax.chain(*masks, *clip, optax.multi_transform(groups, labels), optax.scale_by_learning_rate(schedule), *masks)
    return tx, schedule


# Optimizer states whose ``count`` follows the training step, not the updates applied: the
# learning-rate schedule (``scale_by_learning_rate`` / ``scale_by_schedule``) and the phase
# gates and row masks of ``optim.trainable``.
STEP_COUNTERS = (optax.ScaleByScheduleState, PhaseState)


def skip_update(opt_state: Any) -> Any:
    """``opt_state`` after a training step whose update was skipped (a non-finite loss or gradient).

    The step counters in ``STEP_COUNTERS`` advance, so the schedule and the phases stay on the
    training step. Everything else stays as it was, Adam's ``count`` included: it counts the
    updates in its moments and sets their bias correction (1 - beta^count), so advancing it
    over a skipped step would make the next real update too small; after a skip at the very
    start about 0.74x (0.1 / 0.19 over sqrt(0.001 / 0.001999) with the default betas). A
    phase-gated group's Adam, frozen in the current phase, is inside a ``PhaseState`` and stays
    fresh for its first phase.
    """

    def advance(node):
        return node._replace(count=node.count + 1) if isinstance(node, STEP_COUNTERS) else node

    return jax.tree.map(advance, opt_state, is_leaf=lambda node: isinstance(node, STEP_COUNTERS))

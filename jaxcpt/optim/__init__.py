"""Optimiser, learning-rate schedules and gradient accumulation for continual pretraining.

    from jaxcpt.optim import OptimConfig, build_optimizer, accumulate_gradients
    tx, schedule = build_optimizer(cfg.optim, total_steps)   # schedule(step) -> lr, for logging
"""

from jaxcpt.optim.accumulate import accumulate_gradients, split_microbatches
from jaxcpt.optim.config import OptimConfig, ScheduleConfig
from jaxcpt.optim.optimizer import build_optimizer, is_input_embedding, is_norm_or_bias, weight_decay_mask
from jaxcpt.optim.schedules import (
    Phase,
    build_schedule,
    first_step_below,
    peak_lr,
    phase_boundaries,
    schedule_phases,
)

__all__ = [
    "OptimConfig",
    "Phase",
    "ScheduleConfig",
    "accumulate_gradients",
    "build_optimizer",
    "build_schedule",
    "first_step_below",
    "is_input_embedding",
    "is_norm_or_bias",
    "peak_lr",
    "phase_boundaries",
    "schedule_phases",
    "split_microbatches",
    "weight_decay_mask",
]

"""Learning-rate schedules for continual pretraining: pure functions step -> lr, built from phases.

Every schedule is a list of ``Phase``s laid end to end over the run and joined with
``optax.join_schedules``. Each phase starts at the value where the previous one ended,
so the curve is continuous; the only jumps are ones a config asks for by giving a phase
zero length (no warmup: straight to the peak; no cooldown in ``infinite``: straight from
the peak to the constant) or by a nonzero ``warmup_start_lr`` after the optimizer warmup.

    kind            phases (absolute training steps)
    warmup_cosine   [optimizer_warmup] warmup -> decay (cosine to min)
    rewarm          [optimizer_warmup] warmup from warmup_start_lr -> decay (cosine / linear / 1-sqrt to min)
    wsd             [optimizer_warmup] warmup -> stable (peak) -> decay (linear / cosine / 1-sqrt to min)
    infinite        [optimizer_warmup] warmup -> cooldown (to constant) -> constant -> [anneal (linear / exponential to min) -> [final (min)]]
    constant        [optimizer_warmup] warmup -> constant (peak)
    inverse_sqrt    [optimizer_warmup] warmup -> decay: peak / sqrt(1 + t / warmup)

Every warmup starts at ``warmup_start_lr`` (default 0); ``rewarm`` differs from
``warmup_cosine`` only in letting the decay be linear or 1-sqrt too.

Phases of fixed length are resolved from steps or fractions of ``total_steps``; the
one remainder phase (decay, stable, constant) takes whatever is left. Conventions, all
optax's: a phase of length T maps its local step t in [0, T] to its values, so a warmup
from 0 gives lr 0 at its first step and reaches the peak at the first step of the next
phase; a decay reaches its end value at ``total_steps`` (one past the last update), and
every schedule holds its last value for steps past the run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax.numpy as jnp
import numpy as np
import optax

from jaxcpt.config import ConfigError
from jaxcpt.optim.config import (
    DEFAULT_COOLDOWN_FRACTION,
    DEFAULT_WARMUP_FRACTION,
    DEFAULT_WSD_DECAY_FRACTION,
    ScheduleConfig,
)

Schedule = Callable[[int | jnp.ndarray], jnp.ndarray]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One piece of a schedule: ``fn`` maps the step counted from ``start`` to the lr."""

    name: str
    start: int  # first training step of the phase
    steps: int  # length; the last phase also answers for steps past the run
    fn: optax.Schedule


# --- phase shapes: local step t in [0, steps] -> lr, elementwise over arrays of steps ------------


def linear_phase(start_lr: float, end_lr: float, steps: int) -> optax.Schedule:
    """``start * (1 - t/T) + end * t/T``.

    Not ``optax.linear_schedule``: it computes ``(start - end) * (1 - t/T) + end``, which in
    float32 cancels for a warmup from 0 (lr 1e-5 of peak 1e-3 comes out 4e-6 off,
    relatively). The weighted form is exact at both ends and accurate near a zero end.
    """

    def fn(t):
        progress = jnp.clip(jnp.asarray(t, jnp.float32) / max(steps, 1), 0.0, 1.0)
        return start_lr * (1.0 - progress) + end_lr * progress

    return fn


def constant_phase(lr: float) -> optax.Schedule:
    return optax.constant_schedule(lr)


def one_minus_sqrt_phase(start_lr: float, end_lr: float, steps: int) -> optax.Schedule:
    """``end + (start - end) * (1 - sqrt(t / T))``: the WSD cooldown of Hägele et al. 2024, not in optax."""

    def fn(t):
        progress = jnp.clip(jnp.asarray(t, jnp.float32) / steps, 0.0, 1.0)
        return end_lr + (start_lr - end_lr) * (1.0 - jnp.sqrt(progress))

    return fn


def decay_phase(shape: str, start_lr: float, end_lr: float, steps: int) -> optax.Schedule:
    """A decay from ``start_lr`` to ``end_lr`` over ``steps`` with shape cosine, linear or 1-sqrt."""
    if steps <= 0:  # a skipped phase: never evaluated, but optax refuses to build a 0-step cosine
        return constant_phase(end_lr)
    if shape == "cosine":
        return optax.cosine_decay_schedule(start_lr, steps, alpha=end_lr / start_lr)
    if shape == "linear":
        return linear_phase(start_lr, end_lr, steps)
    if shape == "1-sqrt":
        return one_minus_sqrt_phase(start_lr, end_lr, steps)
    raise ConfigError(f"unknown decay shape '{shape}'; use cosine, linear or 1-sqrt")


def anneal_phase(shape: str, start_lr: float, end_lr: float, steps: int) -> optax.Schedule:
    """Linear, or exponential (geometric: ``start * (end / start) ** (t / T)``), from start to end."""
    if shape == "linear":
        return linear_phase(start_lr, end_lr, steps)
    if shape == "exponential":
        return optax.exponential_decay(start_lr, steps, decay_rate=end_lr / start_lr, end_value=end_lr)
    raise ConfigError(f"unknown anneal shape '{shape}'; use linear or exponential")


def inverse_sqrt_phase(peak: float, timescale: int) -> optax.Schedule:
    """``peak / sqrt(1 + t / timescale)``; with timescale = warmup this is the classic peak * sqrt(W / step)."""

    def fn(t):
        t = jnp.maximum(jnp.asarray(t, jnp.float32), 0.0)
        return peak / jnp.sqrt(1.0 + t / timescale)

    return fn


# --- building a schedule from a config ---------------------------------------------------------


def _length(steps: int | None, fraction: float | None, default_fraction: float, total_steps: int) -> int:
    """A phase length in steps: given steps, else the fraction of the run rounded to the nearest step (halves up)."""
    if steps is not None:
        return steps
    return int(math.floor((default_fraction if fraction is None else fraction) * total_steps + 0.5))


def schedule_phases(cfg: ScheduleConfig, total_steps: int) -> list[Phase]:
    """The phases of ``cfg`` over a run of ``total_steps``; zero-length phases are left out.

    Raises ConfigError when the configured phases do not fit in the run.
    """
    cfg.validate()
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    peak, min_lr = cfg.peak_lr, cfg.peak_lr * cfg.min_lr_ratio
    phases: list[Phase] = []
    used: list[str] = []  # "name (n steps)" of fixed phases, for error messages
    cursor = 0

    def add(name: str, steps: int, fn: optax.Schedule) -> None:
        nonlocal cursor
        if steps > 0:
            phases.append(Phase(name, cursor, steps, fn))
            used.append(f"{name} ({steps})")
        cursor += steps

    def remainder(after: int = 0) -> int:
        """Steps left for the open phase, with ``after`` steps of fixed phases still to come."""
        left = total_steps - cursor - after
        if left < 0:
            parts = " + ".join(used + ([f"decay ({after})"] if after else []))
            raise ConfigError(f"schedule phases {parts} = {cursor + after} steps exceed the run of total_steps={total_steps}")
        return left

    add("optimizer_warmup", cfg.optimizer_warmup_steps, constant_phase(0.0))
    warmup = _length(cfg.warmup_steps, cfg.warmup_fraction, DEFAULT_WARMUP_FRACTION, total_steps)
    add("warmup", warmup, linear_phase(cfg.warmup_start_lr, peak, warmup))

    if cfg.kind in ("warmup_cosine", "rewarm"):
        decay = remainder()
        add("decay", decay, decay_phase(cfg.decay_shape, peak, min_lr, decay))
    elif cfg.kind == "wsd":
        decay = _length(cfg.decay_steps, cfg.decay_fraction, DEFAULT_WSD_DECAY_FRACTION, total_steps)
        add("stable", remainder(after=decay), constant_phase(peak))
        add("decay", decay, decay_phase(cfg.decay_shape, peak, min_lr, decay))
    elif cfg.kind == "infinite":
        constant_lr = peak * cfg.constant_lr_ratio
        cooldown = _length(cfg.cooldown_steps, cfg.cooldown_fraction, DEFAULT_COOLDOWN_FRACTION, total_steps)
        add("cooldown", cooldown, decay_phase(cfg.decay_shape, peak, constant_lr, cooldown))
        remainder()
        anneal_start, anneal_setting = cfg.anneal_start_step, f"anneal_start_step={cfg.anneal_start_step}"
        if anneal_start is None and cfg.anneal_start_fraction is not None:
            anneal_start = _length(None, cfg.anneal_start_fraction, 0.0, total_steps)
            anneal_setting = f"anneal_start_fraction={cfg.anneal_start_fraction} (step {anneal_start})"
        if anneal_start is None:
            add("constant", remainder(), constant_phase(constant_lr))
        else:
            _check_anneal_start(anneal_start, anneal_setting, cursor, total_steps)
            add("constant", anneal_start - cursor, constant_phase(constant_lr))
            if cfg.anneal_steps is None and cfg.anneal_fraction is None:
                anneal = total_steps - anneal_start
            else:
                anneal = _length(cfg.anneal_steps, cfg.anneal_fraction, 0.0, total_steps)
            if anneal < 1 or anneal_start + anneal > total_steps:
                raise ConfigError(
                    f"anneal of {anneal} steps from step {anneal_start} must end within the run "
                    f"of total_steps={total_steps} (at step {total_steps} at the latest) and last >= 1 step"
                )
            add("anneal", anneal, anneal_phase(cfg.anneal_shape, constant_lr, min_lr, anneal))
            add("final", remainder(), constant_phase(min_lr))  # an anneal shorter than the rest of the run
    elif cfg.kind == "constant":
        add("constant", remainder(), constant_phase(peak))
    elif cfg.kind == "inverse_sqrt":
        add("decay", remainder(), inverse_sqrt_phase(peak, max(warmup, 1)))
    else:  # validate() keeps kind to the Literal, so only a new kind without a branch lands here
        raise ConfigError(f"schedule kind '{cfg.kind}' has no builder")
    return phases


def _check_anneal_start(anneal_start: int, setting: str, constant_from: int, total_steps: int) -> None:
    if anneal_start >= total_steps:
        raise ConfigError(
            f"{setting} is beyond the run of total_steps={total_steps}; "
            f"start the anneal before step {total_steps}"
        )
    if anneal_start < constant_from:
        raise ConfigError(
            f"{setting} falls before the constant phase, which starts at step {constant_from} "
            "(after optimizer warmup, warmup and cooldown); start the anneal at or after it"
        )


def join_phases(phases: list[Phase]) -> Schedule:
    """One schedule from consecutive phases: a float32 lr for a Python int, a traced scalar or an array of steps."""
    joined = optax.join_schedules([p.fn for p in phases], [p.start for p in phases[1:]])

    def lr_at(step):
        step = jnp.asarray(step)
        # A lone constant phase ignores its argument; broadcast so arrays of steps give arrays.
        return jnp.broadcast_to(jnp.asarray(joined(step), jnp.float32), step.shape)

    return lr_at


def build_schedule(cfg: ScheduleConfig, total_steps: int) -> Schedule:
    """The jit-traceable ``step -> lr`` function of ``cfg`` over a run of ``total_steps``."""
    return join_phases(schedule_phases(cfg, total_steps))


def phase_boundaries(cfg: ScheduleConfig, total_steps: int) -> list[tuple[str, int]]:
    """``(phase name, first step)`` for each phase in order, then ``("end", total_steps)``."""
    return [(p.name, p.start) for p in schedule_phases(cfg, total_steps)] + [("end", total_steps)]


def peak_lr(cfg: ScheduleConfig) -> float:
    """The highest learning rate of the schedule (reached at the end of the warmup)."""
    return cfg.peak_lr


def first_step_below(schedule: Schedule, fraction_of_peak: float, peak: float, total_steps: int) -> int | None:
    """First step in [0, total_steps) with lr < fraction_of_peak * peak after the peak was reached, or None.

    Evaluated on every step on the host, so the answer is exact and deterministic (the
    data mixer switches blends on it). "Reached" allows float32 rounding of the peak.
    """
    steps = np.arange(total_steps)
    lrs = np.broadcast_to(np.asarray(schedule(jnp.asarray(steps)), np.float64), steps.shape)
    reached = np.flatnonzero(lrs >= peak * (1.0 - 1e-5))
    if reached.size == 0:
        return None
    below = np.flatnonzero(lrs[reached[0] :] < fraction_of_peak * peak)
    return int(reached[0] + below[0]) if below.size else None

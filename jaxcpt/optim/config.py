"""Optimiser and learning-rate schedule settings: the ``optim:`` section of a training YAML.

Lengths of phases are given either in steps (``warmup_steps: 200``) or as fractions of
the whole run (``warmup_fraction: 0.01``), never both; when neither is given the help text
of the fraction field names the fallback. Positions (``anneal_start_step``) are absolute
training steps, the numbers checkpoints are saved under, so an annealed release can
branch from a checkpoint by naming its step.

``validate()`` here checks what can be checked without knowing the run length; the
schedule builder (``jaxcpt.optim.schedules``) checks the rest once ``total_steps`` is known.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxcpt.config import ConfigError, field
from jaxcpt.optim.trainable import TrainablePhase

ScheduleKind = Literal["warmup_cosine", "rewarm", "wsd", "infinite", "constant", "inverse_sqrt"]
DecayShape = Literal["cosine", "linear", "1-sqrt"]
AnnealShape = Literal["linear", "exponential"]

# Fallback lengths when neither the *_steps nor the *_fraction field of a phase is set.
# Kept as fractions so a default config fits any run length.
DEFAULT_WARMUP_FRACTION = 0.01
# Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
# Durations") find a 20% 1-sqrt cooldown matches a full cosine run.
DEFAULT_WSD_DECAY_FRACTION = 0.2
DEFAULT_COOLDOWN_FRACTION = 0.1

# Which kinds read which kind-specific fields; setting one that the chosen kind ignores
# is almost always a mistake (a forgotten ``kind:`` line), so validate() refuses it.
_FIELDS_READ_BY = {
    "decay_shape": ("rewarm", "wsd", "infinite"),
    "decay_steps": ("wsd",),
    "decay_fraction": ("wsd",),
    "cooldown_steps": ("infinite",),
    "cooldown_fraction": ("infinite",),
    "constant_lr_ratio": ("infinite",),
    "anneal_start_step": ("infinite",),
    "anneal_start_fraction": ("infinite",),
    "anneal_steps": ("infinite",),
    "anneal_fraction": ("infinite",),
    "anneal_shape": ("infinite",),
    "min_lr_ratio": ("warmup_cosine", "rewarm", "wsd", "infinite"),
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The learning rate over a run, as a sequence of phases (see ``jaxcpt.optim.schedules``).

    The default re-warms a pretrained model to a peak of 3e-5 over 1% of the run, then
    decays it with a cosine to 10% of the peak. 3e-5 is where Llama-2-class pretraining
    ended (peak 3e-4, cosine to 10%), so re-warming to it moves the base model gently;
    Ibrahim et al. 2024 ("Simple and Scalable Strategies to Continually Pre-train Large
    Language Models") find higher re-warm peaks adapt faster but forget more. Raise the
    peak when the new domain is far from the old one and you replay old data.
    """

    kind: ScheduleKind = field(
        "warmup_cosine",
        help="warmup_cosine: warmup, cosine to min. rewarm: warmup from warmup_start_lr, then decay_shape to min. "
        "wsd: warmup, stable, decay. infinite: warmup, cooldown to a constant, constant, optional anneal. "
        "constant: warmup, constant. inverse_sqrt: warmup, then peak/sqrt(1 + t/warmup).",
    )
    peak_lr: float = field(3e-5, help="Learning rate at the end of the warmup (the highest value of the schedule).")
    min_lr_ratio: float = field(
        0.1, help="Final learning rate as a fraction of peak_lr (decays of warmup_cosine, rewarm, wsd; the anneal of infinite)."
    )
    warmup_steps: int | None = field(None, help="Warmup length in steps. Give this or warmup_fraction, not both.")
    warmup_fraction: float | None = field(
        None, help=f"Warmup length as a fraction of the run; with neither this nor warmup_steps, {DEFAULT_WARMUP_FRACTION}."
    )
    warmup_start_lr: float = field(
        0.0, help="Learning rate the warmup starts from: 0, or the base model's final learning rate to re-warm from it."
    )
    decay_shape: DecayShape = field(
        "cosine", help="Shape of the decay (rewarm, wsd) or of the cooldown to the constant (infinite)."
    )
    decay_steps: int | None = field(None, help="wsd: length of the final decay in steps. Give this or decay_fraction.")
    decay_fraction: float | None = field(
        None, help=f"wsd: length of the final decay as a fraction of the run; with neither, {DEFAULT_WSD_DECAY_FRACTION}."
    )
    cooldown_steps: int | None = field(
        None, help="infinite: steps of the cooldown from peak_lr to the constant. Give this or cooldown_fraction."
    )
    cooldown_fraction: float | None = field(
        None, help=f"infinite: cooldown length as a fraction of the run; with neither, {DEFAULT_COOLDOWN_FRACTION}."
    )
    constant_lr_ratio: float = field(0.5, help="infinite: the constant learning rate as a fraction of peak_lr.")
    anneal_start_step: int | None = field(
        None,
        help="infinite: training step where the anneal to min_lr_ratio begins (a checkpoint step of the constant "
        "phase). Unset (with anneal_start_fraction) = no anneal, constant to the end.",
    )
    anneal_start_fraction: float | None = field(
        None, help="infinite: anneal start as a fraction of the run. Give this or anneal_start_step."
    )
    anneal_steps: int | None = field(
        None, help="infinite: anneal length in steps; unset (with anneal_fraction) = until the end of the run."
    )
    anneal_fraction: float | None = field(None, help="infinite: anneal length as a fraction of the run.")
    anneal_shape: AnnealShape = field(
        "linear", help="infinite: linear, or exponential (geometric; needs min_lr_ratio > 0) from the constant to the minimum."
    )
    optimizer_warmup_steps: int = field(
        0,
        help="Steps at learning rate 0 before the schedule starts, to fill fresh Adam moments after loading a model; "
        "the schedule's phases start after them.",
    )

    def validate(self) -> None:
        if not self.peak_lr > 0:
            raise ConfigError(f"peak_lr must be > 0, got {self.peak_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= self.warmup_start_lr <= self.peak_lr:
            raise ConfigError(
                f"warmup_start_lr ({self.warmup_start_lr}) must be in [0, peak_lr={self.peak_lr}]: "
                "a warmup rises to the peak"
            )
        if self.optimizer_warmup_steps < 0:
            raise ConfigError(f"optimizer_warmup_steps must be >= 0, got {self.optimizer_warmup_steps}")
        if self.kind == "warmup_cosine" and self.decay_shape != "cosine":
            raise ConfigError("kind 'warmup_cosine' always decays with a cosine; use kind 'rewarm' for decay_shape")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, kinds in _FIELDS_READ_BY.items():
            default = defaults[name]
            if self.kind not in kinds and getattr(self, name) != default:
                raise ConfigError(
                    f"{name} is set but kind '{self.kind}' does not read it "
                    f"(only {', '.join(repr(k) for k in kinds)} do); remove it or change kind"
                )
        for base in ("warmup", "decay", "cooldown", "anneal"):
            _check_pair(self, f"{base}_steps", f"{base}_fraction")
        _check_pair(self, "anneal_start_step", "anneal_start_fraction")
        if self.kind == "infinite":
            if not self.min_lr_ratio <= self.constant_lr_ratio <= 1.0:
                raise ConfigError(
                    f"constant_lr_ratio ({self.constant_lr_ratio}) must lie in "
                    f"[min_lr_ratio={self.min_lr_ratio}, 1]: the cooldown goes down from the peak, the anneal down from it"
                )
            if self.anneal_shape == "exponential" and self.min_lr_ratio <= 0:
                raise ConfigError("anneal_shape 'exponential' needs min_lr_ratio > 0 (a geometric decay never reaches 0)")
            if self.anneal_start_step is None and self.anneal_start_fraction is None and (
                self.anneal_steps is not None or self.anneal_fraction is not None
            ):
                raise ConfigError("anneal_steps/anneal_fraction is set but no anneal_start_step/anneal_start_fraction")
        # Fractions of the run that must fit one after another before the remainder phase.
        used = [
            (n, getattr(self, n))
            for n in ("warmup_fraction", "decay_fraction", "cooldown_fraction")
            if getattr(self, n) is not None
        ]
        if sum(v for _, v in used) > 1.0:
            parts = " + ".join(f"{n}={v}" for n, v in used)
            raise ConfigError(f"fractions add up to more than the run: {parts} > 1")
        if self.anneal_start_fraction is not None and self.anneal_fraction is not None:
            end = self.anneal_start_fraction + self.anneal_fraction
            if end > 1.0:
                raise ConfigError(
                    f"anneal ends after the run: anneal_start_fraction={self.anneal_start_fraction} + "
                    f"anneal_fraction={self.anneal_fraction} > 1"
                )


def _check_pair(cfg: ScheduleConfig, steps_name: str, fraction_name: str) -> None:
    steps, fraction = getattr(cfg, steps_name), getattr(cfg, fraction_name)
    if steps is not None and fraction is not None:
        raise ConfigError(f"{steps_name}={steps} and {fraction_name}={fraction} both given; keep one")
    if steps is not None and steps < 0:
        raise ConfigError(f"{steps_name} must be >= 0, got {steps}")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"{fraction_name} must be a fraction of the run in [0, 1], got {fraction}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with a weight-decay mask, global-norm clipping and gradient accumulation."""

    schedule: ScheduleConfig = field(ScheduleConfig(), help="The learning-rate schedule.")
    weight_decay: float = field(0.1, help="Decoupled (AdamW) weight decay, applied to kernels; never to norms or biases.")
    betas: tuple[float, float] = field((0.9, 0.95), help="Adam (b1, b2); 0.95 is the usual LLM choice for stability.")
    eps: float = field(1e-8, help="Adam epsilon.")
    clip_grad_norm: float | None = field(1.0, help="Clip gradients to this global L2 norm; 0 or null turns clipping off.")
    decay_embeddings: bool = field(
        False,
        help="Apply weight decay to the input embedding table. Off by default: in continual pretraining, rows of "
        "tokens absent from the new data get no gradient and would only shrink (forgetting).",
    )
    z_loss_weight: float = field(0.0, help="Weight of the z-loss (log(Z)^2) that keeps output logits from drifting; 0 = off.")
    grad_accum_steps: int = field(
        1, help="Micro-batches per optimizer step; the per-step batch is split into this many and gradients summed."
    )
    trainable: list[TrainablePhase] = field(
        [], help="What trains, in phases (see jaxcpt/optim/trainable.py): e.g. [{params: ['embedding[new]', "
        "'lm_head[new]'], steps: 500}, {params: ['*']}]. Empty = every parameter for the whole run. Parameters no "
        "phase trains carry no optimizer state."
    )

    def validate(self) -> None:
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for name, beta in zip(("betas[0]", "betas[1]"), self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optim.{name} must be in [0, 1), got {beta}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.clip_grad_norm is not None and self.clip_grad_norm < 0:
            raise ConfigError(f"optim.clip_grad_norm must be >= 0 (0 or null = off), got {self.clip_grad_norm}")
        if self.z_loss_weight < 0:
            raise ConfigError(f"optim.z_loss_weight must be >= 0, got {self.z_loss_weight}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        # The nested schedule validates itself when read through jaxcpt.config.from_dict.

"""An exponential moving average of the parameters, kept in the train state.

Weight averaging is the cheapest cure for the forgetting that continual pretraining
causes: the average trails the raw weights, so it keeps more of the base model while
it still moves toward the new domain. It lives in ``state['ema']`` (float32, sharded
like the parameters), is checkpointed with the rest, evaluated beside the raw weights
at every evaluation, and can be exported instead of them (``export.weights: ema``).

After optimizer update ``t`` (1-based) with parameters ``p_t``:

    ema_t = d_t * ema_{t-1} + (1 - d_t) * p_t,    ema_0 = p_0
    d_t   = decay                                  (warmup off)
    d_t   = min(decay, (1 + t) / (10 + t))         (warmup on: early on, the average follows
                                                    the weights closely instead of staying
                                                    near the starting point)

A skipped (non-finite) update leaves the average unchanged, as it does the parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcpt.config import ConfigError, field


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    decay: float = field(0.0, help="decay of the exponential moving average of the parameters (e.g. 0.999); 0 = no average")
    warmup: bool = field(True, help="use min(decay, (1 + t) / (10 + t)) at update t, so the first updates are not "
                                    "averaged with the starting weights for thousands of steps")

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def validate(self) -> None:
        if not 0.0 <= self.decay < 1.0:
            raise ConfigError(f"ema.decay must be in [0, 1) (0 = off), got {self.decay}")


def decay_at(cfg: EMAConfig, update: jax.Array) -> jax.Array:
    """The decay d_t used after optimizer update ``update`` (1-based), float32."""
    decay = jnp.float32(cfg.decay)
    if not cfg.warmup:
        return decay
    t = update.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def init_ema(params):
    """ema_0: a float32 copy of the parameters."""
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def update_ema(ema, params, decay: jax.Array):
    """ema * decay + (1 - decay) * params, leaf by leaf, in float32."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)

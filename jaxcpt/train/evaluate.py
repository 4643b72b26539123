"""Held-out evaluation during training: loss and perplexity per source over fixed rows."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def global_batch(local: dict, sharding: NamedSharding, source_sharding: NamedSharding) -> dict:
    """Per-host numpy rows -> global jax arrays sharded over the batch axes."""
    out = {key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key])) for key in BATCH_KEYS}
    out["source"] = jax.make_array_from_process_local_data(source_sharding, np.asarray(local["source"], np.int32))
    return out


def evaluate(eval_fn, params, eval_batches: dict, to_global) -> dict[str, dict]:
    """{source: {loss, perplexity, tokens}} over each source's held-out rows (every host calls it)."""
    results = {}
    for name, batches in eval_batches.items():
        loss_sum, tokens = 0.0, 0.0
        for batch in batches:
            batch_loss, batch_tokens = eval_fn(params, to_global(batch))
            loss_sum, tokens = loss_sum + float(batch_loss), tokens + float(batch_tokens)
        if tokens:
            loss = loss_sum / tokens
            results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
    return results

"""Held-out evaluation during training: loss and perplexity per source over fixed rows."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxcpt.train.routing import routing_summary

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def global_batch(local: dict, sharding: NamedSharding, source_sharding: NamedSharding) -> dict:
    """Per-host numpy rows -> global jax arrays sharded over the batch axes."""
    keys = [*BATCH_KEYS, "target_bytes"] if "target_bytes" in local else BATCH_KEYS
    out = {key: jax.make_array_from_process_local_data(sharding, np.asarray(local[key])) for key in keys}
    out["source"] = jax.make_array_from_process_local_data(source_sharding, np.asarray(local["source"], np.int32))
    return out


def evaluate(eval_fn, params, eval_batches: dict, to_global) -> dict[str, dict]:
    """{source: {loss, perplexity, tokens[, bits_per_byte, bytes]}} over each source's held-out rows.

    Every host calls it. Loss is in nats per token; bits per byte (where the batches carry the
    bytes their targets spell) divide the same summed loss by ln 2 and the text's UTF-8 bytes, so
    runs with different tokenizers (a vocabulary extension) compare fairly.
    """
    results = {}
    for name, batches in eval_batches.items():
        loss_sum, tokens, text_bytes, router_counts = 0.0, 0.0, 0.0, None
        for batch in batches:
            batch_loss, batch_tokens, batch_bytes, *router = eval_fn(params, to_global(batch))
            loss_sum, tokens, text_bytes = loss_sum + float(batch_loss), tokens + float(batch_tokens), text_bytes + float(batch_bytes)
            if router:  # an MoE model's router counts [L, X]
                counts = np.asarray(jax.device_get(router[0]), np.float64)
                router_counts = counts if router_counts is None else router_counts + counts
        if tokens:
            loss = loss_sum / tokens
            results[name] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
            if router_counts is not None:
                results[name]["routing"] = routing_summary(router_counts)
            if text_bytes:
                results[name].update(bits_per_byte=loss_sum / (math.log(2) * text_bytes), bytes=int(text_bytes))
    return results

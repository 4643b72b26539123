"""Gemma 4's per-layer input embeddings: a second vocabulary table that gives every layer an input of its own.

transformers 5.25 ``Gemma4TextModel.get_per_layer_inputs`` / ``project_per_layer_inputs`` and the per-layer
branch of ``Gemma4TextDecoderLayer``. The model holds ``per_layer_embedding`` [V_padded, L*P],
``per_layer_projection`` [E, L*P] and ``per_layer_norm`` [P]; each layer ``ple_gate`` [E, P], ``ple_proj``
[P, E] and ``ple_norm`` [E] (``jaxcpt.model.layer_groups`` stacks them). ``inputs`` runs once per forward
pass; its [B, T, L, P] result is scanned beside the layer weights, and ``branch`` adds layer l's slice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcpt.model.config import ModelConfig
from jaxcpt.model.layers import ACTIVATIONS, dense, rms_norm

SCANNED_NAME = "per_layer_input"  # a layer's [B, T, P] input among its scanned weights


def padded_vocab(cfg: ModelConfig) -> int:
    """Rows of the per-layer table as stored: its vocabulary padded like the embedding's."""
    rows = cfg.per_layer_vocab_size or cfg.vocab_size
    return -(-rows // cfg.vocab_pad_multiple) * cfg.vocab_pad_multiple


def inputs(model, input_ids, embedded) -> jax.Array:
    """Each layer's input [B, T, L, P]: (norm(embedded @ W / sqrt(E)) + table[ids] * sqrt(P)) / sqrt(2).

    ``embedded`` [B, T, E] is the (scaled) main embedding; transformers' get_per_layer_inputs and
    project_per_layer_inputs.
    """
    cfg = model.config
    dt, width = jnp.dtype(cfg.dtype), cfg.per_layer_input
    b, t = input_ids.shape
    rows = jnp.take(model.per_layer_embedding[...], input_ids, axis=0).astype(dt)  # [B, T, L*P]
    tokens = rows * jnp.asarray(width**0.5, dt)  # the scale rounded to the table's dtype first, as transformers
    projected = dense(embedded, model.per_layer_projection[...].astype(dt)) * cfg.hidden_size**-0.5  # [B, T, L*P]
    projected = rms_norm(projected.reshape(b, t, cfg.num_layers, width), model.per_layer_norm[...], cfg.rms_norm_eps,
                         plus_one=cfg.norm_plus_one)  # [B, T, L, P]
    return (projected + tokens.reshape(b, t, cfg.num_layers, width)) * 2**-0.5


def branch(p: dict, x, cfg: ModelConfig, norm):
    """A layer's per-layer-input branch, added to the residual: norm(proj(act(x @ gate) * input)); x [B, T, E]."""
    gated = ACTIVATIONS[cfg.activation](dense(x, p["ple_gate"])) * p[SCANNED_NAME]  # [B, T, P]
    return norm(dense(gated, p["ple_proj"]), p["ple_norm"])  # [B, T, E]

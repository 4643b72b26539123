"""Rows for new tokens in the input embedding [V, E] and the output projection [E, V].

The model grows from V_old to V_new = V_old + n; ids [V_old, V_new) get new rows (input)
and columns (output), every old row and column is copied bit for bit, and with tied
embeddings the one table serves both. Methods, for a new token t whose string (in the
tokenizer's alphabet: bytes for byte-level BPE, characters with '▁' for sentencepiece) is s:

- ``mean``: the mean of the rows of all tokens of the old tokenizer. Keeps the new tokens'
  logits at the average one, so the model's distribution over old tokens barely moves
  (Hewitt, "Initializing new word embeddings", 2021).
- ``subword-mean``: the mean of the rows of the pieces the *old* tokenizer splits s into
  (fast vocabulary transfer, Gee et al. 2022), input and output rows alike.
- ``weighted``: the idea of FOCUS (Dobler & de Melo 2023) and OFA (Liu et al. 2024), a
  similarity-weighted combination of old tokens' rows, with the similarity taken from the
  strings instead of an auxiliary embedding space. The candidates are every ordinary old
  token u (not special, not a byte-fallback token) that occurs in s as a substring; the
  similarity is the share of s it covers, c(u) = len(u) / len(s); the weights are
  softmax(c(u) / temperature) over the candidates. So the longest overlapping old tokens
  dominate ("▁data" and "frame" for "▁dataframe"), and single characters count little.
  Tokens with no candidate fall back to subword-mean.
- ``random``: independent N(0, initializer_range²) entries, as a freshly initialised model
  would have (the baseline of the benchmark).

``noise_std`` > 0 adds N(0, noise_std²) to every entry of the new rows, whatever the method.
Averages are taken in float64 and cast to the table's dtype once.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcpt.adapt.model_io import real_vocab_rows
from jaxcpt.adapt.vocab import VocabExtension
from jaxcpt.model.config import ModelConfig

INIT_METHODS = ("subword-mean", "weighted", "mean", "random")


def combinations(method: str, extension: VocabExtension, temperature: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per new token: (old ids [k], weights [k] summing to 1) of its row. Not for 'mean' or 'random'."""
    out = []
    for pieces, overlaps in zip(extension.old_pieces, extension.overlaps):
        if method == "weighted" and overlaps:
            ids = np.array([i for i, _ in overlaps], np.int64)
            coverage = np.array([c for _, c in overlaps], np.float64)
            logits = coverage / temperature
            weights = np.exp(logits - logits.max())
            out.append((ids, weights / weights.sum()))
        else:
            ids, counts = np.unique(np.asarray(pieces, np.int64), return_counts=True)  # a piece twice counts twice
            out.append((ids, counts / counts.sum()))
    return out


def _mean_of_rows(table: np.ndarray, ids: list[int], chunk: int = 8192) -> np.ndarray:
    """Mean of ``table[ids]`` [E] in float64, a chunk at a time (a gathered copy of a large table would not fit)."""
    total = np.zeros(table.shape[1], np.float64)
    for start in range(0, len(ids), chunk):
        total += table[ids[start : start + chunk]].astype(np.float64).sum(axis=0)
    return total / len(ids)


def new_rows(table: np.ndarray, method: str, extension: VocabExtension, *, rng: np.random.Generator,
             initializer_range: float, temperature: float) -> np.ndarray:
    """Rows [n, E] (float64) for the new tokens, from the old rows ``table`` [V_old, E]."""
    n, width = len(extension.tokens), table.shape[1]
    if method == "random":
        return rng.normal(0.0, initializer_range, size=(n, width))
    if method == "mean":
        return np.broadcast_to(_mean_of_rows(table, extension.existing_ids), (n, width)).copy()
    rows = np.empty((n, width), np.float64)
    for k, (ids, weights) in enumerate(combinations(method, extension, temperature)):
        rows[k] = weights @ table[ids].astype(np.float64)  # [k] @ [k, E]
    return rows


def extend_params(params: dict, cfg: ModelConfig, extension: VocabExtension, method: str, *, noise_std: float = 0.0,
                  temperature: float = 0.1, seed: int = 0) -> tuple[dict, ModelConfig]:
    """(params, config) with the vocabulary grown to ``extension.end_id``; all other parameters are the same objects."""
    if method not in INIT_METHODS:
        raise ValueError(f"unknown init method {method!r}; choose one of {INIT_METHODS}")
    if extension.first_id != cfg.vocab_size:
        raise ValueError(f"the extension starts at id {extension.first_id}, the model has {cfg.vocab_size} rows")
    rng = np.random.default_rng(seed)
    embedding, lm_head = real_vocab_rows(params, cfg)  # [V, E], [E, V] | None

    def grown(old: np.ndarray) -> np.ndarray:  # old [V, E] -> [V_new, E]
        rows = new_rows(old, method, extension, rng=rng, initializer_range=cfg.initializer_range,
                        temperature=temperature)
        if noise_std > 0:
            rows = rows + rng.normal(0.0, noise_std, size=rows.shape)
        return np.concatenate([old, rows.astype(old.dtype)], axis=0)

    out = dict(params)
    out["embedding"] = grown(embedding)
    if lm_head is not None:
        out["lm_head"] = np.ascontiguousarray(grown(lm_head.T).T)  # [E, V_new]
    if "per_layer_embedding" in params and cfg.per_layer_vocab_size is None:  # Gemma 4: a row per token there too
        out["per_layer_embedding"] = grown(params["per_layer_embedding"][: cfg.vocab_size])  # [V_new, L*P]
    return out, dataclasses.replace(cfg, vocab_size=extension.end_id)

"""Data iterator states as plain JSON, exactly invertible.

A checkpoint stores the data state as JSON. Grain iterator states are not all JSON
values: ``ConcatThenSplitIterDataset`` keeps ``(start, stop)`` tuples, compared with a
tuple sentinel, so a list that JSON gives back silently resumes at the wrong element
(FACTS.md); some states hold numpy scalars or dicts with integer keys. ``encode_state``
tags those so ``decode_state`` restores the exact Python values.
"""

from __future__ import annotations

import base64

import numpy as np


def encode_state(x):
    """A Grain iterator state as plain JSON values, invertible by ``decode_state``."""
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x):
            return {k: encode_state(v) for k, v in x.items()}
        return {"__items__": [[encode_state(k), encode_state(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [encode_state(v) for v in x]}
    if isinstance(x, list):
        return [encode_state(v) for v in x]
    if isinstance(x, np.ndarray):
        return {"__ndarray__": x.tolist(), "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, bytes):
        return {"__bytes__": base64.b64encode(x).decode()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot encode a {type(x).__name__} in a data state")


def decode_state(x):
    if isinstance(x, list):
        return [decode_state(v) for v in x]
    if not isinstance(x, dict):
        return x
    if "__tuple__" in x:
        return tuple(decode_state(v) for v in x["__tuple__"])
    if "__items__" in x:
        return {decode_state(k): decode_state(v) for k, v in x["__items__"]}
    if "__ndarray__" in x:
        return np.asarray(x["__ndarray__"], dtype=x["dtype"])
    if "__bytes__" in x:
        return base64.b64decode(x["__bytes__"])
    return {k: decode_state(v) for k, v in x.items()}


def fingerprint_diff(saved, now, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, saved value, current value) for every leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(saved) | set(now)):
            out += fingerprint_diff(saved.get(key), now.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        return [d for i, (a, b) in enumerate(zip(saved, now)) for d in fingerprint_diff(a, b, f"{prefix}[{i}]")]
    return [] if saved == now else [(prefix, saved, now)]

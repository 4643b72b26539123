"""Helpers for the merge tests: read every tensor of an HF directory, rewrite some, run the merge CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file


def weight_files(directory) -> list[Path]:
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return [directory / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"]


def read_tensors(directory) -> dict[str, np.ndarray]:
    """Every tensor of an HF directory, in its stored dtype."""
    out = {}
    for file in weight_files(directory):
        with safe_open(file, framework="numpy") as handle:
            for name in handle.keys():
                out[name] = handle.get_tensor(name)
    return out


def as_float64(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in tensors.items()}


def rewrite_tensors(directory, update) -> None:
    """Replace tensors of a single-file HF directory: ``update(name, array) -> array or None (drop it)``."""
    file = Path(directory) / "model.safetensors"
    tensors = load_file(file)
    new = {}
    for name, value in tensors.items():
        replaced = update(name, value)
        if replaced is not None:
            new[name] = np.ascontiguousarray(replaced)
    save_file(new, file, metadata={"format": "pt"})


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

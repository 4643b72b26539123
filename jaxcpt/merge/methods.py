"""The merge formulas, one tensor at a time: each method turns its inputs into coefficients.

Every method here is a linear combination of the input tensors with per-tensor
coefficients, ``merged = sum_k c_k * x_k`` (``x_0`` the base, ``x_1..x_n`` the CPT
models). Only SLERP's coefficients depend on the tensors themselves (through the angle
between them). ``combine`` evaluates the sum in float32 and skips terms whose
coefficient is exactly 0, so a coefficient vector (1, 0) or (0, 1) returns an input
bit for bit, -0.0 included: that is why merges at t=0 and t=1 reproduce the inputs.

Definitions follow mergekit's (the reference implementation the field uses); the
code is our own.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

# SLERP falls back to linear interpolation when the cosine of the angle between the two
# tensors exceeds this in absolute value: sin(theta) is then too small to divide by
# safely, and the great-circle arc is indistinguishable from the chord. Same value as mergekit.
COLINEAR_THRESHOLD = 0.9995
# Tensors with a norm below this (an all-zero bias) have no direction; SLERP is linear for them.
_TINY_NORM = 1e-12


@dataclasses.dataclass(frozen=True)
class Linear:
    """(1 - t) * base + t * model."""

    t: float
    name = "linear"

    def coefficients(self, tensors: list[np.ndarray]) -> tuple[list[float], bool]:
        return [1.0 - self.t, self.t], False


@dataclasses.dataclass(frozen=True)
class Slerp:
    """Spherical interpolation per tensor; linear for nearly colinear tensors."""

    t: float
    name = "slerp"

    def coefficients(self, tensors: list[np.ndarray]) -> tuple[list[float], bool]:
        """([c_base, c_model], fell_back_to_linear)."""
        base, model = tensors
        cosine = _cosine(base, model)
        if cosine is None or abs(cosine) > COLINEAR_THRESHOLD:
            return [1.0 - self.t, self.t], True
        theta = math.acos(cosine)
        sin_theta = math.sin(theta)
        return [math.sin((1.0 - self.t) * theta) / sin_theta, math.sin(self.t * theta) / sin_theta], False


@dataclasses.dataclass(frozen=True)
class TaskArithmetic:
    """base + sum_i w_i * (model_i - base), evaluated as (1 - sum_i w_i) * base + sum_i w_i * model_i."""

    weights: tuple[float, ...]
    name = "task_arithmetic"

    def coefficients(self, tensors: list[np.ndarray]) -> tuple[list[float], bool]:
        return [1.0 - math.fsum(self.weights), *self.weights], False


Method = Linear | Slerp | TaskArithmetic


def _cosine(a: np.ndarray, b: np.ndarray) -> float | None:
    """cos of the angle between a and b seen as flat vectors (None if either is ~0).

    Products in float32, sums in float64: a float32 running sum over millions of
    elements would move the cosine near 1, exactly where the fallback decides.
    """
    norm_a = math.sqrt(float(np.sum(np.square(a), dtype=np.float64)))
    norm_b = math.sqrt(float(np.sum(np.square(b), dtype=np.float64)))
    if norm_a < _TINY_NORM or norm_b < _TINY_NORM:
        return None
    dot = float(np.sum(a * b, dtype=np.float64))
    return max(-1.0, min(1.0, dot / (norm_a * norm_b)))


def combine(tensors: list[np.ndarray], coefficients: list[float]) -> np.ndarray:
    """sum_k coefficients[k] * tensors[k] in float32 (tensors are float32 arrays of one shape)."""
    merged = None
    for tensor, c in zip(tensors, coefficients, strict=True):
        if c == 0.0:
            continue
        term = tensor * np.float32(c) if c != 1.0 else tensor.copy()
        if merged is None:
            merged = term
        else:
            merged += term
    if merged is None:  # every coefficient 0: the sum is the zero tensor
        return np.zeros_like(tensors[0])
    return merged

"""MXFP4-packed checkpoint tensors (gpt-oss's released experts), dequantized as they are read.

A checkpoint with ``quantization_config.quant_method == "mxfp4"`` stores a weight ``W`` as two
tensors (the OCP Microscaling format, as transformers' ``integrations/mxfp4.py`` reads it):

    W_blocks  uint8 [X, R, G, 16]   two FP4 (E2M1) codes per byte, low nibble first: 32 values per block
    W_scales  uint8 [X, R, G]       one E8M0 exponent per block of 32 (2 ** (scale - 127))

and the weight is ``W[x, g*32 + j, r] = FP4[code j of block (x, r, g)] * 2 ** (scales[x, r, g] - 127)``,
i.e. [X, R, G*32] transposed to [X, G*32, R] (gpt-oss: gate_up_proj [X, E, 2F], down_proj [X, F, E]).
Every such value is exact in bfloat16 (FP4 has a 1-bit mantissa and E8M0 only moves the exponent), so
the dequantized weight is returned in bfloat16, the dtype transformers dequantizes to by default.

``Mxfp4Reader`` wraps a ``SafetensorsReader``: ``W`` reads as its dequantized value wherever the
checkpoint holds ``W_blocks`` and ``W_scales`` instead, one layer's tensor at a time, so import streams
as it does for any checkpoint.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from jaxcpt.errors import HFFormatError

# The 16 FP4 (E2M1) values by code: sign bit 3, then exponent and mantissa (transformers' FP4_VALUES)
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """blocks uint8 [X, R, G, B], scales uint8 [X, R, G] -> the weight [X, G*B*2, R] in bfloat16.

    One expert at a time: a float32 [R, G*B*2] is the largest temporary (gpt-oss-120b: 66 MB), not the layer's.
    """
    if blocks.shape[:-1] != scales.shape or blocks.ndim != 4:
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not belong together")
    x, r, g, b = blocks.shape
    out = np.empty((x, g * b * 2, r), ml_dtypes.bfloat16)
    for expert in range(x):
        codes = np.stack([blocks[expert] & 0x0F, blocks[expert] >> 4], axis=-1)  # [R, G, B, 2]: low nibble first
        values = FP4_VALUES[codes].reshape(r, g, 2 * b)  # [R, G, 2B]
        values = np.ldexp(values, scales[expert].astype(np.int32)[..., None] - 127)  # exact: the exponent moves
        out[expert] = values.reshape(r, g * 2 * b).T.astype(ml_dtypes.bfloat16)  # [G*2B, R]
    return out


def wrap(reader):
    """``reader``, or an ``Mxfp4Reader`` over it when its checkpoint holds MXFP4-packed weights."""
    wrapped = Mxfp4Reader(reader)
    return wrapped if wrapped.packed else reader


class Mxfp4Reader:
    """A ``SafetensorsReader`` on which every MXFP4-packed weight reads as its dequantized tensor."""

    def __init__(self, reader):
        self.reader = reader
        names = set(reader.weight_map)
        self.packed = {name[: -len("_blocks")] for name in names
                       if name.endswith("_blocks") and name[: -len("_blocks")] + "_scales" in names}

    def __getattr__(self, attribute):  # rows, where, weight_map ...: the wrapped reader's
        return getattr(self.reader, attribute)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.packed:
            return self.reader.shape(name)
        x, r, g, b = self.reader.shape(name + "_blocks")
        return (x, g * b * 2, r)

    def get(self, name: str) -> np.ndarray:
        if name not in self.packed:
            return self.reader.get(name)
        with np.errstate(over="ignore"):  # checked below, with the tensor named
            value = dequantize(self.reader.get(name + "_blocks"), self.reader.get(name + "_scales"))
        if not np.isfinite(value).all():
            raise HFFormatError(f"MXFP4 tensor '{name}' in '{self.where(name)}' dequantizes to values beyond bfloat16 "
                                "(scales near 255): the checkpoint is damaged")
        return value

    def where(self, name: str) -> str:
        return self.reader.where(name + "_blocks" if name in self.packed else name)

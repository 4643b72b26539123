"""Moving HF safetensors tensors to and from sharded jax arrays a bounded slice at a time.

Import (``place``): each device's block of a parameter is built on that device from slices of
the files: a stacked parameter one layer's HF tensor at a time, a vocabulary table
(embedding, lm_head) ``block_rows`` vocabulary rows at a time, read with safetensors'
``get_slice`` so that only those rows leave the file. A block bigger than
``HOST_BLOCK_BYTES`` is assembled in place on its device (a zero buffer, each slice
written in with a donated ``dynamic_update_slice``); a smaller one on the host.

Export (``ShardStream``): tensors are appended to the safetensors files as they are
gathered, a vocabulary table block by block.

So beyond the arrays themselves, host memory holds at most one layer's HF tensor of one
parameter or one vocabulary block (``HOST_BLOCK_BYTES``, 4 MiB), a few times
over for its dtype conversion and transpose, whatever the vocabulary. docs/real-size.md
states the bound and benchmarks/real_size.py measures it.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxcpt.errors import HFFormatError
from jaxcpt.hf.mapping import Tensor

# The largest slice import and export hold on the host at once (besides one layer's tensor),
# and the largest device block assembled on the host before it is placed. Measured on glibc:
# with 16 MiB blocks the allocator kept freed blocks, and export memory grew with the number of
# blocks; at 4 MiB it stayed flat (tests/test_hf_roundtrip.py).
HOST_BLOCK_BYTES = 4 * 2**20


class SafetensorsReader:
    """Lazy access to the tensors of one HF directory (one file or an index of shards).

    Each read opens its file and closes it again: safetensors memory-maps the file, and pages
    it has read stay resident (and count in RSS) for as long as the mapping is open.
    """

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.directory = directory
        index_file = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index_file.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFFormatError(f"'{index_file}' is not a valid safetensors index ({e})") from None
            for file in sorted(set(self.weight_map.values())):
                if not (directory / file).is_file():
                    raise HFFormatError(f"shard file '{directory / file}' listed in '{index_file}' is missing")
        elif single.is_file():
            with safe_open(single, framework="numpy") as handle:
                self.weight_map = {name: single.name for name in handle.keys()}
        else:
            raise HFFormatError(f"'{directory}' has neither model.safetensors nor model.safetensors.index.json")

    def _open(self, name: str):
        from safetensors import safe_open

        self._require(name)
        return safe_open(self.directory / self.weight_map[name], framework="numpy")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as handle:
            return tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        with self._open(name) as handle:
            return handle.get_tensor(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor; only those bytes are read."""
        with self._open(name) as handle:
            return handle.get_slice(name)[start:stop]

    def _require(self, name: str) -> None:
        if name not in self.weight_map:
            raise HFFormatError(f"tensor '{name}' is missing from the checkpoint in '{self.directory}'")

    def where(self, name: str) -> str:
        return str(self.directory / self.weight_map[name])


def block_rows(row: Tensor, itemsize: int = 4) -> int:
    """Vocabulary rows per block of a vocabulary table: HOST_BLOCK_BYTES of the jax dtype."""
    return max(1, HOST_BLOCK_BYTES // (int(np.prod(row.hf_shape[1:])) * itemsize))


def _chunks(row: Tensor, reader: SafetensorsReader, bounds: list[tuple[int, int]], num_layers: int,
            itemsize: int) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """(offset in the block, slice in jax layout) covering the device block ``bounds`` of ``row``.

    Padding rows of a vocabulary table are not yielded: the block starts as zeros.
    """
    inner = tuple(slice(a, b) for a, b in bounds)
    if row.experts:  # [L, X, ...]: one expert's HF tensor at a time
        for layer in range(*bounds[0]):
            for expert in range(*bounds[1]):
                tensor = row.to_jax(reader.get(row.hf_name.format(i=row.layer_of(layer), j=expert)))
                offset = (layer - bounds[0][0], expert - bounds[1][0]) + (0,) * (len(bounds) - 2)
                yield offset, tensor[inner[2:]][None, None]
    elif row.stacked:  # [L, ...]: one layer's HF tensor at a time
        for layer in range(*bounds[0]):
            tensor = row.to_jax(reader.get(row.name_at(layer)))
            yield (layer - bounds[0][0],) + (0,) * (len(bounds) - 1), tensor[inner[1:]][None]
    elif row.vocab_axis is not None:  # a vocabulary table: block_rows HF rows at a time
        axis, vocab = row.vocab_axis, row.hf_shape[0]
        start, stop = bounds[axis]
        step = block_rows(row, itemsize)
        for first in range(start, min(stop, vocab), step):
            last = min(first + step, stop, vocab)
            block = row.rows_to_jax(reader.rows(row.hf_name, first, last))  # vocab along ``axis``
            other = tuple(slice(None) if a == axis else inner[a] for a in range(len(bounds)))
            offset = tuple(first - start if a == axis else 0 for a in range(len(bounds)))
            yield offset, block[other]
    else:  # norms, biases, final norm: small
        yield (0,) * len(bounds), row.to_jax(reader.get(row.hf_name))[inner]


@functools.lru_cache(maxsize=None)
def _zeros(shape: tuple[int, ...], dtype, device) -> jax.Array:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=jax.sharding.SingleDeviceSharding(device))


# Writes a slice into a device block in place: the block is donated, so no second copy is made.
_write_into = jax.jit(lambda block, part, *offset: jax.lax.dynamic_update_slice(block, part, offset), donate_argnums=0)


@functools.partial(jax.jit, static_argnums=1, donate_argnums=0)
def _bitcast(block, dtype):
    return jax.lax.bitcast_convert_type(block, dtype)


def _device_block(row: Tensor, reader: SafetensorsReader, bounds, dtype, device, num_layers: int) -> jax.Array:
    shape = tuple(b - a for a, b in bounds)
    itemsize = np.dtype(dtype).itemsize
    chunks = _chunks(row, reader, bounds, num_layers, itemsize)
    if int(np.prod(shape)) * itemsize <= HOST_BLOCK_BYTES:  # small: assemble on the host, place once
        host = np.zeros(shape, dtype)
        for offset, part in chunks:
            host[tuple(slice(o, o + n) for o, n in zip(offset, part.shape))] = part
        return jax.device_put(host, device)
    # XLA:CPU copies a whole bfloat16 buffer on every dynamic_update_slice (measured: 0.31 s per
    # 4 MiB block into a 128256 x 2048 table, 0.008 s as uint16), so 2-byte types are written as
    # their bits and bitcast back once at the end.
    raw = np.dtype(np.uint16) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)
    block = _zeros(shape, raw, device)()
    for offset, part in chunks:
        block = _write_into(block, jax.device_put(part.astype(dtype).view(raw), device), *offset)
    return block if raw == np.dtype(dtype) else _bitcast(block, np.dtype(dtype))


def place(row: Tensor, reader: SafetensorsReader, shape, sharding, dtype, num_layers: int) -> jax.Array:
    """One global array, built device block by device block from slices of the files.

    Devices holding the same block (replication) get copies of the first one's, device to device.
    """
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        bounds = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        by_index.setdefault(bounds, []).append(device)
    blocks = []
    for bounds, devices in by_index.items():
        first = _device_block(row, reader, list(bounds), dtype, devices[0], num_layers)
        blocks += [first] + [jax.device_put(first, d) for d in devices[1:]]
    return jax.make_array_from_single_device_arrays(shape, sharding, blocks)


class ShardStream:
    """Planned safetensors files, written tensor by tensor and block by block as values arrive.

    safetensors' writers (``save_file``, ``save``) take every tensor of a file at once and
    serialise it whole, so they cannot stream. The format is simple enough to write directly:
    a little-endian u64 header length, a JSON header (dtype, shape, byte offsets of every
    tensor), then the raw bytes in header order. Every name and shape is known before any
    value is gathered, so each file's header is written first and the bytes are appended.
    """

    def __init__(self, directory: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, max_bytes: int):
        from jaxcpt.merge.writer import plan_shards

        self.directory, self.dtype = directory, dtype
        self.np_dtype = np.dtype(_numpy(dtype))
        self.shards = plan_shards(tensors, self.np_dtype.itemsize, max_bytes)
        many = len(self.shards) > 1
        self.files = [f"model-{k:05d}-of-{len(self.shards):05d}.safetensors" if many else "model.safetensors"
                      for k in range(1, len(self.shards) + 1)]
        self._order = [(k, name, shape) for k, shard in enumerate(self.shards) for name, shape in shard]
        self._next, self._written, self._handle, self._open_shard = 0, 0, None, -1
        self.total_bytes = 0

    def append(self, name: str, value: np.ndarray) -> None:
        """Append ``value``: the whole tensor ``name`` or its next rows (along axis 0, in order)."""
        if self._next >= len(self._order):
            raise AssertionError(f"every planned tensor is written; got '{name}'")
        shard, expected, shape = self._order[self._next]
        if name != expected or tuple(value.shape[1:]) != tuple(shape[1:]) or value.dtype != self.np_dtype:
            raise AssertionError(f"expected rows of '{expected}' {shape} {self.dtype}, got '{name}' {value.shape} "
                                 f"{value.dtype}")
        if shard != self._open_shard:
            self._close()
            from jaxcpt.merge.writer import _header

            self._handle = open(self.directory / self.files[shard], "wb")
            self._handle.write(_header(self.shards[shard], self.dtype, self.np_dtype.itemsize))
            self._open_shard = shard
        self._handle.write(np.ascontiguousarray(value).view(np.uint8).data)
        self._written += value.shape[0] if shape else 1
        self.total_bytes += value.nbytes
        if self._written > (shape[0] if shape else 1):
            raise AssertionError(f"'{name}' got more than its {shape[0]} rows")
        if self._written == (shape[0] if shape else 1):
            self._next, self._written = self._next + 1, 0

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> dict[str, str]:
        """Close the last file; returns the weight map (tensor name -> file)."""
        if self._next != len(self._order):
            raise AssertionError(f"wrote {self._next} of {len(self._order)} tensors")
        self._close()
        return {name: self.files[k] for k, name, _ in self._order}


def _numpy(dtype: str):
    from jaxcpt.hf.convert import NUMPY_DTYPES

    return NUMPY_DTYPES[dtype]

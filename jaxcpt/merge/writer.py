"""Writing a merged model as an HF directory, one tensor at a time.

safetensors' own writers (``save_file``) take a whole file's tensors at once, which
would hold up to ``max_shard_size`` (5 GB by default) on the host. The format is a
length-prefixed JSON header followed by the raw tensor bytes in header order, and the
merge knows every name, shape and dtype before it reads anything; so the header of each
shard is written first and the tensors are appended as they are merged. The files are
read back by safetensors and transformers in the tests.

Everything goes into a temporary directory next to the target, renamed into place
when complete: a crash leaves no half-written model under the target's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from jaxcpt.errors import UserError

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split (name, shape) pairs, in order, into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _header(entries: list[tuple[str, tuple[int, ...]]], dtype: str, itemsize: int) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        nbytes = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Append tensors, in the planned order, to model.safetensors or model-0000k-of-0000n.safetensors + index."""

    def __init__(self, directory: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: str, max_bytes: int):
        self.directory, self.dtype = directory, dtype
        self.itemsize = np.dtype(_numpy(dtype)).itemsize
        self.shards = plan_shards(tensors, self.itemsize, max_bytes)
        self._files = ["model.safetensors"] if len(self.shards) == 1 else [
            f"model-{k:05d}-of-{len(self.shards):05d}.safetensors" for k in range(1, len(self.shards) + 1)]
        self._pending = [(k, name, shape) for k, shard in enumerate(self.shards) for name, shape in shard]
        self._next = 0
        self._handle = None
        self._open_shard = -1
        self.total_bytes = 0

    def write(self, name: str, value: np.ndarray) -> None:
        shard, expected_name, shape = self._pending[self._next]
        if name != expected_name or tuple(value.shape) != tuple(shape) or value.dtype != _numpy(self.dtype):
            raise AssertionError(f"writer expected '{expected_name}' {shape} {self.dtype}, got '{name}' {value.shape} {value.dtype}")
        if shard != self._open_shard:
            self._close_file()
            self._handle = open(self.directory / self._files[shard], "wb")
            self._handle.write(_header(self.shards[shard], self.dtype, self.itemsize))
            self._open_shard = shard
        self._handle.write(np.ascontiguousarray(value).view(np.uint8).data)
        self.total_bytes += value.nbytes
        self._next += 1

    def _close_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def finish(self) -> list[str]:
        """Close the last file and write the index (several shards); returns the weight files."""
        if self._next != len(self._pending):
            raise AssertionError(f"writer got {self._next} of {len(self._pending)} tensors")
        self._close_file()
        if len(self.shards) > 1:
            weight_map = {name: self._files[k] for k, name, _ in self._pending}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return list(self._files)


def _numpy(dtype: str):
    from jaxcpt.hf.convert import NUMPY_DTYPES

    return NUMPY_DTYPES[dtype]


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool):
    """Yield a temporary directory beside ``target``; on success it becomes ``target``, on error it is removed."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise UserError(f"'{target}' exists and is not empty; choose another --out or pass --overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    os.replace(tmp, target)

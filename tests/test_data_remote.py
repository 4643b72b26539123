"""Sources in buckets, offline: fsspec's memory file system and a fake bucket (ranged reads counted,
transient failures, permission and missing-object errors)."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.config import ConfigError
from jaxcpt.data import remote
from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.data.sources import Unit, read_unit
from jaxcpt.errors import UserError


class FakeBucket(AbstractFileSystem):
    """An object store in a dict: ranged reads only (counted), objects under 'denied/' refuse to open,
    and the first ``failures`` reads of each object raise a dropped connection."""

    protocol = "fakebucket"
    objects: dict[str, bytes] = {}
    fetched = 0
    failures = 0
    _failed: dict[str, int] = {}

    def ls(self, path, detail=True, **kw):
        path = self._strip_protocol(path).rstrip("/")
        names = sorted({k if "/" not in k[len(path) + 1:] else k[: len(path) + 1 + k[len(path) + 1:].index("/")]
                        for k in self.objects if k.startswith(path + "/")})
        if not names and path not in self.objects:
            raise FileNotFoundError(path)
        if path in self.objects:
            names = [path]
        out = [{"name": n, "size": len(self.objects.get(n, b"")), "type": "file" if n in self.objects else "directory"}
               for n in names]
        return out if detail else [o["name"] for o in out]

    def info(self, path, **kw):
        path = self._strip_protocol(path).rstrip("/")
        if path in self.objects:
            return {"name": path, "size": len(self.objects[path]), "type": "file"}
        if any(k.startswith(path + "/") for k in self.objects):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    def _open(self, path, mode="rb", block_size=None, **kw):
        path = self._strip_protocol(path)
        if path.startswith("denied/") or "/denied/" in path:
            raise PermissionError(f"403 Forbidden: {path}")
        return _FakeObject(self, path, mode, block_size=block_size or 1024, cache_type="bytes")


class _FakeObject(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        fs = self.fs
        failed = fs._failed.get(self.path, 0)
        if failed < fs.failures:
            fs._failed[self.path] = failed + 1
            raise ConnectionResetError("connection reset by peer")
        data = fs.objects[self.path][start:end]
        type(fs).fetched += len(data)
        return data


fsspec.register_implementation("fakebucket", FakeBucket, clobber=True)


@pytest.fixture(autouse=True)
def fresh_bucket(monkeypatch):
    FakeBucket.objects, FakeBucket.fetched, FakeBucket.failures, FakeBucket._failed = {}, 0, 0, {}
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.0)
    FakeBucket.clear_instance_cache()


def _local_corpus(root):
    write_jsonl(str(root / "a.jsonl"), make_texts(40, seed=1))
    pq.write_table(pa.table({"text": make_texts(40, seed=2)}), str(root / "b.parquet"), row_group_size=10)
    return {name: (root / name).read_bytes() for name in ("a.jsonl", "b.parquet")}


def _batches(paths, steps=3):
    cfg = data_config(sources=[{"name": "s", "paths": paths}], tokenizer=sp_model(), seq_len=32, shuffle_buffer=8,
                      packing_bins=2, tokenize_batch_size=8)
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    return [next(it) for _ in range(steps)]


def _assert_same(a, b):
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_memory_bucket_jsonl_and_parquet_train_like_the_local_files(tmp_path):
    files = _local_corpus(tmp_path)
    fs = fsspec.filesystem("memory")
    for name, data in files.items():
        fs.pipe(f"/jaxcpt-test-bucket/corpus/{name}", data)
    try:
        _assert_same(_batches(["memory://jaxcpt-test-bucket/corpus"]), _batches([str(tmp_path)]))
        _assert_same(_batches(["memory://jaxcpt-test-bucket/corpus/*.parquet"]),
                     _batches([str(tmp_path / "*.parquet")]))
    finally:
        fs.rm("/jaxcpt-test-bucket", recursive=True)


def test_fake_bucket_reads_a_row_group_in_ranges_and_survives_dropped_connections(tmp_path):
    pq.write_table(pa.table({"text": make_texts(300, seed=3, min_words=200, max_words=300)}), str(tmp_path / "b.parquet"),
                   row_group_size=100)
    data = (tmp_path / "b.parquet").read_bytes()
    FakeBucket.objects = {"bkt/b.parquet": data}
    FakeBucket.failures = 2  # the first two reads of the object fail
    local = [r for _, r in read_unit(Unit(str(tmp_path / "b.parquet"), "parquet", 2), 0, "text", "per_file")]
    FakeBucket.fetched = 0
    got = [r for _, r in read_unit(Unit("fakebucket://bkt/b.parquet", "parquet", 2), 0, "text", "per_file")]
    assert got == local and len(got) == 100
    assert FakeBucket.fetched < 0.6 * len(data)  # the last row group and the footer, not the file


def test_fake_bucket_jsonl_trains_like_local_after_transient_failures(tmp_path):
    files = _local_corpus(tmp_path)
    FakeBucket.objects = {f"bkt/data/{n}": d for n, d in files.items()}
    FakeBucket.failures = 1
    _assert_same(_batches(["fakebucket://bkt/data/a.jsonl"]), _batches([str(tmp_path / "a.jsonl")]))


def test_persistent_failure_stops_after_the_retries(tmp_path):
    FakeBucket.objects = {"bkt/a.jsonl": b'{"text": "x"}\n'}
    FakeBucket.failures = remote.RETRIES + 1
    with pytest.raises(remote.RemoteReadError, match=f"failed {remote.RETRIES + 1} times; last error ConnectionResetError"):
        list(read_unit(Unit("fakebucket://bkt/a.jsonl", "jsonl", -1), 0, "text", "per_file"))


def test_permission_denied_names_the_credentials_and_gcsfuse():
    FakeBucket.objects = {"bkt/denied/a.jsonl": b'{"text": "x"}\n'}
    with pytest.raises(UserError, match="permission denied reading 'fakebucket://bkt/denied/a.jsonl'.*gcsfuse"):
        _batches(["fakebucket://bkt/denied/a.jsonl"], steps=1)


def test_missing_object_and_missing_backend_are_errors_naming_the_fix(monkeypatch):
    FakeBucket.objects = {"bkt/a.jsonl": b'{"text": "x"}\n'}
    with pytest.raises(ConfigError, match="'fakebucket://bkt/b.jsonl' does not exist"):
        _batches(["fakebucket://bkt/b.jsonl"], steps=1)
    with pytest.raises(ConfigError, match="matches no file"):
        _batches(["fakebucket://bkt/*.parquet"], steps=1)

    def no_backend(proto, **kw):
        raise ImportError("Install gcsfs to access Google Storage")

    monkeypatch.setattr(fsspec, "filesystem", no_backend)
    with pytest.raises(ConfigError, match="no file system for 'gs://'.*pip install gcsfs"):
        _batches(["gs://bucket/corpus/*.jsonl"], steps=1)

"""Exports to remote (gs://) targets: written through etils/fsspec, config.json last, loadable once copied back."""

import gc
import os

import fsspec
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem
from safetensors.numpy import load_file

from jaxcpt.errors import UserError
from jaxcpt.hf.convert import save_hf
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh

CFG = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=2)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, build_mesh({"fsdp": -1}), seed=0)


class _RecordingMemoryFS(MemoryFileSystem):
    """An in-memory stand-in for GCS (no network here) that records the order files are written."""

    written: list[str] = []

    def _open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            _RecordingMemoryFS.written.append(path.rsplit("/", 1)[-1])
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
    for protocol in ("gs", "gcs"):  # etils asks fsspec for "gcs"
        fsspec.register_implementation(protocol, _RecordingMemoryFS, clobber=True)
    _RecordingMemoryFS.written = []
    yield _RecordingMemoryFS()
    _RecordingMemoryFS.store.clear()
    _RecordingMemoryFS.pseudo_dirs[:] = [""]


def test_export_to_a_gs_url_matches_a_local_export_and_writes_config_last(model, tmp_path, fake_gcs):
    save_hf(model, tmp_path / "local", dtype="float32")
    save_hf(model, "gs://bucket/runs/a/hf/step_3", dtype="float32")
    assert _RecordingMemoryFS.written[-1] == "config.json"
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(_RecordingMemoryFS.written)
    copied = tmp_path / "copied"
    copied.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copied / name).write_bytes(epath.Path(f"gs://bucket/runs/a/hf/step_3/{name}").read_bytes())
    local, remote = load_file(tmp_path / "local" / "model.safetensors"), load_file(copied / "model.safetensors")
    assert local.keys() == remote.keys()
    for key in local:
        np.testing.assert_array_equal(local[key], remote[key])
    assert (copied / "config.json").read_text() == (tmp_path / "local" / "config.json").read_text()


def test_existing_remote_export_is_refused_unless_overwrite(model, fake_gcs):
    save_hf(model, "gs://bucket/exp", dtype="float32")
    with pytest.raises(UserError, match="exists and is not empty"):
        save_hf(model, "gs://bucket/exp", dtype="float32")
    stale = epath.Path("gs://bucket/exp/stale.txt")
    stale.write_text("from an earlier export")
    save_hf(model, "gs://bucket/exp", dtype="float32", overwrite=True)
    assert not stale.exists() and epath.Path("gs://bucket/exp/config.json").exists()


# -- faults (#20.10): a failed export leaves nothing behind; --overwrite swaps, never deletes first --
def _staging_leftovers(parent):
    return [name for name in os.listdir(parent) if ".tmp-" in name or ".old-" in name]


def test_a_failed_export_leaves_no_staging_directory(model, tmp_path, monkeypatch):
    from jaxcpt.hf import tensor_io

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensor_io.ShardStream, "append", full_disk)  # the writer of every tensor of an export
    with pytest.raises(OSError, match="No space left"):
        save_hf(model, tmp_path / "step_3", dtype="float32")
    gc.collect()
    assert os.listdir(tmp_path) == []


def test_a_staging_directory_left_by_a_killed_export_is_removed_by_the_next_one(model, tmp_path):
    (tmp_path / ".step_3.tmp-abc123").mkdir()  # what kill -9 mid-export leaves
    (tmp_path / ".step_3.tmp-abc123" / "model.safetensors").write_bytes(b"half")
    save_hf(model, tmp_path / "step_3", dtype="float32")
    assert os.listdir(tmp_path) == ["step_3"]


def test_overwrite_keeps_the_old_export_when_the_new_one_cannot_be_put_in_place(model, tmp_path, monkeypatch):
    import jaxcpt.hf.convert as convert

    target = tmp_path / "step_3"
    save_hf(model, target, dtype="float32")
    before = (target / "model.safetensors").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".tmp-" in os.path.basename(str(src)):  # renaming the new export into place fails
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(convert.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        save_hf(model, target, dtype="float32", overwrite=True)
    monkeypatch.undo()
    gc.collect()
    assert (target / "model.safetensors").read_bytes() == before and (target / "config.json").exists()
    assert _staging_leftovers(tmp_path) == []


def test_an_overwrite_interrupted_between_its_renames_is_repaired_by_the_next_export(model, tmp_path):
    save_hf(model, tmp_path / "step_3", dtype="float32")
    os.replace(tmp_path / "step_3", tmp_path / ".step_3.old-x1")  # the old export set aside, then a crash
    with pytest.raises(UserError, match="exists and is not empty"):  # it is back under its name, so refused
        save_hf(model, tmp_path / "step_3", dtype="float32")
    assert sorted(os.listdir(tmp_path)) == ["step_3"] and (tmp_path / "step_3" / "config.json").exists()


def test_overwriting_a_remote_export_uploads_the_new_one_before_removing_the_old(model, fake_gcs, monkeypatch):
    save_hf(model, "gs://bucket/exp", dtype="float32")
    old = epath.Path("gs://bucket/exp/model.safetensors").read_bytes()
    real_open = _RecordingMemoryFS._open

    def failing_upload(self, path, mode="rb", **kwargs):
        if "w" in mode and path.endswith("model.safetensors"):
            raise OSError(5, "connection reset during upload")
        return real_open(self, path, mode, **kwargs)

    monkeypatch.setattr(_RecordingMemoryFS, "_open", failing_upload)
    with pytest.raises(OSError, match="connection reset"):
        save_hf(model, "gs://bucket/exp", dtype="float32", overwrite=True)
    monkeypatch.undo()
    assert epath.Path("gs://bucket/exp/model.safetensors").read_bytes() == old
    assert epath.Path("gs://bucket/exp/config.json").exists()

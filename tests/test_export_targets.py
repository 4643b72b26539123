"""Exports to remote (gs://) targets: written through etils/fsspec, config.json last, loadable once copied back."""

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


def test_export_to_a_gs_url_matches_a_local_export_and_writes_config_last(tmp_path, fake_gcs):
    model = init_model(CFG, build_mesh({"fsdp": -1}), seed=0)
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


def test_existing_remote_export_is_refused_unless_overwrite(fake_gcs):
    model = init_model(CFG, build_mesh({"fsdp": -1}), seed=0)
    save_hf(model, "gs://bucket/exp", dtype="float32")
    with pytest.raises(UserError, match="exists and is not empty"):
        save_hf(model, "gs://bucket/exp", dtype="float32")
    stale = epath.Path("gs://bucket/exp/stale.txt")
    stale.write_text("from an earlier export")
    save_hf(model, "gs://bucket/exp", dtype="float32", overwrite=True)
    assert not stale.exists() and epath.Path("gs://bucket/exp/config.json").exists()

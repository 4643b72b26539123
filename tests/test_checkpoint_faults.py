"""Damaged and hostile checkpoints, and what a checkpoint keeps besides the state (issues 19 and 20).

Checkpoints here are written by ``Checkpointer`` with a stand-in state (the JSON items are the
ones a run writes); ``set_up(cfg, check=True)`` is the start-up of ``jaxcpt train`` up to, not
including, reading the state, so these tests see what a resume would see without training.
The slow tests at the end train for real.
"""

import base64
import glob
import os
import shutil
import tempfile

import jax.numpy as jnp
import pytest
from train_helpers import make_corpora, tiny_overrides, train_losses

from jaxcpt import checkpoint as ck
from jaxcpt.config import to_dict
from jaxcpt.errors import UserError
from jaxcpt.train import resume as resume_lib
from jaxcpt.train.config import load_train_config
from jaxcpt.train.setup import set_up

SYNC = ck.CheckpointConfig(every_steps=2, async_save=False)
STATE = {"w": jnp.arange(4096, dtype=jnp.float32)}  # 16 KB, so truncating its data file damages it


def _config(tmp_path, *extra):
    corpora = make_corpora(tmp_path / "data")
    return load_train_config(None, tiny_overrides(tmp_path / "run", corpora, steps=8)
                             + ["checkpoint.every_steps=2", *extra])


def _hf_config(tmp_path, hf):
    """A run that starts from the HF directory ``hf`` (its tokenizer is the data tokenizer)."""
    corpora = make_corpora(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora, steps=8) if not o.startswith(("model.", "data.tokenizer"))]
    return load_train_config(None, overrides + ["checkpoint.every_steps=2", "init.source=hf", f"init.path={hf}"])


def _meta(cfg):
    return {"model_config": to_dict(cfg.model), "eval_history": []}  # the tiny model of tiny_overrides


def _write_steps(cfg, steps, files, meta=None):
    directory = os.path.join(cfg.run_dir, "checkpoints")
    with ck.Checkpointer(directory, SYNC) as ckpt:
        for step in steps:
            ckpt.save(step, STATE, {"hosts": []}, meta or _meta(cfg), files=files, force=True)
    return directory


def _legacy_files_item(data_tokenizer: str, export_dir: str | None = None) -> dict:
    """The files item as jaxcpt wrote it before tokenizer copies were kept once (0acb231)."""
    def encode(paths):
        return {name: base64.b64encode(open(path, "rb").read()).decode("ascii") for name, path in paths.items()}

    name = os.path.basename(data_tokenizer)
    out = {"data_tokenizer": {"kind": "file", "name": name, "files": encode({name: data_tokenizer})}}
    if export_dir:
        out["export_tokenizer"] = encode({n: os.path.join(export_dir, n) for n in sorted(os.listdir(export_dir))})
    return out


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


# -- every item is read inside the fallback ----------------------------------------------
@pytest.mark.parametrize("item", ["files", "meta", "data"])
def test_truncated_json_item_of_the_newest_step_falls_back_to_the_previous_step(tmp_path, item):
    cfg = _config(tmp_path)
    files = resume_lib.encode_tokenizers(resume_lib.tokenizer_files_for_start(cfg, None))
    directory = _write_steps(cfg, (2, 4), files)
    _truncate(os.path.join(directory, "4", item, "metadata"))
    setup = set_up(cfg, check=True)  # 0acb231: json.JSONDecodeError out of train/setup.py
    setup.close()
    assert setup.resume_from.step == 2
    [(step, (reason, why))] = setup.resume_from.damaged
    assert step == 4 and reason.startswith(f"{item}-") and why.startswith(f"{item} item:")
    assert "step 4 cannot be read" in setup.describe()
    assert sorted(os.listdir(directory)) == ["2", "4", "tokenizers"]  # --check moves nothing


def test_no_readable_step_stops_with_the_reason_of_each(tmp_path):
    cfg = _config(tmp_path)
    directory = _write_steps(cfg, (2, 4), None)
    for step in ("2", "4"):
        _truncate(os.path.join(directory, step, "meta", "metadata"))
    with pytest.raises(UserError, match=r"no checkpoint in .* reads: step 4: meta item: .*; step 2: meta item"):
        set_up(cfg, check=True)


# -- a damaged step is moved aside and saving resumes on time -------------------------------
def _damage_state(directory, step):
    files = [f for f in glob.glob(os.path.join(directory, str(step), "state", "**"), recursive=True)
             if os.path.isfile(f)]
    _truncate(max(files, key=os.path.getsize), keep=0.3)


def test_damaged_newest_step_is_moved_aside_and_the_next_due_step_is_saved(tmp_path):
    directory = str(tmp_path / "ckpt")
    abstract = {"w": jnp.zeros(4096).astype(jnp.float32)}
    with ck.Checkpointer(directory, SYNC) as ckpt:
        for step in (2, 4, 6):
            ckpt.save(step, {"w": STATE["w"] + step}, {"step": step}, {})
    _damage_state(directory, 6)
    with ck.Checkpointer(directory, SYNC) as ckpt:  # a resume
        restored = ckpt.restore_newest(abstract)
        assert restored.step == 4 and restored.data == {"step": 4}
        assert [s for s, _ in restored.skipped] == [6]
        assert ckpt.latest_step() == 4
        moved = sorted(os.listdir(os.path.join(directory, "damaged")))
        assert len(moved) == 2 and moved[0].startswith("6-state-") and moved[1] == "README.txt"
        assert ckpt.should_save(6)  # 0acb231: False (the damaged 6 still counted as the latest)
        assert ckpt.save(6, {"w": STATE["w"] + 60}, {"step": 6}, {})
    # A crash after the new step-6 save: the next resume starts there, not at 4 again.
    with ck.Checkpointer(directory, SYNC) as ckpt:
        again = ckpt.restore_newest(abstract)
    assert again.step == 6 and again.skipped == [] and float(again.state["w"][0]) == 60.0


def test_a_step_skipped_at_start_up_is_moved_aside_when_the_state_is_restored(tmp_path):
    cfg = _config(tmp_path)
    files = resume_lib.encode_tokenizers(resume_lib.tokenizer_files_for_start(cfg, None))
    directory = _write_steps(cfg, (2, 4), files)
    _truncate(os.path.join(directory, "4", "files", "metadata"))
    setup = set_up(cfg, check=True)
    setup.close()
    with ck.Checkpointer(directory, SYNC) as ckpt:
        restored = ckpt.restore_newest({"w": STATE["w"]}, setup.resume_from)
        assert restored.step == 2 and [s for s, _ in restored.skipped] == [4]
        assert ckpt.all_steps() == [2] and ckpt.should_save(4)
    assert [n.split("-")[:2] for n in sorted(os.listdir(os.path.join(directory, "damaged")))] == [["4", "files"], ["README.txt"]]


# -- the files item: tokenizer files only, kept once --------------------------------------
def _hf_start_dir(root):
    """An HF model directory: the Llama-style tokenizer beside a 3 MB safetensors file and other model files."""
    from safetensors.numpy import save_file
    from tokenizer_fixtures import llama_style_tokenizer_dir
    import numpy as np

    shutil.copytree(llama_style_tokenizer_dir(), root)
    save_file({"w": np.zeros((768, 1024), np.float32)}, os.path.join(root, "model.safetensors"))  # 3 MiB
    for name in ("config.json", "optimizer.pt", "tokenizer_notes.txt"):
        with open(os.path.join(root, name), "w") as f:
            f.write("{}")
    return root


def _non_state_bytes(step_dir):
    return sum(os.path.getsize(f) for item in os.listdir(step_dir) if item != "state"
               for f in glob.glob(os.path.join(step_dir, item, "**"), recursive=True) if os.path.isfile(f))


def test_checkpoints_of_an_hf_start_refer_to_one_copy_of_the_tokenizer_files(tmp_path):
    hf = _hf_start_dir(str(tmp_path / "hf"))
    cfg = _hf_config(tmp_path, hf)
    files = resume_lib.encode_tokenizers(resume_lib.tokenizer_files_for_start(cfg, hf))
    directory = _write_steps(cfg, (2, 4, 6), files, _meta(_config(tmp_path)))
    for step in ("2", "4", "6"):
        assert _non_state_bytes(os.path.join(directory, step)) < 2**20  # 0acb231: 4 MB, the weights in base64
    [bundle] = os.listdir(os.path.join(directory, "tokenizers"))
    stored = sorted(os.listdir(os.path.join(directory, "tokenizers", bundle)))
    assert stored == sorted(n for n in os.listdir(hf) if n in {"tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                                                 "special_tokens_map.json", "added_tokens.json"})
    shutil.rmtree(hf)  # resume from the checkpoints alone: the tokenizer is read from the one copy
    setup = set_up(cfg, check=True)
    setup.close()
    assert setup.tokenizers.data == setup.tokenizers.export == os.path.join(directory, "tokenizers", bundle)
    from jaxcpt.open_model import checkpoint_tokenizer_dir as tokenizer_dir_for  # export-hf / evaluate / merge of one step

    assert tokenizer_dir_for(os.path.join(directory, "4")) == os.path.join(directory, "tokenizers", bundle)


def test_a_damaged_stored_tokenizer_is_named_not_used(tmp_path):
    hf = _hf_start_dir(str(tmp_path / "hf"))
    cfg = _hf_config(tmp_path, hf)
    files = resume_lib.encode_tokenizers(resume_lib.tokenizer_files_for_start(cfg, hf))
    directory = _write_steps(cfg, (2,), files, _meta(_config(tmp_path)))
    shutil.rmtree(hf)
    [victim] = glob.glob(os.path.join(directory, "tokenizers", "*", "tokenizer.json"))
    _truncate(victim)
    with pytest.raises(UserError, match=r"tokenizer.json. does not match the digest .* Set data.tokenizer"):
        set_up(cfg, check=True)


def test_checkpoints_written_before_the_tokenizer_store_still_resume(tmp_path):
    from test_data_fixtures import sp_model
    from tokenizer_fixtures import llama_style_tokenizer_dir

    sp = shutil.copy(sp_model(), tmp_path / "gone.model")
    export_dir = _hf_start_dir(str(tmp_path / "hf"))
    cfg = _config(tmp_path, f"data.tokenizer={sp}")
    _write_steps(cfg, (2,), _legacy_files_item(str(sp), export_dir))
    os.remove(sp)
    setup = set_up(cfg, check=True)
    try:
        assert open(setup.tokenizers.data, "rb").read() == open(sp_model(), "rb").read()
        assert os.path.basename(setup.tokenizers.data) == "gone.model"
        shipped = set(os.listdir(setup.tokenizers.export))
        assert shipped == set(os.listdir(llama_style_tokenizer_dir()))  # the weights it also held stay out
    finally:
        setup.close()
    from jaxcpt.open_model import checkpoint_tokenizer_dir as tokenizer_dir_for  # export-hf / evaluate / merge of that step

    assert set(os.listdir(tokenizer_dir_for(os.path.join(cfg.run_dir, "checkpoints", "2")))) == shipped


# -- names inside a checkpoint ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["export_tokenizer", "data_tokenizer"])
def test_a_checkpoint_naming_files_outside_its_directory_is_refused(tmp_path, monkeypatch, where):
    from test_data_fixtures import sp_model

    sp_model()  # built before tempdir moves
    deep = tmp_path / "a" / "b" / "c" / "d" / "tmp"  # so that a write through '..' would still land in tmp_path
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    hostile = "../../../../outside_victim.txt"
    payload = base64.b64encode(b"written by a checkpoint").decode()
    if where == "export_tokenizer":  # the data tokenizer is there; the export copy is read from the checkpoint
        cfg = _config(tmp_path)
        item = {"export_tokenizer": {hostile: payload}}
    else:
        cfg = _config(tmp_path, f"data.tokenizer={tmp_path / 'gone.model'}")
        item = {"data_tokenizer": {"kind": "file", "name": "tok.model", "files": {hostile: payload}}}
    _write_steps(cfg, (2,), item)
    try:
        set_up(cfg, check=True)  # nothing to close: it must fail
        error = None
    except UserError as e:
        error = str(e)
    assert not list(tmp_path.rglob("outside_victim.txt"))  # 0acb231: written to tmp_path/a/b/c/
    assert not os.path.exists("/outside_victim.txt")
    assert error and "'../../../../outside_victim.txt', which would be written outside its directory" in error


def test_stored_names_are_checked_against_the_allow_list():
    from jaxcpt.checkpoint_files import UnsafeCheckpointError, check_stored_name

    for name in ("tokenizer.json", "chat_template.jinja", "additional_chat_templates/tool_use.jinja"):
        assert check_stored_name(name, "x") == name
    for name in ("../tokenizer.json", "/etc/passwd", "a/tokenizer.json", "..", "", "tok\\..\\x",
                 "additional_chat_templates/../../x.jinja", "model.safetensors"):
        with pytest.raises(UnsafeCheckpointError):
            check_stored_name(name, "x")
    assert check_stored_name("my_sp.model", "x", allow_unlisted=True) == "my_sp.model"


# -- temporary directories --------------------------------------------------------------------
def test_temporary_tokenizer_copies_are_removed_when_set_up_fails_and_at_close(tmp_path, monkeypatch):
    from test_data_fixtures import sp_model

    sp_model()
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    sp = shutil.copy(sp_model(), tmp_path / "gone.model")
    cfg = _config(tmp_path, f"data.tokenizer={sp}")
    os.remove(sp)  # so the checkpoint's copy is used: an old checkpoint's goes to a temporary directory
    # A set-up that fails after copying the tokenizer: a model whose embedding is smaller than the tokenizer.
    meta = _meta(cfg)
    meta["model_config"] = {**meta["model_config"], "vocab_size": 64}
    directory = _write_steps(cfg, (2,), _legacy_files_item(str(sp_model())), meta)
    with pytest.raises(UserError, match="embedding"):
        set_up(cfg, check=True)
    assert os.listdir(scratch_root) == []  # 0acb231: jaxcpt-tokenizer-* stays behind
    shutil.rmtree(directory)
    _write_steps(cfg, (2,), _legacy_files_item(str(sp_model())))
    setup = set_up(cfg, check=True)
    assert setup.tokenizers.data.startswith(str(scratch_root)) and os.path.exists(setup.tokenizers.data)
    setup.close()
    assert os.listdir(scratch_root) == []


# -- gs:// paths --------------------------------------------------------------------------------
@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// served from memory through fsspec, as etils.epath reads it (no network, no gcsfs)."""
    import fsspec
    from etils.epath import backend
    from fsspec.implementations.memory import MemoryFileSystem

    class FakeGCS(MemoryFileSystem):
        protocol = ("gs", "gcs")
        store, pseudo_dirs = {}, [""]  # its own, not the memory:// filesystem's

    fake = FakeGCS()
    monkeypatch.setattr(backend.fsspec_backend, "fs", lambda path: fake if os.fspath(path).startswith("gs://")
                        else fsspec.filesystem("file"))
    yield fake


def test_tokenizer_dir_for_a_gs_checkpoint_keeps_the_scheme(fake_gcs):
    from etils import epath

    from jaxcpt.open_model import checkpoint_tokenizer_dir as tokenizer_dir_for

    (epath.Path("gs://bucket/run/tokenizer") / "tokenizer.json").write_text("{}")
    (epath.Path("gs://bucket/run/checkpoints/5") / "state").mkdir(parents=True)
    assert tokenizer_dir_for("gs://bucket/run/checkpoints/5") == "gs://bucket/run/tokenizer"
    assert tokenizer_dir_for(epath.Path("gs://bucket/run/checkpoints/5")) == "gs://bucket/run/tokenizer"


def test_a_stored_tokenizer_in_a_bucket_is_copied_to_local_disk(fake_gcs, tmp_path):
    from etils import epath

    from jaxcpt import checkpoint_files as files_lib

    source = tmp_path / "tok"
    source.mkdir()
    (source / "tokenizer.json").write_text('{"a": 1}')
    bundle = files_lib.bundle_of({"tokenizer.json": source / "tokenizer.json"})
    ckpt_dir = epath.Path("gs://bucket/run/checkpoints")
    files_lib.write_bundle(ckpt_dir, bundle)
    scratch = files_lib.ScratchDirs()
    local = files_lib.bundle_dir(ckpt_dir, bundle.reference(), scratch)
    assert "://" not in str(local) and (local / "tokenizer.json").read_text() == '{"a": 1}'
    scratch.close()
    assert not local.exists()


# -- through training (slow) ------------------------------------------------------------------
def _hf_run_overrides(tmp_path, corpora, name, steps):
    overrides = [o for o in tiny_overrides(tmp_path / name, corpora, steps=steps)
                 if not o.startswith(("model.", "data.tokenizer"))]
    return overrides + ["init.source=hf", f"init.path={tmp_path / 'hf'}", "checkpoint.every_steps=2",
                        "model.dtype=float32",
                        "data.tokenizer_min_vocab_fraction=0"]  # the 6,144-row embedding is spare on purpose (a multi-MB file)


def _save_hf_start(directory):
    """A tiny Llama written by transformers whose safetensors file is multi-MB (a 6,144-row embedding)."""
    import torch
    from tokenizer_fixtures import llama_style_tokenizer_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=6144, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    for name in os.listdir(llama_style_tokenizer_dir()):
        shutil.copy(os.path.join(llama_style_tokenizer_dir(), name), os.path.join(directory, name))
    assert os.path.getsize(os.path.join(directory, "model.safetensors")) > 3 * 2**20


@pytest.mark.slow
def test_hf_start_checkpoints_stay_small_and_a_damaged_newest_step_resumes_and_saves_on_time(tmp_path, capsys):
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")
    _save_hf_start(tmp_path / "hf")
    train(load_train_config(None, _hf_run_overrides(tmp_path, corpora, "run", 4)))
    expected = train_losses(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    for step in ("2", "4"):  # 0acb231: 4.4 MB each, the 3.1 MB safetensors file in base64
        assert _non_state_bytes(ckpt / step) < 2**20
    # The newest step's tokenizer item is torn; the run directory's own tokenizer copy is gone too.
    _truncate(ckpt / "4" / "files" / "metadata")
    shutil.rmtree(tmp_path / "run" / "tokenizer")
    capsys.readouterr()
    train(load_train_config(None, _hf_run_overrides(tmp_path, corpora, "run", 6)))  # 0acb231: JSONDecodeError
    out = capsys.readouterr().out
    assert f"checkpoint step 4 in {ckpt} cannot be read (files item: JSONDecodeError" in out
    assert f"resuming from {ckpt / '2'}" in out
    assert f"moved damaged checkpoint step 4 to {ckpt / 'damaged' / '4-files-JSONDecodeError'}" in out
    got = train_losses(tmp_path / "run")
    assert [got[s] for s in (3, 4)] == [expected[s] for s in (3, 4)]  # retrained from step 2, bitwise
    # Step 4 was saved again on time (a crash between 4 and 6 resumes from 4, not 2).
    point = ck.find_resume_point(ckpt)
    assert ck.Checkpointer(ckpt, SYNC).all_steps() == [2, 4, 6] and point.step == 6 and not point.damaged
    shutil.rmtree(ckpt / "6")
    assert ck.find_resume_point(ckpt).step == 4
    assert len(os.listdir(ckpt / "tokenizers")) == 1

"""Preemption: a run killed (SIGKILL) or stopped (SIGTERM) resumes exactly where an uninterrupted run would be.

Equality is bitwise: on CPU the same compiled step on the same state and the same
data gives the same bits, so any difference means lost or repeated data or state.
"""

import os
import signal

import numpy as np
import pytest
from train_helpers import make_corpora, run_cli, tiny_overrides, train_losses, wait_for

from jaxcpt.checkpoint import Checkpointer
from jaxcpt.train.config import load_train_config
from jaxcpt.train.loop import train

pytestmark = pytest.mark.slow

# wide enough that a step takes a noticeable time, so the kill lands mid-run
SHAPE = dict(width=128, seq_len=64, batch=16)


def final_params(run_dir):
    from jaxcpt.checkpoint import restore_params
    from jaxcpt.model.config import ModelConfig
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.sharding.rules import make_rules
    from jaxcpt.checkpoint import read_meta
    from jaxcpt.config import from_dict

    cfg = from_dict(ModelConfig, read_meta(os.path.join(run_dir, "checkpoints"))["model_config"])
    params = restore_params(os.path.join(run_dir, "checkpoints"), abstract_params(cfg, build_mesh({"data": 8}), make_rules()))
    return {k: np.asarray(v) for k, v in _flat(params).items()}


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_resume_after_sigkill_matches_straight_run(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    straight = tmp_path / "straight"
    train(load_train_config(None, tiny_overrides(straight, corpora, steps=20, **SHAPE) + ["checkpoint.every_steps=10"]))

    killed = tmp_path / "killed"
    args = ["train", *tiny_overrides(killed, corpora, steps=20, **SHAPE), "checkpoint.every_steps=10"]
    proc = run_cli(args)
    wait_for(lambda: (killed / "checkpoints" / "10" / "state").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # really killed mid-run, not finished
    assert 10 <= max(train_losses(killed)) < 20

    resumed = run_cli(args)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output

    expected, got = train_losses(straight), train_losses(killed)
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(1, 21)] == [expected[s] for s in range(1, 21)]  # bitwise
    a, b = final_params(straight), final_params(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def test_sigterm_saves_at_a_step_boundary_and_exits_75(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides(run_dir, corpora, steps=200, **SHAPE)]
    proc = run_cli(args)
    wait_for(lambda: len(train_losses(run_dir)) >= 3 if (run_dir / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 75, output  # jaxcpt.exit_codes.EXIT_STOPPED_EARLY: saved, run again to resume
    assert "saved checkpoint at step" in output
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and saved == max(train_losses(run_dir)) < 200

    resumed = run_cli([*args, f"train.steps={saved + 3}"])  # the last override wins
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming from {run_dir / 'checkpoints' / str(saved)}" in output
    assert sorted(train_losses(run_dir)) == list(range(1, saved + 4))


def _hf_run(tmp_path, corpora, name, steps, extra=()):
    """Overrides for a run that starts from an HF directory (tiny Llama + the Llama-style tokenizer)."""
    overrides = [o for o in tiny_overrides(tmp_path / name, corpora, steps=steps) if not o.startswith(("model.", "data.tokenizer"))]
    return overrides + ["init.source=hf", f"init.path={tmp_path / 'hf'}", f"checkpoint.directory={tmp_path / (name + '_ckpt')}",
                        "checkpoint.every_steps=3", "export.final=true", "export.dtype=float32", *extra]


def _save_tiny_hf(directory, rope_theta=10000.0):
    import shutil

    import torch
    from tokenizer_fixtures import llama_style_tokenizer_dir
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rope_theta=rope_theta)).save_pretrained(directory)
    for name in os.listdir(llama_style_tokenizer_dir()):
        shutil.copy(os.path.join(llama_style_tokenizer_dir(), name), os.path.join(directory, name))


def _eval_records(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["sources"] for r in map(json.loads, f) if r["kind"] == "eval"}


def test_resume_from_the_checkpoint_alone_after_run_dir_and_init_path_are_deleted(tmp_path):
    import shutil

    corpora = make_corpora(tmp_path / "data")
    _save_tiny_hf(tmp_path / "hf")
    train(load_train_config(None, _hf_run(tmp_path, corpora, "straight", 6)))
    expected = train_losses(tmp_path / "straight")

    train(load_train_config(None, _hf_run(tmp_path, corpora, "cut", 6)))
    shutil.rmtree(tmp_path / "cut_ckpt" / "6")  # as if preempted right after the step-3 save
    shutil.rmtree(tmp_path / "cut")  # the worker's local disk is gone ...
    shutil.rmtree(tmp_path / "hf")  # ... and so is the model's source directory
    summary = train(load_train_config(None, _hf_run(tmp_path, corpora, "cut", 6)))

    got = train_losses(tmp_path / "cut")
    assert sorted(got) == [4, 5, 6]
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]  # bitwise
    export = summary["exports"][-1]
    assert {"tokenizer.json", "tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(export))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(export)("a b").input_ids[0] == 1  # the Llama-style BOS, as shipped
    evals = _eval_records(tmp_path / "cut")
    assert evals[0] == _eval_records(tmp_path / "straight")[0]  # the true step-0 baseline came back
    report = (tmp_path / "cut" / "report.txt").read_text()
    assert "warning: no step-0 evaluation" not in report
    assert f"{evals[0]['general']['loss']:.4f}" in report


def test_resume_when_init_path_now_holds_another_model_uses_the_checkpoints(tmp_path, capsys):
    import shutil

    corpora = make_corpora(tmp_path / "data")
    _save_tiny_hf(tmp_path / "hf")
    train(load_train_config(None, _hf_run(tmp_path, corpora, "straight", 6)))
    train(load_train_config(None, _hf_run(tmp_path, corpora, "cut", 6)))
    shutil.rmtree(tmp_path / "cut_ckpt" / "6")
    shutil.rmtree(tmp_path / "hf")
    _save_tiny_hf(tmp_path / "hf", rope_theta=500000.0)  # same shapes, another model
    capsys.readouterr()
    train(load_train_config(None, _hf_run(tmp_path, corpora, "cut", 6)))
    assert "rope_theta: checkpoint 10000.0, init.path 500000.0" in capsys.readouterr().out
    got, expected = train_losses(tmp_path / "cut"), train_losses(tmp_path / "straight")
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path, capsys, damage):
    import glob

    corpora = make_corpora(tmp_path / "data")
    base = tiny_overrides(tmp_path / "run", corpora, steps=6) + ["checkpoint.every_steps=2"]
    train(load_train_config(None, base))
    expected = train_losses(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints"
    import shutil

    shutil.rmtree(ckpt / "6")
    files = [f for f in glob.glob(str(ckpt / "4" / "state" / "**"), recursive=True) if os.path.isfile(f)]
    victim = max(files, key=os.path.getsize)  # the largest array data file
    if damage == "truncate":
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 3)
    else:
        os.remove(victim)
    capsys.readouterr()
    train(load_train_config(None, base))
    out = capsys.readouterr().out
    assert f"checkpoint step 4 in {ckpt} cannot be read" in out
    assert f"resuming from {ckpt / '2'}" in out
    got = train_losses(tmp_path / "run")
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in range(3, 7)] == [expected[s] for s in range(3, 7)]  # retrained from step 2, bitwise

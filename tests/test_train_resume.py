"""Preemption: a run killed (SIGKILL) or stopped (SIGTERM) resumes exactly where an uninterrupted run would be.

Equality is bitwise: on CPU the same compiled step on the same state and the same
data gives the same bits, so any difference means lost or repeated data or state.
"""

import os
import signal
import time

import numpy as np
import pytest
from train_helpers import make_corpora, run_cli, tiny_overrides, train_losses

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


def wait_for(predicate, proc, timeout=240):
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() - start > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


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


def test_sigterm_saves_at_a_step_boundary_and_exits_zero(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    run_dir = tmp_path / "run"
    args = ["train", *tiny_overrides(run_dir, corpora, steps=200, **SHAPE)]
    proc = run_cli(args)
    wait_for(lambda: len(train_losses(run_dir)) >= 3 if (run_dir / "metrics.jsonl").exists() else False, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert "saved checkpoint at step" in output
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        saved = ckpt.latest_step()
    assert saved is not None and saved == max(train_losses(run_dir)) < 200

    resumed = run_cli([*args, f"train.steps={saved + 3}"])  # the last override wins
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming from {run_dir / 'checkpoints' / str(saved)}" in output
    assert sorted(train_losses(run_dir)) == list(range(1, saved + 4))

"""The parameters' moving average: the closed form over a trajectory, resume, evaluation and export."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import make_corpora, tiny_overrides, train_losses

from jaxcpt.config import ConfigError
from jaxcpt.model.transformer import init_model
from jaxcpt.train.config import load_train_config
from jaxcpt.train.loop import train
from jaxcpt.train.setup import build_program
from jaxcpt.train.state import fresh_state, trainable_view
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules

MODEL = ["model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32", "data.seq_len=16", "train.batch_size=8",
         "train.loss_chunk_size=0", "optim.schedule.peak_lr=1e-2", "optim.schedule.warmup_steps=1", "train.steps=6",
         "data.sources=[{name: a, paths: [x]}]"]


def _batch(rng, program):
    tokens = rng.randint(0, 128, size=(8, 17))
    host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16)),
            "positions": np.tile(np.arange(16), (8, 1)), "loss_mask": np.ones((8, 16)), "source": np.zeros((8,))}
    return {k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask" else np.int32), program.batch_shardings[k])
            for k, v in host.items()}


@pytest.mark.parametrize("warmup", [False, True])
def test_stored_average_equals_the_closed_form_ema_of_the_parameter_trajectory(warmup):
    cfg = load_train_config(None, MODEL + ["ema.decay=0.8", f"ema.warmup={str(warmup).lower()}"])
    mesh = build_mesh({"fsdp": 2, "data": 4})
    program = build_program(cfg, cfg.model, mesh, make_rules(), num_sources=1)
    params = nnx.state(init_model(cfg.model, mesh, seed=0), nnx.Param).to_pure_dict()
    state = fresh_state(params, program.tx, program.state_shardings, program.trainable.keys)
    trajectory = [jax.tree.map(np.asarray, trainable_view(state["params"], program.trainable.keys))]
    rng = np.random.RandomState(0)
    with jax.set_mesh(mesh):
        for _ in range(5):
            state, _ = program.train_step(state, _batch(rng, program))
            trajectory.append(jax.tree.map(np.asarray, trainable_view(state["params"], program.trainable.keys)))
    expected = jax.tree.map(lambda p: p.astype(np.float64), trajectory[0])
    for t, params_t in enumerate(trajectory[1:], start=1):
        d = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
        expected = jax.tree.map(lambda e, p: d * e + (1 - d) * p, expected, params_t)
    for got, want, raw in zip(jax.tree.leaves(state["ema"]), jax.tree.leaves(expected), jax.tree.leaves(trajectory[-1])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
        assert not np.allclose(np.asarray(got), raw)  # really an average, not the last weights


@pytest.mark.slow
def test_ema_resumes_bitwise_and_is_evaluated_and_exported(tmp_path):
    from safetensors.numpy import load_file

    corpora = make_corpora(tmp_path / "data")
    extra = ["ema.decay=0.9", "checkpoint.every_steps=3", "export.final=true", "export.weights=ema",
             "export.dtype=float32"]
    train(load_train_config(None, tiny_overrides(tmp_path / "straight", corpora, steps=6) + extra))
    train(load_train_config(None, tiny_overrides(tmp_path / "cut", corpora, steps=6) + extra))
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
    shutil.rmtree(tmp_path / "cut" / "hf")
    train(load_train_config(None, tiny_overrides(tmp_path / "cut", corpora, steps=6) + extra))
    assert [train_losses(tmp_path / "cut")[s] for s in (4, 5, 6)] == [train_losses(tmp_path / "straight")[s] for s in (4, 5, 6)]
    a = load_file(tmp_path / "straight" / "hf" / "step_6" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "hf" / "step_6" / "model.safetensors")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])  # the exported average resumed bitwise

    # the export holds the average, not the raw weights
    from jaxcpt.checkpoint import restore_params
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.train.state import resolve_model_config

    cfg = load_train_config(None, tiny_overrides(tmp_path / "straight", corpora, steps=6))
    raw = restore_params(tmp_path / "straight" / "checkpoints", abstract_params(resolve_model_config(cfg), build_mesh({"data": 8}), make_rules()))
    assert not np.allclose(a["model.norm.weight"], np.asarray(raw["final_norm"]))

    records = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 6] and all(set(r["ema"]) == {"general", "domain"} for r in evals)
    assert evals[0]["ema"] == evals[0]["sources"]  # at step 0 the average is the model
    report = open(tmp_path / "straight" / "report.txt").read()
    assert "general (ema)" in report


def test_exporting_the_average_needs_one():
    with pytest.raises(ConfigError, match="export.weights=ema needs a moving average"):
        load_train_config(None, MODEL + ["export.weights=ema"])

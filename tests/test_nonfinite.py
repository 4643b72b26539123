"""A NaN/inf loss skips its update; several in a row stop the run (exit 3) without writing a checkpoint."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from train_helpers import make_corpora, tiny_overrides

from jaxcpt.cli import main
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.persist import params_of
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train.state import trainable_view
from jaxcpt.train.step import train_step


def _paths(tree, prefix=""):
    for key, value in tree.items():
        yield from _paths(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]


def test_nonfinite_step_leaves_params_and_moments_unchanged():
    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = init_model(cfg, build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef = nnx.split(model)[0]
    params = params_of(model)
    params["final_norm"] = params["final_norm"].at[0].set(jnp.nan)
    tx = optax.adamw(1e-3)
    keys = tuple(trainable_view(params, [k for k in _paths(params)]))
    state = {"params": params, "opt_state": tx.init(trainable_view(params, keys)), "step": jnp.zeros((), jnp.int32)}
    ones = jnp.ones((2, 8), jnp.int32)
    batch = {"inputs": ones, "targets": ones, "segment_ids": ones, "positions": jnp.tile(jnp.arange(8), (2, 1)),
             "loss_mask": jnp.ones((2, 8)), "source": jnp.zeros((2,), jnp.int32)}
    new_state, metrics = train_step(state, batch, graphdef=graphdef, tx=tx, schedule=lambda s: 1e-3, num_sources=1,
                                    grad_accum_steps=1, chunk_size=0, z_loss_weight=0.0, trainable_keys=keys)
    assert not bool(metrics["finite"])
    assert int(new_state["step"]) == 1
    before = jax.tree_util.tree_flatten_with_path({"params": state["params"], "opt": state["opt_state"]})[0]
    after = jax.tree_util.tree_flatten_with_path({"params": new_state["params"], "opt": new_state["opt_state"]})[0]
    for (path, old), (_, new) in zip(before, after):
        if getattr(path[-1], "name", None) == "count":  # step counters advance with the step
            assert int(new) == int(old) + 1
        else:  # parameters and Adam moments stay exactly as they were
            np.testing.assert_array_equal(old, new)


def test_run_stops_after_max_nonfinite_steps_in_a_row(tmp_path, capsys):
    corpora = make_corpora(tmp_path / "data")
    overrides = tiny_overrides(tmp_path / "run", corpora, steps=20) + [
        "train.max_nonfinite_steps=3", "optim.schedule.kind=constant", "optim.schedule.peak_lr=1e30",
        "optim.clip_grad_norm=0", "checkpoint.every_steps=100"]
    assert main(["train", *overrides]) == 3
    err = capsys.readouterr().err
    assert "non-finite steps in a row" in err and "last good checkpoint" in err
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    skipped = [r["step"] for r in records if r["kind"] == "train" and r["skipped"]]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_skipped_step_keeps_the_schedule_aligned_with_the_step():
    from jaxcpt.train.step import _advance_counts

    tx = optax.adamw(optax.linear_schedule(0.0, 1.0, 10))
    params = {"w": jnp.ones((2,))}
    state = tx.init(params)
    counts = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(_advance_counts(state))[0]
              if getattr(path[-1], "name", None) == "count"]
    assert counts and all(int(c) == 1 for c in counts)

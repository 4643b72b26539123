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
    for (_, old), (_, new) in zip(before, after):  # parameters, Adam's moments and its update count
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


def test_skipped_step_advances_the_schedule_but_not_adams_bias_correction_count():
    from jaxcpt.optim.optimizer import skip_update

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.linear_schedule(0.0, 1.0, 10)))
    state = skip_update(tx.init({"w": jnp.ones((2,))}))
    adam = next(s for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
                if isinstance(s, optax.ScaleByAdamState))
    schedule = next(s for s in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
                    if isinstance(s, optax.ScaleByScheduleState))
    assert int(schedule.count) == 1 and int(adam.count) == 0


def test_a_run_with_a_skipped_step_equals_one_that_never_met_the_bad_batch():
    """Constant learning rate: a non-finite batch (skipped) at the start and in the middle leaves the run exactly
    where it would be without that batch; a skip must not age Adam's bias correction (~0.74x the next update)."""
    from functools import partial

    from jaxcpt.config import from_dict
    from jaxcpt.optim import OptimConfig, build_optimizer

    cfg = ModelConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    model = init_model(cfg, build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, params = nnx.split(model)[0], params_of(model)
    optim = {"schedule": {"kind": "constant", "warmup_steps": 0, "peak_lr": 1e-2}, "weight_decay": 0.1}
    tx, schedule = build_optimizer(from_dict(OptimConfig, optim), total_steps=10)  # jaxcpt's AdamW, clipping on
    keys = tuple(_paths(params))
    step = jax.jit(partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, num_sources=1, grad_accum_steps=1,
                           chunk_size=0, z_loss_weight=0.0, trainable_keys=keys))

    def final_params(batches):  # None = a batch whose NaN loss mask makes the step non-finite
        state = {"params": params, "opt_state": tx.init(trainable_view(params, keys)), "step": jnp.zeros((), jnp.int32)}
        for seed in batches:
            tokens = np.random.RandomState(seed or 0).randint(0, 64, size=(2, 9))
            batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((2, 8), np.int32),
                     "positions": np.tile(np.arange(8), (2, 1)), "source": np.zeros((2,), np.int32),
                     "loss_mask": np.full((2, 8), np.nan if seed is None else 1.0, np.float32)}
            state, metrics = step(state, batch)
            assert bool(metrics["finite"]) == (seed is not None)
        return jax.tree.map(np.asarray, state["params"])

    jax.tree.map(np.testing.assert_array_equal, final_params([None, 1, 2, None, 3]), final_params([1, 2, 3]))

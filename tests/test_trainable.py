"""optim.trainable: frozen parameters stay bitwise, carry no optimizer state; phases switch and resume exactly."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from train_helpers import make_corpora, run_cli, tiny_overrides, train_losses

from jaxcpt.config import ConfigError
from jaxcpt.model.transformer import init_model
from jaxcpt.optim.trainable import ParamInfo, TrainablePhase, resolve_trainable
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
from jaxcpt.train.config import load_train_config
from jaxcpt.train.setup import build_program
from jaxcpt.train.state import fresh_state, trainable_view

MODEL = ["model.vocab_size=128", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=3",
         "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32", "data.seq_len=16", "train.batch_size=8",
         "train.loss_chunk_size=0", "optim.schedule.peak_lr=1e-2", "optim.schedule.warmup_steps=1", "train.steps=6",
         "data.sources=[{name: a, paths: [x]}]", "optim.weight_decay=0.1"]
ADAPTATION = {"format": "jaxcpt-adaptation-v1", "new_token_ids": [100, 128], "inserted_layers": [1]}


def _run_steps(trainable: str, steps: int, adaptation=ADAPTATION, extra=(), nonfinite_steps=()):
    """Train ``steps`` steps on random batches; the batches of ``nonfinite_steps`` have a NaN loss mask (skipped)."""
    cfg = load_train_config(None, MODEL + [f"optim.trainable={trainable}", *extra])
    mesh = build_mesh({"fsdp": 2, "data": 4})
    program = build_program(cfg, cfg.model, mesh, make_rules(), num_sources=1, adaptation=adaptation)
    params = nnx.state(init_model(cfg.model, mesh, seed=0), nnx.Param).to_pure_dict()
    state = fresh_state(params, program.tx, program.state_shardings, program.trainable.keys)
    history = [jax.tree.map(np.asarray, state["params"])]
    rng = np.random.RandomState(0)
    with jax.set_mesh(mesh):
        for step in range(steps):
            tokens = rng.randint(0, 128, size=(8, 17))
            mask = np.full((8, 16), np.nan if step in nonfinite_steps else 1.0)
            host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16)),
                    "positions": np.tile(np.arange(16), (8, 1)), "loss_mask": mask, "source": np.zeros((8,))}
            batch = {k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask" else np.int32), program.batch_shardings[k])
                     for k, v in host.items()}
            state, _ = program.train_step(state, batch)
            history.append(jax.tree.map(np.asarray, state["params"]))
    return program, state, history


def test_frozen_parameters_stay_bitwise_and_carry_no_optimizer_state():
    program, state, history = _run_steps("[{params: ['layers.*', '!layers.attn_norm', '!layers.mlp_norm']}]", 3)
    assert set(program.trainable.keys) == {"layers.q", "layers.k", "layers.v", "layers.o", "layers.gate", "layers.up",
                                           "layers.down"}
    first, last = history[0], history[-1]
    for frozen in ("embedding", "lm_head", "final_norm"):
        np.testing.assert_array_equal(first[frozen], last[frozen])
    for norm in ("attn_norm", "mlp_norm"):
        np.testing.assert_array_equal(first["layers"][norm], last["layers"][norm])
    assert not np.array_equal(first["layers"]["q"], last["layers"]["q"])
    # the optimizer state holds moments for the trainable tensors only: count its array elements
    trainable_size = sum(np.prod(last["layers"][k].shape) for k in ("q", "k", "v", "o", "gate", "up", "down"))
    state_size = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert state_size == 2 * trainable_size  # Adam's mu and nu, nothing for the frozen ones


def test_new_rows_only_phase_then_everything():
    program, state, history = _run_steps(
        "[{params: ['embedding[new]', 'lm_head[new]'], steps: 3}, {params: ['*']}]", 5)
    after_phase0, end = history[3], history[5]
    start = history[0]
    for name, axis in (("embedding", 0), ("lm_head", 1)):
        old_rows = np.take(start[name], range(100), axis=axis)
        np.testing.assert_array_equal(old_rows, np.take(after_phase0[name], range(100), axis=axis))  # bitwise, decay included
        assert not np.array_equal(np.take(start[name], range(100, 128), axis=axis),
                                  np.take(after_phase0[name], range(100, 128), axis=axis))
        assert not np.array_equal(old_rows, np.take(end[name], range(100), axis=axis))  # phase 1 trains them
    np.testing.assert_array_equal(start["layers"]["q"], after_phase0["layers"]["q"])
    assert not np.array_equal(after_phase0["layers"]["q"], end["layers"]["q"])
    assert "phase 0 (steps 0-2): embedding[100:128], lm_head[100:128]" in program.trainable.describe()


def test_a_group_that_starts_training_later_starts_with_fresh_adam_state():
    """The first update of a block frozen in phase 0 equals the first update of a run that trains it from step 0."""
    later, _, history_later = _run_steps("[{params: ['embedding'], steps: 2}, {params: ['embedding', 'layers.q']}]", 3)
    # the same block's first Adam update is lr * sign-like m/sqrt(v) with fresh moments: |update| ~= lr everywhere
    update = history_later[3]["layers"]["q"] - history_later[2]["layers"]["q"]
    lr = float(later.schedule(2))
    ratio = np.abs(update) / lr
    assert np.median(ratio) > 0.9  # a stale, decayed state would give ~0.45 (0.1 / sqrt(0.05))


def test_first_update_of_a_group_frozen_in_phase_0_equals_a_fresh_adamw_after_a_skipped_step():
    """Phase 0 trains the embedding only and its step 1 is non-finite (skipped); at the switch (step 2)
    layers.q's update must be that of a fresh optax.adamw on the same gradient, with the run's learning rate
    at step 2: a skipped step must not age the moments of a group that has not trained yet."""
    from functools import partial

    import jax.numpy as jnp
    import optax

    from jaxcpt.optim.optimizer import weight_decay_mask
    from jaxcpt.train.step import train_step

    program, _, history = _run_steps("[{params: ['embedding'], steps: 2}, {params: ['embedding', 'layers.q']}]", 3,
                                     extra=["optim.clip_grad_norm=0"], nonfinite_steps=(1,))
    np.testing.assert_array_equal(history[1]["embedding"], history[2]["embedding"])  # step 1 was skipped
    optim = load_train_config(None, MODEL).optim
    fresh = optax.adamw(lambda count: program.schedule(count + 2), b1=optim.betas[0], b2=optim.betas[1],
                        eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=lambda p: weight_decay_mask(p, optim.decay_embeddings))
    keys = ("layers.q",)
    params = jax.tree.map(jnp.asarray, history[2])
    state = {"params": params, "opt_state": fresh.init(trainable_view(params, keys)), "step": jnp.int32(2)}
    rng = np.random.RandomState(0)
    tokens = [rng.randint(0, 128, size=(8, 17)) for _ in range(3)][2]  # the batch _run_steps trained step 2 on
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((8, 16), np.int32),
             "positions": np.tile(np.arange(16), (8, 1)), "loss_mask": np.ones((8, 16), np.float32),
             "source": np.zeros((8,), np.int32)}
    step = partial(train_step, graphdef=program.graphdef, tx=fresh, schedule=program.schedule, num_sources=1,
                   grad_accum_steps=1, chunk_size=0, z_loss_weight=0.0, trainable_keys=keys)
    with jax.set_mesh(program.mesh):
        expected, _ = jax.jit(step)(state, jax.tree.map(jnp.asarray, batch))
    update = history[3]["layers"]["q"] - history[2]["layers"]["q"]
    expected_update = np.asarray(expected["params"]["layers"]["q"]) - history[2]["layers"]["q"]
    np.testing.assert_allclose(update, expected_update, rtol=1e-4, atol=1e-7)  # a stale count gives ~0.74x


def test_inserted_blocks_only():
    _, _, history = _run_steps("[{params: ['layers.*[new]']}]", 2)
    first, last = history[0]["layers"]["q"], history[-1]["layers"]["q"]
    np.testing.assert_array_equal(first[[0, 2]], last[[0, 2]])
    assert not np.array_equal(first[1], last[1])


@pytest.mark.parametrize("phases, message", [
    ("[{params: ['embeding']}]", "did you mean 'embedding'"),
    ("[{params: ['final_norm[new]']}]", "only tensors with a vocabulary or layer axis"),
    ("[{params: ['embedding'], steps: 2}, {params: ['*'], steps: 10}]", None),
    ("[{params: ['embedding']}, {params: ['*']}]", "only the last phase may leave steps unset"),
])
def test_trainable_config_errors_name_the_fix(phases, message):
    if message is None:
        _run_steps(phases, 0)
        return
    with pytest.raises(ConfigError, match=message):
        _run_steps(phases, 0)


def test_new_selector_without_adaptation_record_is_an_error():
    infos = {"embedding": ParamInfo((10, 4), ("vocab", "embed"))}
    with pytest.raises(ConfigError, match=r"needs the starting model's jaxcpt_adaptation.json.*\[32000:\]"):
        resolve_trainable([TrainablePhase(params=["embedding[new]"])], infos, None, 10)


@pytest.mark.slow
def test_phase_switch_resumes_exactly_after_sigkill(tmp_path):
    import signal
    import time

    corpora = make_corpora(tmp_path / "data")
    phases = "optim.trainable=[{params: ['embedding', 'lm_head'], steps: 6}, {params: ['*']}]"
    straight = tiny_overrides(tmp_path / "straight", corpora, steps=12, width=128, seq_len=64, batch=16)
    from jaxcpt.train.loop import train

    train(load_train_config(None, straight + [phases, "checkpoint.every_steps=4"]))
    killed = tmp_path / "killed"
    args = ["train", *tiny_overrides(killed, corpora, steps=12, width=128, seq_len=64, batch=16), phases,
            "checkpoint.every_steps=4"]
    proc = run_cli(args)
    start = time.monotonic()
    while not (killed / "checkpoints" / "4" / "state").is_dir():  # killed inside phase 0, resumed across the switch
        assert proc.poll() is None and time.monotonic() - start < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_cli(args)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    expected, got = train_losses(tmp_path / "straight"), train_losses(killed)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(1, 13)] == [expected[s] for s in range(1, 13)]


def test_the_adaptation_record_travels_through_import_and_export(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jaxcpt.checkpoint import read_meta
    from jaxcpt.cli import main
    from jaxcpt.train.setup import set_up

    torch.manual_seed(0)
    hf = tmp_path / "extended"
    LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(hf)
    record = {"format": "jaxcpt-adaptation-v1", "new_token_ids": [300, 320], "inserted_layers": [], "history": []}
    (hf / "jaxcpt_adaptation.json").write_text(json.dumps(record))
    assert main(["import-hf", str(hf), "--out", str(tmp_path / "ckpt")]) == 0
    assert read_meta(tmp_path / "ckpt" / "checkpoints")["adaptation"]["new_token_ids"] == [300, 320]

    corpora = make_corpora(tmp_path / "data")
    overrides = [o for o in tiny_overrides(tmp_path / "run", corpora, steps=2) if not o.startswith("model.")]
    overrides += ["init.source=checkpoint", f"init.path={tmp_path / 'ckpt'}", "export.final=true",
                  "optim.trainable=[{params: ['embedding[new]']}]"]
    setup = set_up(load_train_config(None, overrides), check=True)
    assert setup.program.trainable.phases[0]["embedding"].indices == tuple(range(300, 320))

    from jaxcpt.train.loop import train

    export = train(load_train_config(None, overrides))["exports"][-1]
    assert json.loads(open(os.path.join(export, "jaxcpt_adaptation.json")).read())["new_token_ids"] == [300, 320]


def test_a_parameter_transformers_keeps_as_a_buffer_trains_only_when_a_pattern_names_it():
    """Gemma 4's layer_scalar is a buffer in transformers: CPT from a release leaves it as loaded by default."""
    infos = {"embedding": ParamInfo((10, 4), ("vocab", "embed")), "layers.q": ParamInfo((2, 4, 4), ("layers", "embed", "q")),
             "layers.layer_scalar": ParamInfo((2,), ("layers",))}
    everything = resolve_trainable([TrainablePhase()], infos, None, 10).phases[0]
    assert set(everything) == {"embedding", "layers.q"}
    assert set(resolve_trainable([TrainablePhase(params=["layers.*"])], infos, None, 10).phases[0]) == {"layers.q"}
    named = resolve_trainable([TrainablePhase(params=["*", "layers.layer_scalar"])], infos, None, 10).phases[0]
    assert set(named) == set(infos)
    by_glob = resolve_trainable([TrainablePhase(params=["layers.*scalar"])], infos, None, 10).phases[0]
    assert set(by_glob) == {"layers.layer_scalar"}  # a glob that matches it and says more than '*' names it

"""The same batch gives the same loss under every mesh shape, and parameters sit where the rules say."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxcpt.errors import UserError
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh, resolve_mesh_shape
from jaxcpt.sharding.rules import check_rules, logical_to_spec, make_rules
from jaxcpt.train.loss import model_loss

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
MESHES = [
    {"data": 8},
    {"fsdp": 8},
    {"data": 2, "fsdp": 2, "tensor": 2},
    {"fsdp": 4, "tensor": 2},
]


def batch():
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, size=(8, 33))
    return {
        "inputs": jnp.asarray(tokens[:, :-1]),
        "targets": jnp.asarray(tokens[:, 1:]),
        "segment_ids": jnp.asarray(np.repeat([[1] * 20 + [2] * 12], 8, axis=0)),
        "positions": jnp.asarray(np.repeat([list(range(20)) + list(range(12))], 8, axis=0)),
        "loss_mask": jnp.asarray((rng.rand(8, 32) > 0.1).astype(np.float32)),
    }


def loss_under(mesh_axes):
    mesh = build_mesh(mesh_axes)
    model = init_model(CFG, mesh, seed=3)  # same seed -> same values whatever the layout
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_fn(state, batch):
        return model_loss(nnx.merge(graphdef, state), batch, chunk_size=8)[0]

    with jax.set_mesh(mesh):
        return float(loss_fn(state, batch())), model


def test_loss_is_the_same_under_every_mesh_shape():
    losses = [loss_under(axes)[0] for axes in MESHES]
    assert all(abs(loss - losses[0]) / abs(losses[0]) < 1e-5 for loss in losses), losses


@pytest.mark.parametrize("axes,expected", [
    ({"data": 8}, {"layers.q": P(), "embedding": P(), "layers.down": P()}),
    ({"fsdp": 8}, {"layers.q": P(None, "fsdp"), "embedding": P(None, "fsdp"), "layers.down": P(None, None, "fsdp")}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {
        "layers.q": P(None, "fsdp", "tensor"), "layers.k": P(None, "fsdp", "tensor"),
        "layers.o": P(None, "tensor", None, "fsdp"), "embedding": P("tensor", "fsdp"),
        "lm_head": P("fsdp", "tensor"), "layers.attn_norm": P(), "final_norm": P()}),
    # 2 KV heads cannot split over tensor=4: replicated on that dimension, never mis-sharded
    ({"fsdp": 2, "tensor": 4}, {"layers.q": P(None, "fsdp", "tensor"), "layers.k": P(None, "fsdp"),
                                "layers.gate": P(None, "fsdp", "tensor")}),
])
def test_parameters_are_laid_out_as_the_rules_say(axes, expected):
    model = init_model(CFG, build_mesh(axes))
    flat = {".".join(path): v[...] for path, v in nnx.to_flat_state(nnx.state(model))}
    for name, spec in expected.items():
        assert flat[name].sharding.spec == spec, (name, flat[name].sharding.spec)
        assert flat[name].sharding.mesh.shape == build_mesh(axes).shape


def test_mesh_that_does_not_divide_the_devices_is_a_clear_error():
    with pytest.raises(UserError, match=r"uses 6 devices, but 8 are available"):
        build_mesh({"data": 3, "tensor": 2})
    with pytest.raises(UserError, match=r"multiple of 3 devices, but there are 8"):
        build_mesh({"data": -1, "tensor": 3})
    with pytest.raises(UserError, match="at most one axis"):
        resolve_mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_minus_one_takes_the_remaining_devices():
    assert dict(build_mesh({"data": -1, "fsdp": 2, "tensor": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_rule_naming_an_unknown_mesh_axis_is_a_clear_error():
    rules = make_rules({"heads": "model"})
    with pytest.raises(UserError, match="'heads' -> 'model'.*mesh axes are data, fsdp, tensor"):
        check_rules(rules, build_mesh())
    with pytest.raises(UserError, match="unknown logical axis 'head'; did you mean 'heads'"):
        make_rules({"head": "tensor"})


def test_a_mesh_axis_is_used_once_per_array():
    rules = make_rules({"vocab": "fsdp"})  # vocab and embed both want fsdp on the embedding
    assert logical_to_spec(("vocab", "embed"), rules, {"fsdp": 4}, (256, 64)) == P("fsdp")


def _program(grad_accum_steps: int, mesh_axes: dict):
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.setup import build_program

    cfg = load_train_config(None, [
        "model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_layers=2",
        "model.num_heads=4", "model.num_kv_heads=2", "model.dtype=float32", "data.seq_len=32", "train.batch_size=16",
        f"optim.grad_accum_steps={grad_accum_steps}", "train.loss_chunk_size=16", "data.sources=[{name: a, paths: [x]}]"])
    mesh = build_mesh(mesh_axes)
    return build_program(cfg, cfg.model, mesh, make_rules(), num_sources=1)


def test_gradient_accumulation_on_a_multi_device_mesh_matches_one_batch_and_spreads_each_micro_batch():
    from jaxcpt.optim.accumulate import split_microbatches
    from jaxcpt.train.state import fresh_state

    mesh_axes = {"data": 4, "fsdp": 2}
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, size=(16, 33))
    host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((16, 32), np.int32),
                  "positions": np.tile(np.arange(32), (16, 1)), "loss_mask": (rng.rand(16, 32) > 0.2).astype(np.float32),
                  "source": np.zeros((16,), np.int32)}
    params = {}
    for accum in (1, 2):
        program = _program(accum, mesh_axes)
        model = init_model(program.model_cfg, program.mesh, seed=1)
        state = fresh_state(nnx.state(model, nnx.Param).to_pure_dict(), program.tx, program.state_shardings,
                            program.trainable.keys)
        batch = {k: jax.device_put(np.asarray(v, np.float32 if k == "loss_mask" else np.int32), program.batch_shardings[k])
                 for k, v in host_batch.items()}
        with jax.set_mesh(program.mesh):
            new_state, metrics = program.train_step(state, batch)
            if accum > 1:  # every micro-batch stays spread over all 8 devices: no replicated work
                micro = jax.jit(lambda b, n=accum: split_microbatches(b, n))(batch)
                spec = micro["inputs"].sharding.spec
                assert spec[0] is None and spec[1] == ("data", "fsdp"), spec
        params[accum] = jax.tree.map(np.asarray, new_state["params"])
    for accum in (2,):
        for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[accum])):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

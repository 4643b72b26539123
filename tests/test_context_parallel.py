"""Context parallelism: a row split over the 'context' axis trains exactly like the unsplit row.

The oracle is the same model on {data: 8} (reference attention over whole rows); the run under
test splits every row four ways ({data: 2, context: 4}) and attends with the ring.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcpt.errors import UserError
from jaxcpt.model import context_parallel as cp
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train.loss import model_loss

LLAMA = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
# Gemma 2's options: a sliding layer then a full one, attention logit soft-capping
GEMMA = dataclasses.replace(LLAMA, family="gemma2", sliding_window=12, layer_types=("sliding_attention", "full_attention"),
                            attn_logit_softcap=5.0, final_logit_softcap=30.0, norm_plus_one=True, post_norms=True,
                            activation="gelu_tanh", scale_embeddings=True, rope_local_theta=10000.0)
SEQ = 64  # 2 x context 4 = 8 chunks of 8


def packed_batch():
    """8 rows of packed documents of uneven lengths (boundaries inside chunks), a padding tail, a loss mask."""
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 256, size=(8, SEQ + 1))
    segments, positions = np.zeros((8, SEQ), np.int32), np.zeros((8, SEQ), np.int32)
    for row in range(8):
        cuts = np.sort(rng.choice(np.arange(3, SEQ - 4), size=3, replace=False))
        bounds = [0, *cuts, SEQ - 2 * (row % 2)]  # odd rows end in 2 padding tokens (segment 0)
        for doc, (start, end) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            segments[row, start:end], positions[row, start:end] = doc, np.arange(end - start)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions),
            "loss_mask": jnp.asarray((segments > 0).astype(np.float32))}


def loss_and_grads(cfg, mesh_axes):
    mesh = build_mesh(mesh_axes)
    model = init_model(cfg, mesh, seed=3)
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, batch):
        return jax.value_and_grad(lambda s: model_loss(nnx.merge(graphdef, s), batch, chunk_size=16)[0])(state)

    with jax.set_mesh(mesh):
        loss, grads = fn(state, packed_batch())
    return float(loss), {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("cfg", [LLAMA, pytest.param(GEMMA, marks=pytest.mark.slow)], ids=["llama", "gemma2-window-softcap"])
def test_context_parallel_loss_and_gradients_equal_the_unsplit_run(cfg, monkeypatch):
    monkeypatch.setattr(cp, "KV_CHUNK", 8)  # each device's 16 keys in two flash sub-blocks
    loss, grads = loss_and_grads(cfg, {"data": 8})
    ring_loss, ring_grads = loss_and_grads(cfg, {"data": 2, "context": 4})
    assert abs(ring_loss - loss) / abs(loss) < 1e-5, (ring_loss, loss)
    for name, g in grads.items():
        scale = np.abs(g).max() + 1e-12
        assert np.abs(ring_grads[name] - g).max() / scale < 1e-4, name


def test_balanced_layout_gives_each_device_two_mirrored_chunks_and_inverts():
    rows = jnp.arange(2 * 16).reshape(2, 16)
    balanced = cp.to_balanced(rows, 2)  # 4 chunks of 4: device 0 holds chunks 0 and 3, device 1 chunks 1 and 2
    assert balanced[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    assert (cp.from_balanced(balanced, 2) == rows).all()
    assert cp.local_indices(jnp.int32(1), 2, 4).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_context_axis_that_does_not_divide_the_sequence_is_a_clear_error():
    mesh = build_mesh({"data": 2, "context": 4})
    model = init_model(LLAMA, mesh, seed=0)
    with jax.set_mesh(mesh), pytest.raises(UserError, match="2 x 4 = 8 equal chunks.*multiple of 8 \\(e.g. 64\\)"):
        jax.eval_shape(model.hidden_states, jnp.zeros((2, 60), jnp.int32))


def test_train_check_on_a_context_mesh_shows_the_rope_and_positions_and_warns_past_the_trained_length(tmp_path, capsys):
    from train_helpers import make_corpora, tiny_overrides

    from jaxcpt.cli import main

    overrides = tiny_overrides(tmp_path / "run", make_corpora(tmp_path / "data"), mesh="{data: 2, context: 4}", seq_len=64)
    assert main(["train", "--check", *overrides, "model.max_position_embeddings=32"]) == 0
    out = capsys.readouterr().out
    assert "mesh         data=2 x context=4 (8 devices)" in out
    assert "rope         theta 10000, no scaling, max_position_embeddings 32; rows train positions 0..63" in out
    assert "warning: data.seq_len trains rows of 64 tokens" in out and "trained for 32 positions" in out
    assert main(["train", "--check", *overrides, "data.seq_len=60"]) == 2
    assert "multiple of 8 (e.g. 64)" in capsys.readouterr().err

"""Context parallelism: a row split over the 'context' axis trains exactly like the unsplit row.

The oracle is the same model on {data: 8} (reference attention over whole rows); the run under
test splits every row four ways ({data: 2, context: 4}) and attends with the ring.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcpt.errors import UserError
from jaxcpt.model import context_parallel as cp
from jaxcpt.model.attention import attention_reference
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
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


# ----------------------------------------------------------------------------- the ring alone


def ring_inputs(batch, length, heads=4, kv_heads=2, head_dim=16):
    """Random q/k/v [B, T, ...] float32, rows of packed documents (boundaries inside chunks) ending in padding."""
    rng = np.random.RandomState(1)
    q, k, v = (jnp.asarray(rng.randn(batch, length, n, head_dim), jnp.float32) for n in (heads, kv_heads, kv_heads))
    segments = np.zeros((batch, length), np.int32)
    for row in range(batch):
        cuts = np.sort(rng.choice(np.arange(3, length - 8), size=3, replace=False))
        for doc, (start, end) in enumerate(zip([0, *cuts], [*cuts, length - 5]), start=1):
            segments[row, start:end] = doc
    cotangent = jnp.asarray(rng.randn(batch, length, heads, head_dim), jnp.float32)
    return (q, k, v), jnp.asarray(segments), cotangent


def ring_vs_reference(mesh_axes, length, window=None, softcap=None, rows_per_shard=2, heads=(4, 2), **ring_options):
    """(ring, reference) outputs and q/k/v gradients of sum(out * cotangent), over whole rows in row order."""
    context = mesh_axes["context"]
    (q, k, v), seg, cotangent = ring_inputs(mesh_axes.get("data", 1) * rows_per_shard, length, *heads)

    def ring(q, k, v):
        q, k, v, s = (cp.to_balanced(x, context) for x in (q, k, v, seg))
        out = cp.ring_attention(q, k, v, s, window, softcap=softcap, rules=make_rules(), **ring_options)
        return cp.from_balanced(out, context)

    def reference(q, k, v):
        return attention_reference(q, k, v, seg, window, softcap=softcap)

    def out_and_grads(fn):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    with jax.set_mesh(build_mesh(mesh_axes)):
        got = jax.jit(lambda q, k, v: out_and_grads(ring))(q, k, v)
    want = jax.jit(lambda q, k, v: out_and_grads(reference))(q, k, v)
    return got, want


def assert_close(got, want, tol):
    for name, g, w in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max() < tol, name


@pytest.mark.parametrize("window, softcap", [(None, None), (11, 5.0)], ids=["causal", "window-softcap"])
def test_ring_custom_backward_equals_autodiff_of_the_reference_attention(window, softcap, monkeypatch):
    """The ring's own backward pass (K/V and dK/dV around the ring again) gives the gradients autodiff gives
    through whole-row attention: packed documents, a padded tail, a window, soft-capping, two key sub-blocks."""
    monkeypatch.setattr(cp, "KV_CHUNK", 8)
    got, want = ring_vs_reference({"data": 2, "context": 4}, 64, window, softcap)
    assert_close(got, want, 1e-5)


def _residual_bytes(context):
    """Bytes of everything the ring's vjp keeps for the backward pass (the leaves of the vjp function), all devices."""
    (q, k, v), seg, _ = ring_inputs(8, 64)  # 8 rows: split over data (8 / context) with nothing replicated

    def vjp_of_ring(q, k, v):
        return jax.vjp(lambda q, k, v: cp.ring_attention(q, k, v, seg, rules=make_rules()), q, k, v)[1]

    with jax.set_mesh(build_mesh({"data": 8 // context, "context": context})):
        residuals = jax.tree.leaves(jax.eval_shape(vjp_of_ring, q, k, v))
    return sum(math.prod(r.shape) * np.dtype(r.dtype).itemsize for r in residuals), (q, k, v, seg)


def test_ring_backward_keeps_only_inputs_output_and_lse_whatever_the_ring_length():
    """What the ring keeps for its backward pass is q, k, v, the output, its log-sum-exp and the segment ids:
    the same bytes for a ring of 2 and of 4. Autodiff through the ring's loop kept each step's received K/V,
    block output and merge weights too (2.2x these bytes at 2, 4.6x at 4): the 128k-token 8B step did not fit."""
    (two, (q, k, v, seg)), (four, _) = _residual_bytes(2), _residual_bytes(4)
    lse = q.shape[0] * q.shape[1] * q.shape[2] * 4  # [B, heads, T] float32
    assert two == four == 2 * q.nbytes + k.nbytes + v.nbytes + lse + seg.nbytes  # q twice: q and the output


@pytest.mark.slow  # ~20 s: the Pallas interpreter compiles nine kernels
def test_ring_with_splash_blocks_matches_the_reference_forward_and_backward():
    """The Pallas splash kernel per ring step (run by the Pallas interpreter here, the Mosaic kernel on TPU):
    its log-sum-exp merges the blocks and its dq / dkv kernels take the ring's output and log-sum-exp."""
    got, want = ring_vs_reference({"data": 4, "context": 2}, 512, softcap=5.0, rows_per_shard=1, heads=(2, 1),
                                  attention="splash")  # chunks of 128 (splash's tile); one row per device
    assert_close(got, want, 1e-5)


def test_splash_ring_needs_128_aligned_chunks_and_names_the_fix():
    mesh = build_mesh({"data": 2, "context": 4})
    (q, k, v), seg, _ = ring_inputs(2, 64)
    with jax.set_mesh(mesh), pytest.raises(UserError, match="multiples of 128 positions, got 8.*model.attention"):
        jax.eval_shape(lambda *a: cp.ring_attention(*a, rules=make_rules(), attention="splash"), q, k, v, seg)

"""Expert parallelism (jaxcpt/model/expert_parallel.py): experts computed where they live, the same numbers as one device.

The oracle is the one-device program: the same weights and batch on a single CPU device, where no
expert is split. On 8 fake CPU devices every mesh must give the same loss, gradients (every leaf)
and routing statistics; the compiled program must move tokens, never the whole expert stack.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcpt.aot.collectives import collectives
from jaxcpt.model import expert_parallel
from jaxcpt.model import moe as moe_lib
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model, variable_shardings
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules, named_sharding
from jaxcpt.train.step import _loss_sums

EXPERTS, TOP_K, WIDTH, FFN = 8, 2, 32, 16
ROWS, SEQ = 8, 16


def _config(**moe_overrides) -> ModelConfig:
    moe = moe_lib.MoeConfig(num_experts=EXPERTS, top_k=TOP_K, expert_intermediate_size=FFN,
                            router_aux_loss_coef=0.01, router_z_loss_coef=0.001, **moe_overrides)
    return ModelConfig(family="qwen3_moe", vocab_size=128, hidden_size=WIDTH, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, qk_norm=True, moe=moe, dtype="float32")


def _batch(rows=ROWS, seq=SEQ):
    """Two packed documents per row and padding at the end of the odd rows (segment 0: out of the statistics)."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, 128, size=(rows, seq)).astype(np.int32)
    segment_ids = np.where(np.arange(seq) < seq // 2, 1, 2)[None].repeat(rows, 0).astype(np.int32)
    segment_ids[1::2, -3:] = 0
    positions = np.where(np.arange(seq) < seq // 2, np.arange(seq), np.arange(seq) - seq // 2)[None].repeat(rows, 0)
    targets = np.concatenate([ids[:, 1:], np.zeros((rows, 1), np.int32)], axis=1)
    mask = (segment_ids != 0).astype(np.float32)
    mask[:, -1] = 0
    return dict(inputs=ids, targets=targets, loss_mask=mask, segment_ids=segment_ids,
                positions=positions.astype(np.int32), source=np.zeros((rows,), np.int32))


@functools.lru_cache(maxsize=None)
def _weights(cfg: ModelConfig):
    """(graphdef, host copy of the parameters) of a model initialised once on one device."""
    model = init_model(cfg, build_mesh({"data": 1}, devices=jax.devices()[:1]), seed=3)
    graphdef, params = nnx.split(model)
    return graphdef, jax.tree.map(np.asarray, params)


def _loss_grads_stats(mesh_axes, cfg=None, batch=None, devices=None):
    """(loss, gradients as numpy, RouterStats as numpy, compiled HLO text) of the training objective on a mesh."""
    cfg = cfg or _config()
    batch = batch if batch is not None else _batch()
    mesh = build_mesh(mesh_axes, devices=devices)
    rules = make_rules()
    graphdef, host_params = _weights(cfg)
    abstract = nnx.split(nnx.merge(graphdef, host_params))[1]
    params = jax.device_put(host_params, variable_shardings(abstract, mesh, rules))
    batch_sharding = {k: named_sharding(mesh, rules, ("batch",) + (("length",) if v.ndim == 2 else ()), v.shape)
                      for k, v in batch.items()}
    batch = jax.device_put(batch, batch_sharding)

    def objective(p):
        (objective_sum, tokens), aux = _loss_sums(p, batch, graphdef=graphdef, num_sources=1, chunk_size=0,
                                                  z_loss_weight=0.0)
        return objective_sum / tokens, aux["router"]

    with jax.set_mesh(mesh):
        step = jax.jit(jax.value_and_grad(objective, has_aux=True))
        compiled = step.lower(params).compile()
        (loss, stats), grads = compiled(params)
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, stats), compiled.as_text()


@functools.lru_cache(maxsize=None)
def _reference():
    return _loss_grads_stats({"data": 1}, devices=jax.devices()[:1])


def _assert_same_as_one_device(result, reference=None):
    loss, grads, stats, _ = result
    ref_loss, ref_grads, ref_stats, _ = reference or _reference()
    assert abs(loss - ref_loss) < 1e-5 * abs(ref_loss)
    flat, ref_flat = jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)
    for (path, g), ref in zip(flat, ref_flat):
        scale = max(np.abs(ref).max(), 1e-12)
        assert np.abs(g - ref).max() < 1e-5 * scale, jax.tree_util.keystr(path)
    for name in ("counts", "prob_sum", "tokens", "z_sum"):
        np.testing.assert_allclose(getattr(stats, name), getattr(ref_stats, name), rtol=1e-5, err_msg=name)


def _expert_stack_gathers(hlo: str) -> list[dict]:
    """All-gathers whose result is every expert's weights of a layer ([X, E, F] / [X, F, E], maybe with [L])."""
    whole = {(EXPERTS, WIDTH, FFN), (EXPERTS, FFN, WIDTH)}
    return [c for c in collectives(hlo) if c["kind"] == "all-gather" and tuple(c["shape"][-3:]) in whole]


# ----------------------------------------------------------------------------- the layer alone (fast)


def _layer_inputs(rows, seq):
    rng = np.random.RandomState(1)
    h = rng.normal(size=(rows, seq, WIDTH)).astype(np.float32)
    router = rng.normal(size=(WIDTH, EXPERTS)).astype(np.float32)
    params = {"expert_gate": rng.normal(size=(EXPERTS, WIDTH, FFN)).astype(np.float32) * 0.2,
              "expert_up": rng.normal(size=(EXPERTS, WIDTH, FFN)).astype(np.float32) * 0.2,
              "expert_down": rng.normal(size=(EXPERTS, FFN, WIDTH)).astype(np.float32) * 0.2}
    return h, router, params


def _layer_loss(h, router, params, rules):
    """A scalar of the MoE layer's output, through moe_mlp (which dispatches on the mesh being traced under)."""
    moe = _config().moe
    out, stats = moe_lib.moe_mlp(h, {"router": router, **params}, moe, "silu", None, rules)
    return jnp.sum(out * jnp.cos(out)), out


@pytest.mark.parametrize("mesh_axes, rows", [
    ({"expert": 4, "data": 2}, 8),  # tokens split over the expert axis: all-gather, reduce-scatter
    ({"data": 2, "expert": 4}, 2),  # 2 rows do not split over data x expert: tokens replicated, outputs summed
    pytest.param({"expert": 2, "tensor": 2, "fsdp": 2}, 8, marks=pytest.mark.slow),  # mlp split over tensor: partial sums
    pytest.param({"expert": 8}, 8, marks=pytest.mark.slow),  # one expert per device: fewer slots than top_k
])
def test_layer_output_and_gradients_equal_one_device(mesh_axes, rows):
    rules = make_rules()
    h, router, params = _layer_inputs(rows, 4)
    grad = jax.value_and_grad(_layer_loss, argnums=(0, 1, 2), has_aux=True)
    (_, ref_out), ref_grads = jax.jit(grad, static_argnums=3)(h, router, params, rules)
    mesh = build_mesh(mesh_axes)
    expert_spec = named_sharding(mesh, rules, ("exp", "embed", "mlp"), params["expert_gate"].shape)
    down_spec = named_sharding(mesh, rules, ("exp", "mlp", "embed"), params["expert_down"].shape)
    sharded = {"expert_gate": jax.device_put(params["expert_gate"], expert_spec),
               "expert_up": jax.device_put(params["expert_up"], expert_spec),
               "expert_down": jax.device_put(params["expert_down"], down_spec)}
    h_sharded = jax.device_put(h, named_sharding(mesh, rules, ("batch", "length", "act_embed"), h.shape))
    with jax.set_mesh(mesh):
        assert expert_parallel.is_active(rules, EXPERTS)
        (_, out), grads = jax.jit(grad, static_argnums=3)(h_sharded, router, sharded, rules)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-6)
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_tokens_move_within_the_expert_group_and_experts_stay_put():
    """Under {expert: 4, data: 2} the compiled step gathers each expert group's 64 tokens [64, E] and nothing of the
    whole batch's 256 token copies (GSPMD's grouped matmul all-gathers those copies onto all 8 devices and all-reduces
    their [256, F] and [256, E] products), and no collective rebuilds a layer's 8 experts."""
    *_, hlo = _loss_grads_stats({"expert": 4, "data": 2})
    found = collectives(hlo)
    group_tokens = 4 * (ROWS // 8) * SEQ  # 4 devices x 1 row x 16 positions
    assert any(c["kind"] == "all-gather" and c["shape"] == [group_tokens, WIDTH] for c in found)
    batch_copies = ROWS * SEQ * TOP_K
    assert [c for c in found if c["shape"][:1] == [batch_copies]] == []
    assert _expert_stack_gathers(hlo) == []


# ----------------------------------------------------------------------------- the whole model (slow)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes", [{"data": 8}, {"expert": 4, "data": 2}, {"expert": 2, "fsdp": 4},
                                       {"expert": 2, "tensor": 2, "data": 2}, {"expert": 2, "context": 2, "fsdp": 2}])
def test_loss_gradients_and_routing_equal_one_device(mesh_axes):
    _assert_same_as_one_device(_loss_grads_stats(mesh_axes))

"""Mixture-of-experts models (jaxcpt/model/moe.py, families qwen3_moe and mixtral) against transformers."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_logits, rel_err
from moe_models import MOE_CONFIGS, make_moe_model
from test_hf_roundtrip import read_all_tensors
from transformers import AutoModelForCausalLM

from jaxcpt.config import ConfigError
from jaxcpt.errors import HFFormatError, UserError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.model import moe as moe_lib
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train.step import _loss_sums

SEQ = 24


@pytest.fixture(scope="module")
def input_ids():
    return np.random.RandomState(0).randint(0, 256, size=(2, SEQ))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{name: (directory, torch model)} of every tiny MoE case, made once for the module."""
    out = {}
    for name in MOE_CONFIGS:
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, make_moe_model(name, directory))
    return out


@pytest.mark.parametrize("name", [pytest.param("qwen3_moe"), pytest.param("qwen3_moe_unnormalised", marks=pytest.mark.slow),
                                  pytest.param("mixtral_window", marks=pytest.mark.slow)])
def test_float32_logits_match_transformers_with_experts_split(name, hf_dirs, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory, mesh=build_mesh({"data": 2, "expert": 2, "tensor": 2}))
    with jax.set_mesh(model_mesh(nnx.state(model))):
        logits = _forward(model)(input_ids)
        # the routing matters: renormalising (or not) the top-k weights the other way changes the logits
        flipped = dataclasses.replace(model.config.moe, norm_topk_prob=not model.config.moe.norm_topk_prob)
        other = _forward(nnx.merge(*_with_config(model, dataclasses.replace(model.config, moe=flipped))))(input_ids)
    assert rel_err(logits, hf_logits(hf_model, input_ids)) < 1e-5
    assert rel_err(other, hf_logits(hf_model, input_ids)) > 1e-3


def _forward(model):
    """model(ids, segment_ids, positions) as one jitted program (eager calls dispatch op by op: slow on CPU)."""
    graphdef, params = nnx.split(model)
    jitted = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))
    return lambda *args: np.asarray(jitted(params, *(jnp.asarray(a) for a in args)))


def _with_config(model, cfg):
    from jaxcpt.model.transformer import abstract_model

    graphdef, _ = nnx.split(abstract_model(cfg, model.rules))
    return graphdef, nnx.state(model)


def test_packed_row_matches_each_document_alone(hf_dirs):
    """Documents packed in a row, padding after them (segment 0), each routed and attended as if alone."""
    directory, hf_model = hf_dirs["qwen3_moe"]
    forward = _forward(load_hf(directory, mesh=build_mesh({"data": 1}, devices=jax.devices()[:1])))
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 256, 10), rng.randint(0, 256, 11)
    packed = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None]
    segment_ids = np.array([[1] * 10 + [2] * 11 + [0] * 3])
    positions = np.array([list(range(10)) + list(range(11)) + [0] * 3])
    packed_logits = forward(packed, segment_ids, positions)
    assert rel_err(packed_logits[0, :10], hf_logits(hf_model, doc_a[None])[0]) < 1e-5
    assert rel_err(packed_logits[0, 10:21], hf_logits(hf_model, doc_b[None])[0]) < 1e-5


@pytest.mark.parametrize("name", ["qwen3_moe", pytest.param("mixtral_window", marks=pytest.mark.slow)])
def test_round_trip_is_bit_identical_and_loads_in_transformers(name, hf_dirs, tmp_path, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory, mesh=build_mesh({"fsdp": 2, "expert": 4}))
    save_hf(model, tmp_path / "out", dtype="float32", max_shard_size="60KB")
    assert read_all_tensors(tmp_path / "out").keys() == read_all_tensors(directory).keys()
    for key, value in read_all_tensors(directory).items():
        np.testing.assert_array_equal(read_all_tensors(tmp_path / "out")[key], value, err_msg=key)
    original, exported = (json.loads((d / "config.json").read_text()) for d in (directory, tmp_path / "out"))
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits", "sliding_window"):
        assert exported.get(key) == original.get(key), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids), hf_logits(hf_model, input_ids))


def _batch(input_ids, source=None):
    """A training batch whose loss is transformers' (labels = inputs, shifted inside; last position unscored)."""
    ids = jnp.asarray(input_ids, jnp.int32)
    batch, length = ids.shape
    targets = jnp.concatenate([ids[:, 1:], jnp.zeros((batch, 1), jnp.int32)], axis=1)
    mask = jnp.broadcast_to(jnp.arange(length) < length - 1, (batch, length)).astype(jnp.float32)
    return dict(inputs=ids, targets=targets, loss_mask=mask, segment_ids=jnp.ones_like(ids),
                positions=jnp.broadcast_to(jnp.arange(length), (batch, length)),
                source=jnp.zeros((batch,), jnp.int32) if source is None else source)


def _objective(model, batch):
    graphdef, params = nnx.split(model)
    (objective_sum, tokens), aux = _loss_sums(params, batch, graphdef=graphdef, num_sources=1, chunk_size=0,
                                              z_loss_weight=0.0)
    return objective_sum / tokens, aux


@pytest.mark.parametrize("name", ["qwen3_moe", pytest.param("mixtral_window", marks=pytest.mark.slow)])
def test_aux_loss_and_training_loss_equal_transformers(name, hf_dirs, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory)
    assert model.config.moe.router_aux_loss_coef == 0.02  # output_router_logits: the coefficient trains
    with torch.no_grad():
        out = hf_model(torch.tensor(input_ids), labels=torch.tensor(input_ids), output_router_logits=True)
    objective, aux = _objective(model, _batch(input_ids))
    assert abs(float(moe_lib.load_balancing_loss(aux["router"])) - out.aux_loss.item()) < 1e-6 * out.aux_loss.item()
    assert abs(float(objective) - out.loss.item()) < 1e-5 * out.loss.item()
    assert aux["router"].counts.shape == (2, model.config.moe.num_experts)
    assert float(aux["router"].counts.sum()) == 2 * input_ids.size * model.config.moe.top_k  # every token, k times


@pytest.mark.slow
def test_sgd_steps_follow_torch_autograd(hf_dirs, input_ids):
    """Three plain SGD steps on loss + aux loss: the losses agree with torch's at every step."""
    directory, _ = hf_dirs["qwen3_moe"]
    hf_model = AutoModelForCausalLM.from_pretrained(directory).float().train()
    model = load_hf(directory)
    ours, theirs = sgd_losses(model, hf_model, input_ids)
    assert ours[2] < ours[0] - 0.05  # the steps really moved the model
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def sgd_losses(model, hf_model, input_ids, steps: int = 3, lr: float = 0.5):
    """(our losses, torch's) over ``steps`` plain SGD steps on loss + aux loss from the same weights."""
    graphdef, params = nnx.split(model)
    batch = _batch(input_ids)

    @jax.jit
    def step(params):
        def loss(p):
            (objective_sum, tokens), _ = _loss_sums(p, batch, graphdef=graphdef, num_sources=1, chunk_size=0,
                                                    z_loss_weight=0.0)
            return objective_sum / tokens
        value, grads = jax.value_and_grad(loss)(params)
        return value, jax.tree.map(lambda w, g: w - lr * g, params, grads)

    ours, theirs = [], []
    for _ in range(steps):
        value, params = step(params)
        ours.append(float(value))
        hf_model.zero_grad()
        out = hf_model(torch.tensor(input_ids), labels=torch.tensor(input_ids), output_router_logits=True)
        out.loss.backward()
        with torch.no_grad():
            for p in hf_model.parameters():
                p -= lr * p.grad
        theirs.append(out.loss.item())
    return ours, theirs


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [{"data": 8}, {"expert": 4, "data": 2}, {"expert": 2, "fsdp": 4}])
def test_loss_and_gradient_norm_equal_across_meshes(mesh, hf_dirs):
    ids = np.random.RandomState(2).randint(0, 256, size=(8, 16))
    model = load_hf(hf_dirs["qwen3_moe"][0], mesh=build_mesh(mesh))
    graphdef, params = nnx.split(model)

    def loss(p):
        (objective_sum, tokens), _ = _loss_sums(p, _batch(ids), graphdef=graphdef, num_sources=1, chunk_size=0,
                                                z_loss_weight=0.0)
        return objective_sum / tokens

    with jax.set_mesh(model_mesh(params)):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
    expected = _reference_loss(hf_dirs, ids)
    assert abs(float(value) - expected[0]) < 1e-5 * expected[0]
    assert abs(float(optax_norm(grads)) - expected[1]) < 1e-5 * expected[1]


def model_mesh(params):
    return jax.tree.leaves(params)[0].sharding.mesh


def optax_norm(tree):
    import optax

    return optax.global_norm(tree)


def _reference_loss(hf_dirs, ids, _cache={}):
    """(loss, gradient norm) on one device, the oracle for the sharded runs."""
    if "value" not in _cache:
        model = load_hf(hf_dirs["qwen3_moe"][0], mesh=build_mesh({"data": 1}, devices=jax.devices()[:1]))
        graphdef, params = nnx.split(model)

        def loss(p):
            (objective_sum, tokens), _ = _loss_sums(p, _batch(ids), graphdef=graphdef, num_sources=1, chunk_size=0,
                                                    z_loss_weight=0.0)
            return objective_sum / tokens

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        _cache["value"] = (float(value), float(optax_norm(grads)))
    return _cache["value"]


def test_experts_not_divisible_by_the_expert_axis_name_the_fix(hf_dirs):
    with pytest.raises(UserError, match=r"6 experts cannot be split over the mesh's expert axis of size 4.*mesh.expert"):
        load_hf(hf_dirs["qwen3_moe_unnormalised"][0], mesh=build_mesh({"expert": 4, "data": 2}))


def test_top_k_larger_than_the_experts_is_refused():
    with pytest.raises(ConfigError, match=r"top_k \(9\) must be between 1 and num_experts \(8\)"):
        moe_lib.MoeConfig(num_experts=8, top_k=9).validate()


def test_router_shape_disagreeing_with_config_names_the_tensor(hf_dirs, tmp_path):
    import shutil

    directory = tmp_path / "hf"
    shutil.copytree(hf_dirs["qwen3_moe"][0], directory)
    config = json.loads((directory / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts", config.get("num_experts")) * 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match=r"model.layers.0.mlp.gate.weight.*shape \(8, 32\).*\(16, 32\)"):
        load_hf(directory)


def test_dense_and_moe_layers_mixed_are_refused_by_name(hf_dirs, tmp_path):
    from jaxcpt.hf.families import config_from_hf

    config = json.loads((hf_dirs["qwen3_moe"][0] / "config.json").read_text())
    with pytest.raises(HFFormatError, match="mlp_only_layers"):
        config_from_hf(dict(config, mlp_only_layers=[0]))


def _tiny_moe_config(**overrides):
    from jaxcpt.model.config import ModelConfig

    moe = moe_lib.MoeConfig(num_experts=4, top_k=2, expert_intermediate_size=16)
    return ModelConfig(family="qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                       num_heads=4, num_kv_heads=2, qk_norm=True, moe=moe, **overrides)


def test_flops_and_parameters_count_active_experts():
    from jaxcpt.train.metrics import flops_per_token

    cfg = _tiny_moe_config()
    expert = 3 * 32 * 16  # gate, up, down of one expert
    assert cfg.num_params() - cfg.num_active_params() == 2 * (4 - 2) * expert  # 2 layers x 2 experts not run
    dense_attention_only = flops_per_token(dataclasses.replace(cfg, moe=moe_lib.MoeConfig(
        num_experts=4, top_k=1, expert_intermediate_size=16)), 8)
    assert flops_per_token(cfg, 8) - dense_attention_only == 6 * 2 * expert  # one more active expert per layer


def test_lora_on_attention_of_an_moe_model_starts_at_the_base_model():
    from jaxcpt.model.lora import LoraConfig
    from jaxcpt.model.transformer import init_model

    mesh = build_mesh({"data": 1}, devices=jax.devices()[:1])
    adapted = init_model(_tiny_moe_config(lora=LoraConfig(rank=4, targets=["q", "v"])), mesh)
    state = nnx.state(adapted)
    for name in ("q_lora_a", "q_lora_b", "v_lora_a", "v_lora_b"):
        del state["layers"][name]
    base = nnx.merge(*_with_config(adapted, _tiny_moe_config())[:1], state)  # the same weights, no adapters
    ids = np.arange(16).reshape(1, 16)
    np.testing.assert_allclose(_forward(adapted)(ids), _forward(base)(ids), atol=1e-6)  # B = 0 at the start
    with pytest.raises(ConfigError, match="experts instead of a dense MLP"):
        _tiny_moe_config(lora=LoraConfig(rank=4, targets=["q", "gate"])).validate()

"""DeepSeek-V3 (jaxcpt/hf/families/deepseek_v3.py, jaxcpt/model/mla.py) against transformers 5.25's
DeepseekV3ForCausalLM: logits, packed documents, export round trip, each option that makes the family what it
is, the model's own e_score_correction_bias moved by auxiliary-loss-free balancing, and losses across meshes."""

import dataclasses
import functools
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from hf_models import hf_logits, random_moe_model, rel_err
from test_hf_roundtrip import read_all_tensors
from test_moe import _batch, _forward, model_mesh
from transformers import AutoModelForCausalLM, DeepseekV3Config

from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.families import config_from_hf
from jaxcpt.model.persist import params_of
from jaxcpt.model.transformer import abstract_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.train import balance
from jaxcpt.train.state import trainable_view
from jaxcpt.train.step import _loss_sums, train_step

SEQ = 24
TINY = dict(vocab_size=256, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=3,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=256,
            rms_norm_eps=1e-5, num_nextn_predict_layers=0)
# DeepSeek-V3's own RoPE: YaRN with mscale = mscale_all_dim (attention factor 1, softmax scale x mscale**2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 64}
CONFIGS = {
    # everything on: q through its low-rank bottleneck, interleaved RoPE, YaRN; top 3 of 8 experts in the top 2 of
    # 4 groups, scaled by 2.5; 2 shared experts; layer 0 dense, layers 1 and 2 MoE
    "v3": lambda: DeepseekV3Config(**TINY, q_lora_rank=24, n_group=4, topk_group=2, n_shared_experts=2,
                                   first_k_dense_replace=1, routed_scaling_factor=2.5, rope_interleave=True,
                                   rope_parameters=YARN),
    # one q_proj, RoPE in halves, no groups, no dense layer, v heads wider than the q/k heads' rope part
    "plain": lambda: DeepseekV3Config(**dict(TINY, v_head_dim=24), q_lora_rank=None, n_group=1, topk_group=1,
                                      n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=1.0,
                                      rope_interleave=False),
}


def make_model(name: str, directory, seed: int = 0):
    """Random-weight model ``name`` saved to ``directory`` (float32); returns the torch model (eval mode)
    (``hf_models.random_moe_model``)."""
    return random_moe_model(CONFIGS[name](), directory, seed)


@pytest.fixture(scope="module")
def input_ids():
    return np.random.RandomState(0).randint(0, 256, size=(2, SEQ))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    return {name: (d, make_model(name, d)) for name in CONFIGS for d in [tmp_path_factory.mktemp(name)]}


@pytest.fixture(scope="module")
def one_device(hf_dirs):
    mesh = build_mesh({"data": 1}, devices=jax.devices()[:1])
    return {name: load_hf(directory, mesh=mesh) for name, (directory, _) in hf_dirs.items()}


def test_import_reads_every_option(one_device):
    cfg = one_device["v3"].config
    assert cfg.mla.q_lora_rank == 24 and cfg.mla.rope_interleave and cfg.head_size == 8
    moe = cfg.moe
    assert (moe.scoring, moe.num_groups, moe.top_groups, moe.routed_scaling_factor, moe.shared_experts,
            moe.first_dense_layers, moe.score_correction_bias) == ("sigmoid", 4, 2, 2.5, 2, 1, True)
    layers = params_of(one_device["v3"])["layers"]
    assert layers["gate"].shape == (1, 32, 48) and layers["expert_gate"].shape == (2, 8, 32, 16)
    assert layers["selection_bias"].shape == (2, 8) and layers["selection_bias"].dtype == jnp.float32


@pytest.mark.parametrize("name,mesh", [("v3", {"fsdp": 2, "expert": 4}), ("plain", {"data": 1})])
def test_float32_logits_match_transformers(name, mesh, hf_dirs, one_device, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory, mesh=build_mesh(mesh)) if mesh != {"data": 1} else one_device[name]
    with jax.set_mesh(model_mesh(nnx.state(model))):
        logits = _forward(model)(input_ids)
    assert rel_err(logits, hf_logits(hf_model, input_ids)) < 1e-5


@pytest.mark.slow
def test_xla_attention_kernel_matches_with_padded_value_heads(hf_dirs, one_device, input_ids):
    """The kernels take one head width: v (10 wide) is zero-padded to the q/k width (20) and cut back after."""
    model = one_device["v3"]
    graphdef, state = nnx.split(abstract_model(dataclasses.replace(model.config, attention="xla"), model.rules))[0], \
        nnx.state(model)
    logits = _forward(nnx.merge(graphdef, state))(input_ids)
    assert rel_err(logits, hf_logits(hf_dirs["v3"][1], input_ids)) < 1e-5


def _without_q_bottleneck(cfg, layers):
    """q_lora_rank null: one q = q_a @ q_b, so only q_a_layernorm between them is lost."""
    layers["q"] = jnp.einsum("ler,lrhd->lehd", layers.pop("q_a"), layers.pop("q_b"))
    layers.pop("q_a_norm")
    return dataclasses.replace(cfg, mla=dataclasses.replace(cfg.mla, q_lora_rank=None))


def _moe(**changes):
    return lambda cfg, layers: dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **changes))


def _no_shared(cfg, layers):
    for name in ("shared_gate", "shared_up", "shared_down"):
        layers.pop(name)
    return _moe(shared_experts=0)(cfg, layers)


def _no_dense_layer(cfg, layers):
    """Layer 0 routed like the MoE layers (with layer 1's experts) instead of its dense MLP."""
    for name in ("gate", "up", "down"):
        layers.pop(name)
    for name in ("router", "expert_gate", "expert_up", "expert_down", "shared_gate", "shared_up", "shared_down",
                 "selection_bias"):
        layers[name] = jnp.concatenate([layers[name][:1], layers[name]])
    return _moe(first_dense_layers=0)(cfg, layers)


def _no_selection_bias(cfg, layers):
    layers.pop("selection_bias")
    return _moe(score_correction_bias=False)(cfg, layers)


OPTIONS_OFF = {
    "q_lora_rank": _without_q_bottleneck,
    "group_limited_routing": _moe(num_groups=1, top_groups=1),
    "shared_experts": _no_shared,
    "first_k_dense_replace": pytest.param(_no_dense_layer, marks=pytest.mark.slow),
    "routed_scaling_factor": _moe(routed_scaling_factor=1.0),
    "e_score_correction_bias": _no_selection_bias,
    "rope_interleave": lambda cfg, layers: dataclasses.replace(cfg, mla=dataclasses.replace(cfg.mla,
                                                                                          rope_interleave=False)),
}


@pytest.mark.parametrize("option", [pytest.param(name, marks=getattr(fn, "marks", ())) for name, fn in OPTIONS_OFF.items()])
def test_switching_an_option_off_misses_transformers_logits(option, one_device, hf_dirs, input_ids):
    model = one_device["v3"]
    params = params_of(model)
    layers = dict(params["layers"])
    switch = OPTIONS_OFF[option]
    cfg = (switch.values[0] if hasattr(switch, "values") else switch)(model.config, layers)
    cfg.validate()
    graphdef, _ = nnx.split(abstract_model(cfg, model.rules))
    other = _forward(nnx.merge(graphdef, dict(params, layers=layers)))(input_ids)
    assert rel_err(other, hf_logits(hf_dirs["v3"][1], input_ids)) > 1e-3


def test_packed_row_matches_each_document_alone(one_device, hf_dirs):
    forward, hf_model = _forward(one_device["v3"]), hf_dirs["v3"][1]
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 256, 10), rng.randint(0, 256, 11)
    packed = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None]
    segment_ids = np.array([[1] * 10 + [2] * 11 + [0] * 3])
    positions = np.array([list(range(10)) + list(range(11)) + [0] * 3])
    packed_logits = forward(packed, segment_ids, positions)
    assert rel_err(packed_logits[0, :10], hf_logits(hf_model, doc_a[None])[0]) < 1e-5
    assert rel_err(packed_logits[0, 10:21], hf_logits(hf_model, doc_b[None])[0]) < 1e-5


def test_round_trip_is_bit_identical_and_loads_in_transformers(hf_dirs, tmp_path, input_ids):
    directory, hf_model = hf_dirs["v3"]
    model = load_hf(directory, mesh=build_mesh({"fsdp": 2, "expert": 4}))
    save_hf(model, tmp_path / "out", dtype="float32", max_shard_size="60KB")
    original, exported = read_all_tensors(directory), read_all_tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    configs = [json.loads((d / "config.json").read_text()) for d in (directory, tmp_path / "out")]
    for key in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group",
                "topk_group", "n_shared_experts", "n_routed_experts", "first_k_dense_replace", "routed_scaling_factor",
                "norm_topk_prob", "rope_interleave", "moe_intermediate_size", "num_experts_per_tok", "head_dim"):
        assert configs[1].get(key) == configs[0].get(key), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids), hf_logits(hf_model, input_ids))


def _train_step(model, rate: float):
    params = params_of(model)
    keys = tuple(".".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    tx = optax.adamw(1e-3, weight_decay=0.1)
    step = jax.jit(functools.partial(
        train_step, graphdef=nnx.split(model)[0], tx=tx, schedule=lambda s: 1e-3, num_sources=1, grad_accum_steps=1,
        chunk_size=0, z_loss_weight=0.0, trainable_keys=keys, router_bias_rate=rate))
    state = {"params": params, "opt_state": tx.init(trainable_view(params, keys)), "step": jnp.zeros((), jnp.int32)}
    return step, state


def test_balancing_moves_the_models_own_bias_and_export_writes_it(one_device, hf_dirs, input_ids, tmp_path):
    """router_bias_update_rate moves layers.selection_bias (e_score_correction_bias) in place: by the centred sign
    of the step's load, untouched by AdamW (no gradient, no decay), and written back on export."""
    model, rate = one_device["v3"], 0.01
    step, state = _train_step(model, rate)
    before = np.asarray(state["params"]["layers"]["selection_bias"])
    batch = {k: v for k, v in _batch(input_ids).items()}
    new_state, metrics = step(state, batch)
    after = np.asarray(new_state["params"]["layers"]["selection_bias"])
    assert balance.STATE_KEY not in new_state and np.isfinite(float(metrics["loss"]))
    expected = balance.updated_bias(jnp.asarray(before), metrics["router_counts"], rate)
    np.testing.assert_array_equal(after, np.asarray(expected))
    assert np.abs(after - before).max() > 0.5 * rate
    np.testing.assert_array_equal(np.asarray(metrics["router_bias"]), after)
    trained = nnx.merge(nnx.split(model)[0], new_state["params"])
    save_hf(trained, tmp_path / "out", dtype="float32")
    exported = read_all_tensors(tmp_path / "out")
    for i, layer in enumerate((1, 2)):  # layer 0 is dense
        np.testing.assert_array_equal(exported[f"model.layers.{layer}.mlp.gate.e_score_correction_bias"], after[i])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rel_err(hf_logits(reloaded, input_ids), _forward(trained)(input_ids)) < 1e-5


def _loss(model, ids):
    graphdef, params = nnx.split(model)

    def loss(p):
        (objective_sum, tokens), _ = _loss_sums(p, _batch(ids), graphdef=graphdef, num_sources=1, chunk_size=0,
                                                z_loss_weight=0.0)
        return objective_sum / tokens

    with jax.set_mesh(model_mesh(params)):
        return float(jax.jit(loss)(params))


@pytest.mark.parametrize("mesh,remat", [pytest.param({"data": 8}, "none", marks=pytest.mark.slow),
                                        ({"expert": 4, "data": 2}, "none"),
                                        pytest.param({"expert": 2, "fsdp": 4}, "full", marks=pytest.mark.slow),
                                        pytest.param({"expert": 2, "tensor": 2, "fsdp": 2}, "save_dot_except_mlp",
                                                     marks=pytest.mark.slow)])
def test_loss_equals_transformers_on_every_mesh(mesh, remat, hf_dirs):
    """Heads split over tensor, experts over expert, weights over fsdp; the MLA projections under remat policies."""
    ids = np.random.RandomState(2).randint(0, 256, size=(8, 16))
    directory, hf_model = hf_dirs["v3"]
    with torch.no_grad():
        expected = hf_model(torch.tensor(ids), labels=torch.tensor(ids)).loss.item()
    assert abs(_loss(load_hf(directory, mesh=build_mesh(mesh), remat=remat), ids) - expected) < 1e-5 * expected


def _hf_config(hf_dirs, **changes):
    return dict(json.loads((hf_dirs["v3"][0] / "config.json").read_text()), **changes)


def test_fp8_checkpoint_is_refused_naming_the_dequantizing_conversion(hf_dirs):
    with pytest.raises(HFFormatError, match="FineGrainedFP8Config"):
        config_from_hf(_hf_config(hf_dirs, quantization_config={"quant_method": "fp8"}))


def test_multi_token_prediction_layers_are_skipped_with_a_note(hf_dirs, caplog):
    with caplog.at_level(logging.WARNING, logger="jaxcpt.hf"):
        cfg = config_from_hf(_hf_config(hf_dirs, num_nextn_predict_layers=1))
    assert cfg.num_layers == 3 and "model.layers.3" in caplog.text


def test_softmax_scoring_and_mismatched_kv_heads_are_refused(hf_dirs):
    with pytest.raises(HFFormatError, match="scoring_func"):
        config_from_hf(_hf_config(hf_dirs, scoring_func="softmax"))
    with pytest.raises(HFFormatError, match="num_key_value_heads"):
        config_from_hf(_hf_config(hf_dirs, num_key_value_heads=2))


def test_parameter_counts_equal_transformers_total_and_count_active_experts(one_device, hf_dirs):
    cfg, hf_model = one_device["v3"].config, hf_dirs["v3"][1]
    biases = sum(b.numel() for name, b in hf_model.named_buffers() if name.endswith("e_score_correction_bias"))
    assert cfg.num_params() == sum(p.numel() for p in hf_model.parameters()) + biases
    idle_experts = 2 * (8 - 3) * 3 * 32 * 16  # 2 MoE layers x 5 unchosen experts x gate, up, down
    assert cfg.num_active_params() == cfg.num_params() - idle_experts


def test_decoding_with_a_kv_cache_is_refused_naming_the_alternative(one_device):
    from jaxcpt.config import ConfigError
    from jaxcpt.model.decode import init_cache

    with pytest.raises(ConfigError, match="latent attention"):
        init_cache(one_device["v3"], 1, 8)


@pytest.mark.slow
def test_cpt_run_moves_the_bias_and_its_export_holds_the_last_steps_bias(tmp_path):
    """A whole run (expert parallel, report, final export) of a DeepSeek-V3 model built from the config:
    the bias metrics.jsonl records at the last step is the exported e_score_correction_bias, bit for bit."""
    from train_helpers import make_corpora, tiny_overrides

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    run = tmp_path / "run"
    deepseek = ["model.family=deepseek_v3", "model.num_kv_heads=4", "model.head_dim=8", "model.num_layers=3",
                "model.mla={q_lora_rank: 16, kv_lora_rank: 16, qk_nope_head_dim: 8, qk_rope_head_dim: 8, "
                "v_head_dim: 8}",
                "model.moe={num_experts: 8, top_k: 2, expert_intermediate_size: 16, scoring: sigmoid, num_groups: 4, "
                "top_groups: 2, routed_scaling_factor: 2.5, shared_experts: 1, first_dense_layers: 1, "
                "score_correction_bias: true, router_bias_update_rate: 0.01}"]
    args = tiny_overrides(run, make_corpora(tmp_path / "data"), steps=2, mesh="{expert: 2, data: 4}") + deepseek
    train(load_train_config(None, args + ["export.final=true", "export.dtype=float32"]))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    bias = np.asarray(last["routing"]["bias"], np.float32)  # [L_moe = 2, X = 8]
    assert last["step"] == 2 and np.abs(bias).max() > 0 and np.isfinite(last["loss"])
    exported = read_all_tensors(run / "hf" / "step_2")
    for i in range(2):
        np.testing.assert_array_equal(exported[f"model.layers.{i + 1}.mlp.gate.e_score_correction_bias"], bias[i])
    assert type(AutoModelForCausalLM.from_pretrained(run / "hf" / "step_2")).__name__ == "DeepseekV3ForCausalLM"


def test_export_check_passes_the_models_own_bias_and_refuses_one_kept_beside_it(one_device):
    from jaxcpt.config import ConfigError

    cfg = one_device["v3"].config
    own = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, router_bias_update_rate=0.01))
    balance.check_export(own, "refuse", exports=True)  # exported as e_score_correction_bias
    assert not balance.state_bias(own)
    beside = dataclasses.replace(own, moe=dataclasses.replace(own.moe, score_correction_bias=False))
    assert balance.state_bias(beside)
    with pytest.raises(ConfigError, match="export.router_bias=drop"):
        balance.check_export(beside, "refuse", exports=True)


def test_export_to_another_moe_family_refuses_deepseek_router_options():
    from jaxcpt.hf.families import config_to_hf
    from jaxcpt.model.config import ModelConfig
    from jaxcpt.model.moe import MoeConfig

    cfg = ModelConfig(family="qwen3_moe", qk_norm=True, moe=MoeConfig(num_experts=4, top_k=2, shared_experts=1))
    with pytest.raises(HFFormatError, match="shared_experts=1.*deepseek_v3"):
        config_to_hf(cfg, "float32")


def test_lora_on_an_mla_model_is_refused_by_name(one_device):
    from jaxcpt.config import ConfigError
    from jaxcpt.model.lora import LoraConfig

    with pytest.raises(ConfigError, match="MLA.*lora"):
        dataclasses.replace(one_device["v3"].config, lora=LoraConfig(targets=("o",))).validate()
    # the default targets get the same refusal, not the advice to adapt the experts (an MLA model takes no adapters)
    with pytest.raises(ConfigError, match="not supported on MLA models"):
        dataclasses.replace(one_device["v3"].config, lora=LoraConfig()).validate()
    # a run from an HF directory builds the model from a config nobody validated: refused where adapters are made
    with pytest.raises(ConfigError, match="not supported on MLA models"):
        abstract_model(dataclasses.replace(one_device["v3"].config, lora=LoraConfig(targets=("o",))))


def test_deepseek_and_gemma_router_options_are_refused_on_the_other_block(one_device):
    """The selection bias as a parameter exists in the MLA stack only (elsewhere balancing would silently stop),
    and Gemma 4's experts beside the MLP are not part of the MLA block (it crashed in the forward pass)."""
    from jaxcpt.config import ConfigError
    from jaxcpt.model.config import ModelConfig
    from jaxcpt.model.moe import MoeConfig

    qwen = ModelConfig(family="qwen3_moe", qk_norm=True, moe=MoeConfig(num_experts=4, top_k=2, score_correction_bias=True,
                                                                         router_bias_update_rate=0.01))
    with pytest.raises(ConfigError, match="score_correction_bias.*needs the DeepSeek-V3 block.*router_bias_update_rate"):
        qwen.validate()
    cfg = one_device["v3"].config
    for gemma in ({"beside_mlp": True}, {"beside_mlp": True, "router_norm": True, "per_expert_scale": True}):
        with pytest.raises(ConfigError, match="Gemma 4's MoE block"):
            dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **gemma)).validate()


def test_a_bias_kept_beside_the_parameters_covers_the_moe_layers_only(one_device, input_ids):
    """score_correction_bias off and a rate: state['router_bias'] is [L_moe, X] and routes the MoE layers."""
    cfg = one_device["v3"].config
    beside = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, score_correction_bias=False,
                                                              router_bias_update_rate=0.01))
    assert balance.bias_shape(beside) == (2, 8)
    params = params_of(one_device["v3"])
    layers = dict(params["layers"])
    own = layers.pop("selection_bias")
    model = nnx.merge(nnx.split(abstract_model(beside, one_device["v3"].rules))[0], dict(params, layers=layers))
    hidden, router = jax.jit(lambda ids, bias: model.hidden_states_and_router(ids, router_bias=bias))(input_ids, own)
    assert router.counts.shape == (2, 8)
    expected = jax.jit(lambda ids: one_device["v3"].hidden_states(ids))(input_ids)
    np.testing.assert_array_equal(np.asarray(hidden), np.asarray(expected))  # the same bias, beside or inside

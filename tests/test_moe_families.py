"""OLMoE and gpt-oss (jaxcpt/hf/families/olmoe.py, gpt_oss.py) against transformers: logits, packed documents,
export round trip, aux loss, greedy generation, and the options that make each family what it is."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import hf_logits, random_moe_model, rel_err
from test_hf_roundtrip import read_all_tensors
from test_moe import _batch, _forward, _objective, model_mesh, sgd_losses
from transformers import AutoModelForCausalLM, GptOssConfig, OlmoeConfig

from jaxcpt.config import ConfigError
from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.model import moe as moe_lib
from jaxcpt.model.transformer import abstract_model
from jaxcpt.sharding.mesh import build_mesh

SEQ = 24
TINY = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5, router_aux_loss_coef=0.02, output_router_logits=True)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": False, "original_max_position_embeddings": 64}  # factor 4 = 256 / 64, as transformers checks
CONFIGS = {
    # top 3 of 8, probabilities used as they are; q/k norms over the whole projection (32 and 16 channels)
    "olmoe": lambda: OlmoeConfig(**TINY, intermediate_size=16, num_experts=8, num_experts_per_tok=3,
                                 norm_topk_prob=False),
    # top 2 of 4; a sliding layer (window 5) then a full one; head_dim 16 (not 32 / 4); YaRN from 64 positions,
    # not truncated; a SwiGLU limit small enough that the tiny model's activations reach it; expert width 32, a
    # whole MXFP4 block
    "gpt_oss": lambda: GptOssConfig(**TINY, head_dim=16, intermediate_size=32, num_local_experts=4,
                                    num_experts_per_tok=2, sliding_window=5, swiglu_limit=0.3, rope_parameters=YARN),
}
FAMILIES = list(CONFIGS)
# olmoe's packing, export and aux-loss paths are qwen3_moe's (tests/test_moe.py): its cases run in the slow suite
GPT_OSS_DEFAULT = [pytest.param("olmoe", marks=pytest.mark.slow), "gpt_oss"]


def make_model(name: str, directory, seed: int = 0):
    """Random-weight model ``name`` saved to ``directory`` (float32); returns the torch model (eval mode)
    (``hf_models.random_moe_model``)."""
    return random_moe_model(CONFIGS[name](), directory, seed)


@pytest.fixture(scope="module")
def input_ids():
    return np.random.RandomState(0).randint(0, 256, size=(2, SEQ))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{family: (directory, torch model)}, made once for the module."""
    out = {}
    for name in CONFIGS:
        directory = tmp_path_factory.mktemp(name)
        out[name] = (directory, make_model(name, directory))
    return out


@pytest.fixture(scope="module")
def one_device_models(hf_dirs):
    """{family: model loaded on one device}, shared by the tests that need no mesh."""
    mesh = build_mesh({"data": 1}, devices=jax.devices()[:1])
    return {name: load_hf(directory, mesh=mesh) for name, (directory, _) in hf_dirs.items()}


MESHES = {"olmoe": {"fsdp": 2, "expert": 4}, "gpt_oss": {"data": 2, "expert": 2, "tensor": 2}}


@pytest.mark.parametrize("name", FAMILIES)
def test_float32_logits_match_transformers_with_experts_split(name, hf_dirs, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory, mesh=build_mesh(MESHES[name]))
    with jax.set_mesh(model_mesh(nnx.state(model))):
        logits = _forward(model)(input_ids)
    assert rel_err(logits, hf_logits(hf_model, input_ids)) < 1e-5


# What switching each family option off means: (ModelConfig changes, MoeConfig changes, parameters dropped)
OPTIONS_OFF = {
    ("olmoe", "no renormalisation"): ({}, dict(norm_topk_prob=True), ()),
    ("gpt_oss", "attention sinks"): (dict(attention_sinks=False), {}, ("sinks",)),
    ("gpt_oss", "clamped SwiGLU"): ({}, dict(swiglu_limit=None), ()),
    ("gpt_oss", "expert biases"): ({}, dict(expert_bias=False), ("expert_gate_bias", "expert_up_bias",
                                                                  "expert_down_bias")),
    ("gpt_oss", "router bias"): ({}, dict(router_bias=False), ("router_bias",)),
}


SLOW_OPTIONS = {("gpt_oss", "expert biases"), ("gpt_oss", "router bias")}  # the slow suite checks these


@pytest.mark.parametrize("name,option", [pytest.param(*key, id="-".join(key),
                                                      marks=[pytest.mark.slow] * (key in SLOW_OPTIONS))
                                         for key in OPTIONS_OFF])
def test_switching_a_family_option_off_changes_the_logits(name, option, one_device_models, hf_dirs, input_ids):
    """Each option the family declares changes its function: without it, transformers' logits are missed."""
    model = one_device_models[name]
    changes, moe_changes, dropped = OPTIONS_OFF[(name, option)]
    cfg = dataclasses.replace(model.config, moe=dataclasses.replace(model.config.moe, **moe_changes), **changes)
    state = nnx.state(model)
    for param in dropped:
        del state["layers"][param]
    graphdef, _ = nnx.split(abstract_model(cfg, model.rules))
    other = _forward(nnx.merge(graphdef, state))(input_ids)
    assert rel_err(other, hf_logits(hf_dirs[name][1], input_ids)) > 1e-3


@pytest.mark.parametrize("name", GPT_OSS_DEFAULT)
def test_packed_row_matches_each_document_alone(name, one_device_models, hf_dirs):
    """Documents packed in a row, padding after them (segment 0), each routed and attended as if alone
    (gpt-oss: its sinks and sliding window inside each document)."""
    forward, hf_model = _forward(one_device_models[name]), hf_dirs[name][1]
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 256, 10), rng.randint(0, 256, 11)
    packed = np.concatenate([doc_a, doc_b, [0, 0, 0]])[None]
    segment_ids = np.array([[1] * 10 + [2] * 11 + [0] * 3])
    positions = np.array([list(range(10)) + list(range(11)) + [0] * 3])
    packed_logits = forward(packed, segment_ids, positions)
    assert rel_err(packed_logits[0, :10], hf_logits(hf_model, doc_a[None])[0]) < 1e-5
    assert rel_err(packed_logits[0, 10:21], hf_logits(hf_model, doc_b[None])[0]) < 1e-5


@pytest.mark.parametrize("name", GPT_OSS_DEFAULT)
def test_round_trip_is_bit_identical_and_loads_in_transformers(name, hf_dirs, tmp_path, input_ids):
    directory, hf_model = hf_dirs[name]
    model = load_hf(directory, mesh=build_mesh({"fsdp": 2, "expert": 4}))
    save_hf(model, tmp_path / "out", dtype="float32", max_shard_size="60KB")
    original, exported = read_all_tensors(directory), read_all_tensors(tmp_path / "out")
    assert exported.keys() == original.keys()
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    configs = [json.loads((d / "config.json").read_text()) for d in (directory, tmp_path / "out")]
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "output_router_logits", "norm_topk_prob",
                "sliding_window", "layer_types", "swiglu_limit", "swiglu_alpha", "attention_bias"):
        assert configs[1].get(key) == configs[0].get(key), key
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, input_ids), hf_logits(hf_model, input_ids))


@pytest.mark.parametrize("name", GPT_OSS_DEFAULT)
def test_aux_loss_and_training_loss_equal_transformers(name, one_device_models, hf_dirs, input_ids):
    model, hf_model = one_device_models[name], hf_dirs[name][1]
    assert model.config.moe.router_aux_loss_coef == 0.02  # output_router_logits: the coefficient trains
    with torch.no_grad():
        out = hf_model(torch.tensor(input_ids), labels=torch.tensor(input_ids), output_router_logits=True)
    objective, aux = _objective(model, _batch(input_ids))
    assert abs(float(moe_lib.load_balancing_loss(aux["router"])) - out.aux_loss.item()) < 1e-6 * out.aux_loss.item()
    assert abs(float(objective) - out.loss.item()) < 1e-5 * out.loss.item()


@pytest.mark.parametrize("name", GPT_OSS_DEFAULT)
def test_greedy_generation_with_the_kv_cache_matches_transformers_generate(name, one_device_models, hf_dirs):
    """Decoding over the KV cache (gpt-oss: sinks in the cached attention, a window shorter than the text)."""
    from jaxcpt.model.decode import generate_greedy

    model, hf_model = one_device_models[name], hf_dirs[name][1]
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, 256, size=n).tolist() for n in (4, 11)]  # different lengths: left padding
    width = max(map(len, prompts))
    ids, mask = np.zeros((2, width), np.int32), np.zeros((2, width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    tokens, _ = generate_greedy(model, ids, mask, max_new_tokens=10)
    for row, prompt in enumerate(prompts):
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, len(prompt):].tolist()
        assert np.asarray(tokens[row]).tolist() == expected



@pytest.mark.slow
def test_gpt_oss_sgd_steps_follow_torch_autograd(hf_dirs, input_ids):
    """Three plain SGD steps on loss + aux loss: the gradients through sinks, biases and the clamped SwiGLU
    move the model as torch's autograd moves transformers' (losses equal at every step)."""
    directory = hf_dirs["gpt_oss"][0]
    hf_model = AutoModelForCausalLM.from_pretrained(directory).float().train()  # no dropout in this config
    model = load_hf(directory, mesh=build_mesh({"data": 1}, devices=jax.devices()[:1]))
    ours, theirs = sgd_losses(model, hf_model, input_ids)
    assert ours[2] < ours[0] - 0.05  # the steps really moved the model
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)

# --- bad input -----------------------------------------------------------------------------------

def _config(name, hf_dirs, **changes):
    return dict(json.loads((hf_dirs[name][0] / "config.json").read_text()), **changes)


def test_olmoe_clip_qkv_is_refused_by_name(hf_dirs):
    from jaxcpt.hf.families import config_from_hf

    with pytest.raises(HFFormatError, match="clip_qkv=8.0"):
        config_from_hf(_config("olmoe", hf_dirs, clip_qkv=8.0))


@pytest.mark.parametrize("kernel", ["cudnn", "splash"])
def test_kernels_without_sinks_refuse_them_naming_the_option(kernel):
    from jaxcpt.model.attention import choose_attention

    with pytest.raises(ConfigError, match=rf"model.attention={kernel} has no attention sinks.*model.attention_sinks"):
        choose_attention(kernel, "bfloat16", 128, sinks=True)
    assert choose_attention("auto", "float32", 24, sinks=True).__name__ == "attention_reference"  # on CPU


def test_gpt_oss_export_without_its_options_is_refused(hf_dirs):
    from jaxcpt.hf.convert import read_hf_config
    from jaxcpt.hf.families import config_to_hf, tensor_table

    cfg = read_hf_config(hf_dirs["gpt_oss"][0])
    with pytest.raises(HFFormatError, match=r"model.moe.expert_bias=False"):
        config_to_hf(dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_bias=False)), "float32")
    with pytest.raises(HFFormatError, match=r"attention_sinks=False"):
        config_to_hf(dataclasses.replace(cfg, attention_sinks=False), "float32")
    olmoe = read_hf_config(hf_dirs["olmoe"][0])  # another MoE family cannot hold gpt-oss's expert biases
    with pytest.raises(HFFormatError, match=r"family 'olmoe' has no router or expert biases"):
        tensor_table(dataclasses.replace(olmoe, moe=dataclasses.replace(olmoe.moe, expert_bias=True)))


# --- MXFP4 (the released gpt-oss experts) ------------------------------------------------------------

def _mxfp4(rng, experts: int, rows: int, cols: int, exponents=(118, 123)):
    """A random MXFP4 packing of a weight [experts, cols, rows]: blocks uint8 [X, rows, cols / 32, 16], scales
    uint8 [X, rows, cols / 32] (E8M0 exponents; the default range gives weights of about 0.004 to 0.09)."""
    blocks = rng.randint(0, 256, size=(experts, rows, cols // 32, 16)).astype(np.uint8)
    scales = rng.randint(*exponents, size=(experts, rows, cols // 32)).astype(np.uint8)
    return blocks, scales


def test_mxfp4_dequantization_equals_transformers_dequantizer():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from jaxcpt.hf.mxfp4 import dequantize

    blocks, scales = _mxfp4(np.random.RandomState(0), 3, 8, 64, exponents=(1, 250))  # every code, wide exponents
    got = dequantize(blocks, scales)
    assert got.shape == (3, 64, 8)
    for dtype in (torch.float32, torch.bfloat16):  # exact in both: FP4 times a power of two
        expected = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=dtype)
        np.testing.assert_array_equal(got.astype(np.float32), expected.float().numpy())


@pytest.mark.slow
def test_mxfp4_checkpoint_imports_dequantized_and_matches_transformers(hf_dirs, tmp_path, input_ids):
    """A gpt-oss checkpoint with its experts MXFP4-packed, as released: jaxcpt's logits equal those of
    transformers loading it with Mxfp4Config(dequantize=True)."""
    from safetensors.numpy import save_file
    from transformers import Mxfp4Config

    directory = hf_dirs["gpt_oss"][0]
    tensors, config = read_all_tensors(directory), json.loads((directory / "config.json").read_text())
    rng = np.random.RandomState(3)
    x, e, f = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    for layer in range(config["num_hidden_layers"]):
        for proj, (rows, cols) in (("gate_up_proj", (2 * f, e)), ("down_proj", (e, f))):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            del tensors[name]
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = _mxfp4(rng, x, rows, cols)
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    save_file(tensors, quantized / "model.safetensors", metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (quantized / "config.json").write_text(json.dumps(config))
    hf_model = AutoModelForCausalLM.from_pretrained(quantized, quantization_config=Mxfp4Config(dequantize=True),
                                                    dtype=torch.float32).eval()
    model = load_hf(quantized, mesh=build_mesh({"data": 1}, devices=jax.devices()[:1]))
    assert rel_err(_forward(model)(input_ids), hf_logits(hf_model, input_ids)) < 1e-5


def test_other_quantization_is_refused_naming_the_dequantizing_conversion(hf_dirs):
    from jaxcpt.hf.families import config_from_hf

    config = _config("gpt_oss", hf_dirs, quantization_config={"quant_method": "fp8"})
    with pytest.raises(HFFormatError, match=r"quantization_config: fp8.*Mxfp4Config\(dequantize=True\)"):
        config_from_hf(config)


def test_context_parallelism_refuses_attention_sinks_naming_the_option(hf_dirs):
    import jax.numpy as jnp

    mesh = build_mesh({"data": 2, "context": 4})
    model = load_hf(hf_dirs["gpt_oss"][0], mesh=mesh)
    with jax.set_mesh(mesh), pytest.raises(ConfigError, match=r"does not support attention sinks.*attention_sinks"):
        jax.eval_shape(model.hidden_states, jnp.zeros((2, 64), jnp.int32))


def test_mxfp4_scales_past_bfloat16_are_refused_naming_the_tensor():
    from jaxcpt.hf.mxfp4 import Mxfp4Reader

    blocks, scales = _mxfp4(np.random.RandomState(0), 1, 2, 32)
    scales[0, 1, 0] = 255  # 2 ** 128: past float32 and bfloat16 for any code above 0.5

    class Reader:  # the two tensors of one packed weight, as SafetensorsReader gives them
        weight_map = {"w_blocks": "model.safetensors", "w_scales": "model.safetensors"}

        def get(self, name):
            return {"w_blocks": blocks, "w_scales": scales}[name]

        def where(self, name):
            return "ckpt/model.safetensors"

    with pytest.raises(HFFormatError, match=r"MXFP4 tensor 'w' in 'ckpt/model.safetensors'.*damaged"):
        Mxfp4Reader(Reader()).get("w")

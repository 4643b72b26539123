"""Adapting the 2026 families (OLMo 3, SmolLM3, Qwen3.5's Gated DeltaNet hybrid): extend-vocab, merge and LoRA.

The oracles are transformers (the written directories load and compute the old function, or the merged
weights' function) and peft (``PeftModel.from_pretrained`` on our adapter directory computes our logits).
expand-depth has its own tests (tests/test_families_2026.py, tests/test_qwen3_5.py).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import FAMILY_CONFIGS, OPTION_CONFIGS, hf_logits, rel_err
from merge_helpers import read_tensors, same_bits
from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.errors import UserError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.families import config_from_hf
from jaxcpt.hf.peft_export import save_peft_adapter
from jaxcpt.model.lora import LoraConfig
from jaxcpt.model.transformer import abstract_model
from jaxcpt.model.persist import base_model, params_of
from jaxcpt.sharding.mesh import build_mesh

# one repeat of Qwen3.5's pattern (3 Gated DeltaNet layers, 1 gated full-attention layer)
QWEN3_5 = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-5)
FAMILIES = {
    "olmo3": lambda: OPTION_CONFIGS["olmo3_post_norm_pattern"](),  # post-norms, [H*D] q/k norms, 3 sliding : 1 full
    "smollm3": lambda: OPTION_CONFIGS["smollm3_nope"](),  # NoPE layers
    "qwen3_5_text": lambda: Qwen3_5TextConfig(**QWEN3_5),
}
# what each family's config.json says about its layers, which an adaptation must carry over
LAYER_KEYS = {"olmo3": ("layer_types",), "smollm3": ("layer_types", "no_rope_layers"),
              "qwen3_5_text": ("layer_types",)}
assert set(FAMILY_CONFIGS).isdisjoint(FAMILIES)


def make_model(family: str, directory, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 model of ``family`` saved to ``directory``, norms and biases randomised as in hf_models."""
    config = FAMILIES[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval().save_pretrained(directory)
    return model


def _config_json(directory) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


# --- extend-vocab ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_extend_vocab_keeps_the_old_function_and_every_other_tensor(family, tmp_path):
    from tokenizer_fixtures import qwen_style_tokenizer_dir

    from adapt_fixtures import BYTE_LEVEL_MODEL_VOCAB, BYTE_LEVEL_TOKENIZER_IDS

    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(qwen_style_tokenizer_dir(), base)
    make_model(family, base, vocab_size=BYTE_LEVEL_MODEL_VOCAB)
    (tmp_path / "tokens.txt").write_text(" dataframe\n tokenizer\n gradient\n")
    assert main(["extend-vocab", str(base), "--tokens", str(tmp_path / "tokens.txt"), "--out", str(out),
                 "--init", "subword-mean"]) == 0

    before, after = read_tensors(base), read_tensors(out)
    assert before.keys() == after.keys()
    new_vocab = _config_json(out)["vocab_size"]
    assert new_vocab > BYTE_LEVEL_MODEL_VOCAB
    for name, value in before.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert after[name].shape == (new_vocab, value.shape[1])
            assert same_bits(after[name][:BYTE_LEVEL_MODEL_VOCAB], value), name
        else:
            assert same_bits(after[name], value), name
    for key in LAYER_KEYS[family]:
        assert _config_json(out)[key] == _config_json(base)[key], key
    # jaxcpt reads the written config back as the same model, the vocabulary grown
    assert config_from_hf(_config_json(out)) == dataclasses.replace(config_from_hf(_config_json(base)),
                                                                    vocab_size=new_vocab)
    # transformers: the old tokens' logits are unchanged
    ids = np.random.RandomState(0).randint(0, BYTE_LEVEL_TOKENIZER_IDS, size=(2, 12))
    grown = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert type(grown) is type(original)
    assert rel_err(hf_logits(grown, ids)[..., :BYTE_LEVEL_MODEL_VOCAB], hf_logits(original, ids)) < 1e-6


# --- merge ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_linear_merge_interpolates_every_tensor_and_loads_in_transformers(family, tmp_path):
    make_model(family, tmp_path / "base", seed=0)
    make_model(family, tmp_path / "model", seed=1)
    t = 0.3
    assert main(["merge", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "model"), "--t", str(t),
                 "--out", str(tmp_path / "out")]) == 0
    merged, a, b = read_tensors(tmp_path / "out"), read_tensors(tmp_path / "base"), read_tensors(tmp_path / "model")
    assert merged.keys() == a.keys()  # every tensor of the family's table, the linear layers' included
    for name in a:
        assert same_bits(merged[name], np.float32(1 - t) * a[name] + np.float32(t) * b[name]), name
    for key in LAYER_KEYS[family]:
        assert _config_json(tmp_path / "out")[key] == _config_json(tmp_path / "model")[key], key
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor


def test_a_hybrid_checkpoint_input_merges_like_its_hf_directory(tmp_path):
    """The checkpoint's [L_linear, ...] stacks are read by stack index: the merge equals the HF directories' bitwise."""
    make_model("qwen3_5_text", tmp_path / "base", seed=0)
    make_model("qwen3_5_text", tmp_path / "model", seed=1)
    assert main(["import-hf", str(tmp_path / "base"), "--out", str(tmp_path / "base_ckpt"), "--mesh",
                 "{fsdp: 2, tensor: 4}"]) == 0
    for name, base in (("hf", "base"), ("ckpt", "base_ckpt")):
        assert main(["merge", "--method", "slerp", "--base", str(tmp_path / base), "--model", str(tmp_path / "model"),
                     "--t", "0.4", "--out", str(tmp_path / name)]) == 0
    from_hf, from_ckpt = read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "ckpt")
    assert from_hf.keys() == from_ckpt.keys()
    assert all(same_bits(from_ckpt[k], from_hf[k]) for k in from_hf)


@pytest.mark.parametrize("change,named", [
    (dict(layer_types=["linear_attention", "full_attention"] * 2), "linear_layers"),
    (dict(linear_num_value_heads=2), "linear_attention"),
], ids=["other_layer_pattern", "other_linear_heads"])
def test_hybrids_with_another_layer_pattern_or_linear_heads_are_refused_by_name(change, named, tmp_path, capsys):
    make_model("qwen3_5_text", tmp_path / "base", seed=0)
    make_model("qwen3_5_text", tmp_path / "model", seed=1, **change)
    assert main(["merge", "--base", str(tmp_path / "base"), "--model", str(tmp_path / "model"), "--t", "0.5",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "do not share an architecture" in err and f"{named}:" in err, err
    assert not (tmp_path / "out").exists()


# --- LoRA -----------------------------------------------------------------------------------------------------------

LINEAR_TARGETS = ["lin_qkv", "lin_z", "lin_b", "lin_a", "lin_out"]


def _adapted(hf_dir, lora: LoraConfig, trained_too: tuple[str, ...] = (), seed: int = 1):
    """test_lora's adapted model (random A and B, ``trained_too`` perturbed), on one device: eager work is cheap."""
    from test_lora import _adapted as adapted

    return adapted(hf_dir, lora, seed=seed, trained_too=trained_too, mesh=build_mesh({"data": 1}, devices=jax.devices()[:1]))


@nnx.jit
def _logits(model, ids):
    return model(ids)


def logits(model, ids) -> np.ndarray:
    """The model's float32 logits as one compiled program (op-by-op dispatch of the hybrid is slow)."""
    return np.asarray(_logits(model, jnp.asarray(ids)))


def _peft_logits(base_dir, adapter_dir, input_ids):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return hf_logits(PeftModel.from_pretrained(base, adapter_dir).eval(), input_ids)


@pytest.fixture(scope="module")
def adapted_hybrid(tmp_path_factory):
    """(base HF directory, the Qwen3.5 model with random adapters on attention, Gated DeltaNet and MLP projections,
    its linear layers' gated-norm scales moved as if they had trained)."""
    directory = tmp_path_factory.mktemp("qwen3_5_lora") / "base"
    make_model("qwen3_5_text", directory)
    lora = LoraConfig(rank=3, alpha=6.0, targets=["q", "v", "o", *LINEAR_TARGETS, "down"])
    return directory, _adapted(directory, lora, trained_too=("layers.lin_norm",))


def test_lora_on_attention_and_gated_deltanet_projections_loads_in_peft_and_merges(adapted_hybrid, tmp_path):
    base, model = adapted_hybrid
    assert model.layers.lin_qkv_lora_a[...].shape == (3, 64, 3)  # stacked over the 3 linear layers only
    assert model.layers.q_lora_a[...].shape == (1, 64, 3)  # over the 1 attention layer
    input_ids = np.random.RandomState(0).randint(0, 300, size=(2, 20))
    ours = logits(model, input_ids)
    assert rel_err(logits(base_model(model), input_ids), ours) > 1e-3  # the adapters matter

    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), trained=("layers.lin_norm",),
                      dtype="float32")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(["q_proj", "v_proj", "o_proj", "down_proj", "in_proj_qkv",
                                                       "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"])
    assert config["modules_to_save"] == ["linear_attn.norm"]
    assert rel_err(_peft_logits(base, tmp_path / "adapter", input_ids), ours) < 1e-5

    save_hf(model, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert rel_err(hf_logits(merged, input_ids), ours) < 1e-5


def test_lora_targets_that_cannot_work_are_refused_naming_why():
    with pytest.raises(ConfigError, match="depthwise convolution.*train it whole"):
        LoraConfig(targets=["lin_conv"]).validate()
    with pytest.raises(ConfigError, match="did you mean 'lin_qkv'"):
        LoraConfig(targets=["in_proj_qkv"]).validate()
    with pytest.raises(ConfigError, match="lin_z, projections of Gated DeltaNet layers, but this model has no "
                                          "linear_attention layers"):
        dense = config_from_hf(FAMILIES["olmo3"]().to_dict())
        abstract_model(dataclasses.replace(dense, lora=LoraConfig(targets=["q", "lin_z"])))


def test_a_trained_parameter_that_is_not_a_module_is_refused_in_the_peft_export(adapted_hybrid, tmp_path):
    """peft's modules_to_save saves whole modules: A_log is a bare parameter of linear_attn, whose projections are
    LoRA-wrapped; the export says so and what to export instead, and writes nothing."""
    base, model = adapted_hybrid
    with pytest.raises(UserError, match=r"A_log.*not a module.*merged"):
        save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base), trained=("layers.lin_a_log",))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow  # a training program of the hybrid, compiled
def test_a_lora_run_on_the_hybrid_trains_its_adapters_only_and_exports_what_peft_loads(tmp_path):
    from test_data_fixtures import make_texts, write_jsonl
    from tokenizer_fixtures import llama_style_tokenizer_dir
    from transformers import AutoTokenizer

    from jaxcpt.open_model import open_model
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    base = tmp_path / "base"
    shutil.copytree(llama_style_tokenizer_dir(), base)
    make_model("qwen3_5_text", base, vocab_size=len(AutoTokenizer.from_pretrained(base)))
    write_jsonl(str(tmp_path / "domain.jsonl"), make_texts(200, seed=2, tag="dom"))
    targets = ", ".join(["q", "k", "v", "o", *LINEAR_TARGETS, "gate", "up", "down"])
    train(load_train_config(None, [
        f"run_dir={tmp_path / 'run'}", "init.source=hf", f"init.path={base}", "model.dtype=float32",
        f"data.sources=[{{name: domain, paths: [{tmp_path / 'domain.jsonl'}], eval_documents: 8}}]",
        "data.seq_len=32", "data.eval_rows=8", "data.shuffle_buffer=32", "train.steps=3", "train.batch_size=8",
        "train.log_every=1", "eval.every=0", "checkpoint.every_steps=0", "optim.schedule.peak_lr=1e-2",
        "optim.schedule.warmup_steps=1", "mesh={fsdp: 2, tensor: 4}", f"model.lora={{rank: 4, alpha: 8, targets: [{targets}]}}",
        "export.final=true", "export.dtype=float32"]))
    run = tmp_path / "run"
    opened = open_model(run, lora="adapter", mesh=build_mesh({"data": 8}))
    trained = jax.tree.map(np.asarray, opened.params)
    start = jax.tree.map(np.asarray, params_of(load_hf(base, mesh=build_mesh({"data": 8}))))
    for name, value in start["layers"].items():  # the base is bitwise what the run started from
        np.testing.assert_array_equal(trained["layers"][name], value, err_msg=name)
    for target in ("q", *LINEAR_TARGETS, "down"):  # every adapter trained, the linear layers' included
        assert np.abs(trained["layers"][f"{target}_lora_b"]).max() > 0, target

    input_ids = np.random.RandomState(0).randint(0, 200, size=(2, 20))
    ours = logits(opened.model(), input_ids)
    assert rel_err(_peft_logits(base, run / "hf" / "step_3-adapter", input_ids), ours) < 1e-5
    merged = AutoModelForCausalLM.from_pretrained(run / "hf" / "step_3", dtype=torch.float32).eval()
    assert rel_err(hf_logits(merged, input_ids), ours) < 1e-5

"""expand-depth: identity-initialised block copies leave the model's function unchanged, in transformers too."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import hf_logits, make_hf_model, rel_err
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from jaxcpt.adapt.depth import insertion_points
from jaxcpt.adapt.metadata import read_adaptation
from jaxcpt.cli import main

IDS = np.random.RandomState(0).randint(0, 256, size=(2, 16))


def _torch(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["llama_bias", "qwen2_tied"])
def test_expanded_model_computes_the_original_function(name, tmp_path):
    """llama_bias has o_proj and down_proj biases (zeroed too); qwen2_tied has q/k/v biases and tied embeddings."""
    from jaxcpt.hf import load_hf

    make_hf_model(name, tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--after", "0,1", "--out", str(tmp_path / "out")]) == 0
    expanded = _torch(tmp_path / "out")
    assert expanded.config.num_hidden_layers == 4
    original_logits = hf_logits(_torch(tmp_path / "base"), IDS)
    assert rel_err(hf_logits(expanded, IDS), original_logits) < 1e-6
    jax_expanded = np.asarray(load_hf(tmp_path / "out")(jnp.asarray(IDS)))
    jax_original = np.asarray(load_hf(tmp_path / "base")(jnp.asarray(IDS)))
    assert rel_err(jax_expanded, jax_original) < 1e-6
    assert rel_err(jax_expanded, original_logits) < 1e-5  # jaxcpt's expanded model against transformers' original


def test_copies_keep_their_block_with_output_projections_zeroed(tmp_path):
    make_hf_model("llama_bias", tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--every", "2", "--out", str(tmp_path / "out")]) == 0
    base, out = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    layer = "model.layers.{}."
    zeroed = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
    for name in (n[len(layer.format(1)):] for n in base if n.startswith(layer.format(1))):
        np.testing.assert_array_equal(out[layer.format(0) + name], base[layer.format(0) + name])
        np.testing.assert_array_equal(out[layer.format(1) + name], base[layer.format(1) + name])
        copy = out[layer.format(2) + name]  # the copy of block 1, inserted after it
        if name in zeroed:
            assert not copy.any(), name
        else:
            np.testing.assert_array_equal(copy, base[layer.format(1) + name])
    record = read_adaptation(tmp_path / "out")
    assert record["inserted_layers"] == [2] and record["history"][0]["copied_from"] == [1]


def test_noise_init_perturbs_only_the_copies(tmp_path):
    make_hf_model("llama_gqa", tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--after", "0", "--init", "noise", "--noise-std", "0.1",
                 "--out", str(tmp_path / "out")]) == 0
    base, out = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight"):
        source = base[f"model.layers.0.{name}"]
        np.testing.assert_array_equal(out[f"model.layers.0.{name}"], source)
        np.testing.assert_array_equal(out[f"model.layers.2.{name}"], base[f"model.layers.1.{name}"])
        relative = (out[f"model.layers.1.{name}"] - source).std() / source.std()
        assert 0.09 < relative < 0.11, name
    assert rel_err(hf_logits(_torch(tmp_path / "out"), IDS), hf_logits(_torch(tmp_path / "base"), IDS)) > 1e-3


def test_every_n_inserts_after_each_group_of_n():
    assert insertion_points(8, every=4) == [3, 7]
    assert insertion_points(6, every=1) == [0, 1, 2, 3, 4, 5]
    assert insertion_points(8, after=[5, 2]) == [2, 5]


def test_a_second_expansion_renumbers_the_first_ones_blocks(tmp_path):
    make_hf_model("llama_gqa", tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--after", "1", "--out", str(tmp_path / "once")]) == 0
    assert read_adaptation(tmp_path / "once")["inserted_layers"] == [2]  # 0, 1, copy(1)
    assert main(["expand-depth", str(tmp_path / "once"), "--after", "0", "--out", str(tmp_path / "twice")]) == 0
    record = read_adaptation(tmp_path / "twice")  # 0, copy(0), 1, copy(1)
    assert record["inserted_layers"] == [1, 3] and record["num_layers"] == 4
    assert [step["operation"] for step in record["history"]] == ["expand-depth", "expand-depth"]
    assert json.loads((tmp_path / "twice" / "config.json").read_text())["num_hidden_layers"] == 4


def test_expand_depth_reads_a_jaxcpt_checkpoint(tmp_path):
    make_hf_model("qwen2_tied", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert main(["expand-depth", str(tmp_path / "run"), "--every", "1", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()  # the run's tokenizer travels along
    assert rel_err(hf_logits(_torch(tmp_path / "out"), IDS), hf_logits(_torch(tmp_path / "hf"), IDS)) < 1e-6


def test_block_index_out_of_range_is_a_one_line_error(tmp_path, capsys):
    make_hf_model("llama_gqa", tmp_path / "base")
    assert main(["expand-depth", str(tmp_path / "base"), "--after", "2", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "block 2 does not exist" in err and "Traceback" not in err

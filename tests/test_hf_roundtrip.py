"""HF -> jaxcpt -> HF is exact, the export loads in transformers, and bad inputs fail clearly."""

import json

import numpy as np
import pytest
import torch
import jax.numpy as jnp
from hf_models import hf_logits, make_hf_model, rel_err
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.sharding.mesh import build_mesh


def read_all_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


@pytest.mark.parametrize("name,dtype,torch_dtype", [
    ("llama3_rope", "bfloat16", torch.bfloat16),
    ("qwen2_tied", "float32", torch.float32),
    ("llama_bias", "float32", torch.float32),
])
def test_round_trip_is_bit_identical_and_loads_in_transformers(name, dtype, torch_dtype, tmp_path):
    source, export = tmp_path / "hf", tmp_path / "export"
    hf_model = make_hf_model(name, source, dtype=torch_dtype)
    model = load_hf(source, mesh=build_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    save_hf(model, export, dtype=dtype, max_shard_size="40KB")

    assert (export / "model.safetensors.index.json").is_file()  # small shards force an index
    index = json.loads((export / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    original, exported = read_all_tensors(source), read_all_tensors(export)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert original[key].dtype == exported[key].dtype, key
        assert np.array_equal(original[key].view(np.uint8), exported[key].view(np.uint8)), key

    # Compare loaded against loaded: an in-memory model cast with .to(bf16) also casts its rope
    # buffer, which from_pretrained does not.
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch_dtype).eval()
    original_loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).eval()
    ids = np.random.RandomState(0).randint(0, 256, size=(2, 16))
    assert rel_err(hf_logits(reloaded, ids), hf_logits(original_loaded, ids)) == 0.0
    generation = json.loads((export / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == hf_model.config.eos_token_id


def test_export_of_float32_training_weights_in_bfloat16_matches_jaxcpt(tmp_path):
    make_hf_model("llama_gqa", tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    save_hf(model, tmp_path / "out")  # default bf16, one shard
    assert (tmp_path / "out" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.RandomState(2).randint(0, 256, size=(1, 12))
    assert rel_err(hf_logits(reloaded, ids), np.asarray(model(jnp.asarray(ids)))) < 2e-2


def test_export_refuses_to_overwrite_a_non_empty_directory(tmp_path):
    make_hf_model("llama_gqa", tmp_path / "hf")
    model = load_hf(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(Exception, match="not empty"):
        save_hf(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_missing_config_json_names_the_file(tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(HFFormatError, match=r"config\.json.*missing"):
        load_hf(tmp_path)


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFFormatError, match="'gpt2' is not supported.*llama, mistral, qwen2"):
        load_hf(tmp_path)


def test_tensor_shape_disagreeing_with_config_names_tensor_and_file(tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"][:50]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*model\.safetensors.*\(50, 64\).*\(96, 64\)"):
        load_hf(tmp_path)


def test_missing_shard_file_names_it(tmp_path):
    model_dir = tmp_path / "hf"
    make_hf_model("llama_gqa", tmp_path / "src")
    save_hf(load_hf(tmp_path / "src"), model_dir, dtype="float32", max_shard_size="40KB")
    victim = sorted(model_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(HFFormatError, match=f"shard file.*{victim.name}.*missing"):
        load_hf(model_dir)


def test_missing_tensor_names_it(tmp_path):
    make_hf_model("llama_gqa", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"'model\.norm\.weight' is missing"):
        load_hf(tmp_path)


def test_not_a_directory(tmp_path):
    with pytest.raises(HFFormatError, match="not a directory"):
        load_hf(tmp_path / "nope")

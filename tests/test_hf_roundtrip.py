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


def test_round_trip_in_vocabulary_blocks_of_a_few_rows_is_bit_identical(tmp_path, monkeypatch):
    """Import assembling each device block in place from slices (tables 2 rows at a time), export
    appending 2-row blocks: a padded vocabulary (300 -> 384 rows) split over 'tensor', untied lm_head."""
    from jaxcpt.hf import tensor_io

    monkeypatch.setattr(tensor_io, "HOST_BLOCK_BYTES", 2 * 64 * 2)  # 2 rows of width 64 in bfloat16
    source, export = tmp_path / "hf", tmp_path / "export"
    make_hf_model("qwen3_untied", source, dtype=torch.bfloat16)  # bfloat16 storage: blocks written as bits
    model = load_hf(source, mesh=build_mesh({"data": 2, "fsdp": 2, "tensor": 2}), param_dtype="bfloat16")
    save_hf(model, export, dtype="bfloat16", max_shard_size="100KB")
    original, exported = read_all_tensors(source), read_all_tensors(export)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert np.array_equal(original[key].view(np.uint16), exported[key].view(np.uint16)), key
    embedding = np.asarray(model.embedding[...])
    assert embedding.shape == (384, 64) and not embedding[300:].any()  # padding rows stay zero


# Child process: for each HF directory given, the peak RSS of load_hf beyond the memory just before
# it and the parameters it made, and of save_hf (float32, one file) beyond the memory before it.
_IMPORT_PEAK = r"""
import ctypes, gc, json, sys
from pathlib import Path
import jax, numpy as np
from flax import nnx
from jaxcpt.hf import load_hf, save_hf

def status(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines()
                if l.startswith(field + ":"))

jax.numpy.zeros(1).block_until_ready()
out = []

def reset():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the kernel: an honest starting point
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return status("VmRSS")

for directory in sys.argv[1:]:
    before = reset()
    model = load_hf(directory)
    params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    out.append({"param_bytes": params, "excess": status("VmHWM") - before - params})
    before = reset()
    save_hf(model, directory + "-export", dtype="float32", max_shard_size="10GB")
    out[-1]["export_excess"] = status("VmHWM") - before
    del model
print(json.dumps(out))
"""


def _wide_vocab_model(directory, vocab: int, width: int = 128) -> None:
    import ml_dtypes
    from transformers import LlamaConfig

    directory.mkdir(parents=True)
    LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(directory)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)

    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": t(vocab, width), "lm_head.weight": t(vocab, width),
               "model.norm.weight": t(width), p + "input_layernorm.weight": t(width),
               p + "post_attention_layernorm.weight": t(width),
               **{p + f"self_attn.{n}_proj.weight": t(width, width) for n in "qkvo"},
               p + "mlp.gate_proj.weight": t(64, width), p + "mlp.up_proj.weight": t(64, width),
               p + "mlp.down_proj.weight": t(width, 64)}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_import_and_export_host_memory_do_not_grow_with_the_vocabulary(tmp_path):
    """Beyond the parameters themselves, import and export hold a bounded slice (one vocabulary block),
    so 5x the vocabulary adds (almost) nothing to them. At 0acb231 import read, padded, cast and
    transposed each table whole (its excess grew by ~1.3x the added parameter bytes), and export
    held a whole safetensors file's tensors before writing it."""
    import os
    import subprocess
    import sys

    for vocab in (64000, 320000):
        _wide_vocab_model(tmp_path / str(vocab), vocab)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one device: every block is a whole table
    done = subprocess.run([sys.executable, "-c", _IMPORT_PEAK, str(tmp_path / "64000"), str(tmp_path / "320000")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = measured
    added_params = large["param_bytes"] - small["param_bytes"]  # 262 MB of float32 tables
    assert large["excess"] - small["excess"] < 0.25 * added_params, measured
    assert large["export_excess"] - small["export_excess"] < 0.25 * added_params, measured

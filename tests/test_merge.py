"""jaxcpt merge: the formulas against numpy, exact endpoints, checkpoint inputs, errors, the written directory."""

import json

import numpy as np
import pytest
import torch
from hf_models import hf_logits, make_hf_model, rel_err
from merge_helpers import as_float64, read_tensors, rewrite_tensors, same_bits, weight_files
from transformers import AutoModelForCausalLM

from jaxcpt.cli import main


def merge(*args) -> int:
    return main(["merge", *map(str, args)])


@pytest.fixture
def pair(tmp_path):
    """Two float32 llama models of one architecture, different random weights: (base, model)."""
    make_hf_model("llama_gqa", tmp_path / "base", seed=0)
    make_hf_model("llama_gqa", tmp_path / "model", seed=1)
    return tmp_path / "base", tmp_path / "model"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_coefficients_0_and_1_reproduce_the_inputs_bitwise(tmp_path, dtype, method):
    make_hf_model("qwen2_tied", tmp_path / "base", dtype=dtype, seed=0)
    make_hf_model("qwen2_tied", tmp_path / "model", dtype=dtype, seed=1)
    for t, source in ((0, "base"), (1, "model")):
        assert merge("--method", method, "--base", tmp_path / "base", "--model", tmp_path / "model", "--t", t,
                     "--out", tmp_path / f"t{t}") == 0
        merged, original = read_tensors(tmp_path / f"t{t}"), read_tensors(tmp_path / source)
        assert merged.keys() == original.keys()
        assert all(same_bits(merged[k], original[k]) for k in original), f"t={t} differs from {source}"
        expected_dtype = "float32" if dtype == torch.float32 else "bfloat16"
        assert json.loads((tmp_path / f"t{t}" / "config.json").read_text())["dtype"] == expected_dtype


def test_linear_merge_equals_the_numpy_interpolation(tmp_path, pair):
    base, model = pair
    t = 0.3
    assert merge("--base", base, "--model", model, "--t", t, "--out", tmp_path / "out") == 0
    merged, a, b = read_tensors(tmp_path / "out"), read_tensors(base), read_tensors(model)
    for name in a:
        float32 = np.float32(1 - t) * a[name] + np.float32(t) * b[name]
        assert same_bits(merged[name], float32), name
        exact = (1 - t) * a[name].astype(np.float64) + t * b[name].astype(np.float64)
        assert rel_err(merged[name], exact) < 1e-6, name


def _slerp_reference(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """SLERP of two flattened tensors in float64, written from the definition (mergekit's)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cosine = np.clip(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1)
    if abs(cosine) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(cosine)
    return np.sin((1 - t) * theta) / np.sin(theta) * a + np.sin(t * theta) / np.sin(theta) * b


def test_slerp_matches_its_formula_and_keeps_the_norm_of_orthogonal_tensors(tmp_path, pair):
    base, model = pair
    a = read_tensors(base)
    target = "model.layers.0.mlp.down_proj.weight"

    def orthogonal_same_norm(name, value):  # this one tensor: orthogonal to the base's, same norm
        if name != target:
            return value
        x, y = a[name].astype(np.float64), value.astype(np.float64)
        y = y - np.sum(x * y) / np.sum(x * x) * x
        return (y * np.linalg.norm(x) / np.linalg.norm(y)).astype(np.float32)

    rewrite_tensors(model, orthogonal_same_norm)
    b = read_tensors(model)
    t = 0.5
    assert merge("--method", "slerp", "--base", base, "--model", model, "--t", t, "--out", tmp_path / "out") == 0
    merged = read_tensors(tmp_path / "out")
    for name in a:
        assert rel_err(merged[name], _slerp_reference(a[name], b[name], t)) < 1e-6, name
    # A quarter circle halfway: (a + b) / sqrt(2), as long as a; linear interpolation would shrink it by sqrt(2).
    x, y = a[target].astype(np.float64), b[target].astype(np.float64)
    assert rel_err(merged[target], (x + y) / np.sqrt(2)) < 1e-6
    assert np.linalg.norm(merged[target].astype(np.float64)) == pytest.approx(np.linalg.norm(x), rel=1e-6)


def test_slerp_of_colinear_tensors_falls_back_to_linear(tmp_path, pair, capsys):
    base, model = pair
    a = read_tensors(base)
    rewrite_tensors(model, lambda name, value: 2 * a[name])  # every tensor parallel to the base's
    t = 0.25
    assert merge("--method", "slerp", "--base", base, "--model", model, "--t", t, "--out", tmp_path / "out") == 0
    assert f"{len(a)} nearly colinear tensors interpolated linearly" in capsys.readouterr().out
    merged = read_tensors(tmp_path / "out")
    for name in a:
        assert same_bits(merged[name], np.float32(1 - t) * a[name] + np.float32(t) * (2 * a[name])), name


def test_task_arithmetic_equals_its_formula_with_two_models(tmp_path, pair):
    base, model = pair
    make_hf_model("llama_gqa", tmp_path / "model2", seed=2)
    w1, w2 = 0.7, 0.4
    assert merge("--method", "task_arithmetic", "--base", base, "--model", model, "--model", tmp_path / "model2",
                 "--weights", f"{w1},{w2}", "--out", tmp_path / "out") == 0
    merged = read_tensors(tmp_path / "out")
    b, m1, m2 = as_float64(read_tensors(base)), as_float64(read_tensors(model)), as_float64(read_tensors(tmp_path / "model2"))
    for name in b:
        expected = b[name] + w1 * (m1[name] - b[name]) + w2 * (m2[name] - b[name])
        assert rel_err(merged[name], expected) < 1e-6, name


def test_a_checkpoint_input_merges_like_the_hf_directory_it_came_from(tmp_path):
    for name, seed in (("base", 0), ("model", 1)):
        make_hf_model("llama_bias", tmp_path / name, dtype=torch.bfloat16, seed=seed)
        assert main(["import-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}_ckpt"), "--mesh", "{fsdp: 4, tensor: 2}"]) == 0
    pairs = {"hf": ("base", "model"), "ckpt": ("base_ckpt", "model_ckpt"), "mixed": ("base", "model_ckpt")}
    for label, (base, model) in pairs.items():
        assert merge("--method", "slerp", "--base", tmp_path / base, "--model", tmp_path / model, "--t", 0.4,
                     "--dtype", "float32", "--out", tmp_path / label) == 0
    reference = read_tensors(tmp_path / "hf")
    for label in ("ckpt", "mixed"):
        merged = read_tensors(tmp_path / label)
        assert merged.keys() == reference.keys()
        assert all(same_bits(merged[k], reference[k]) for k in reference), label
    # The checkpoint's config.json is written from its model config; transformers reads the same model from it.
    ids = np.random.RandomState(0).randint(0, 256, size=(1, 10))
    logits = {label: hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / label, dtype=torch.float32).eval(), ids)
              for label in ("hf", "ckpt")}
    assert rel_err(logits["ckpt"], logits["hf"]) == 0.0


def test_mismatched_architectures_are_a_clear_error(tmp_path, capsys):
    make_hf_model("llama_gqa", tmp_path / "base")
    make_hf_model("llama_bias", tmp_path / "model")
    assert merge("--base", tmp_path / "base", "--model", tmp_path / "model", "--t", 0.5, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "do not share an architecture" in err
    assert "num_kv_heads: 2 in the base, 4 in the model" in err
    assert "o_bias: False in the base, True in the model" in err and "mlp_bias" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_config_differences_that_keep_the_shapes_are_noted_not_refused(tmp_path, pair, capsys):
    base, model = pair
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"]["rope_theta"] = 500000.0
    (model / "config.json").write_text(json.dumps(config))
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "out") == 0
    assert "inputs differ in rope_theta: 10000.0 in the base, 500000.0 in the model" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rope_parameters"]["rope_theta"] == 500000.0


def test_a_merge_that_fails_midway_leaves_no_output(tmp_path, pair, capsys):
    base, model = pair
    missing = "model.layers.1.mlp.down_proj.weight"  # late in the merge order: earlier tensors are already written
    rewrite_tensors(model, lambda name, value: None if name == missing else value)
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "out") == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_an_existing_output_needs_overwrite(tmp_path, pair, capsys):
    base, model = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "out") == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "out" / "keep.txt").is_file()
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "out", "--overwrite") == 0
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_sharded_output_with_the_models_tokenizer_loads_in_transformers(tmp_path, pair):
    base, model = pair
    (model / "tokenizer_config.json").write_text('{"from": "model"}')
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    generation = json.loads((model / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, 7]
    (model / "generation_config.json").write_text(json.dumps(generation))
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "whole") == 0
    assert merge("--base", base, "--model", model, "--t", 0.5, "--out", tmp_path / "sharded", "--max-shard-size", "70KB") == 0
    files = weight_files(tmp_path / "sharded")
    assert len(files) > 1 and all(f.stat().st_size <= 70_000 + 4096 for f in files)
    assert json.loads((tmp_path / "sharded" / "tokenizer_config.json").read_text()) == {"from": "model"}
    assert json.loads((tmp_path / "sharded" / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    whole, sharded = read_tensors(tmp_path / "whole"), read_tensors(tmp_path / "sharded")
    assert whole.keys() == sharded.keys() and all(same_bits(whole[k], sharded[k]) for k in whole)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded", dtype=torch.float32).state_dict()
    assert all(np.array_equal(loaded[k].numpy(), whole[k]) for k in whole)

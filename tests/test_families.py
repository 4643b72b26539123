"""Every family and option imports exactly: packed documents match transformers run on each alone,
and the export reloads in transformers with the same weights, config and logits."""

import copy
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import OPTION_CONFIGS, OPTION_OFF, hf_logits, make_hf_model, rel_err
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from jaxcpt.errors import HFFormatError
from jaxcpt.hf import load_hf, read_hf_config, save_hf
from jaxcpt.hf.families import FAMILIES, config_from_hf, config_to_hf
from jaxcpt.sharding.mesh import build_mesh

# Two rows of 48 tokens: four documents, one padding tail. The documents are longer than the
# windows (5-6), the rope scalings' original length (16) and the dynamic case's context (16).
DOCUMENTS = ((10, 30), (20, 28))
ROW = 48


def packed_batch(seed: int = 0):
    rng = np.random.RandomState(seed)
    ids, segments, positions, docs = [], [], [], []
    for r, lengths in enumerate(DOCUMENTS):
        row_ids, row_seg, row_pos, start = [], [], [], 0
        for s, n in enumerate(lengths, start=1):
            doc = rng.randint(0, 300, n)
            docs.append((r, start, doc))
            row_ids += list(doc)
            row_seg += [s] * n
            row_pos += list(range(n))
            start += n
        pad = ROW - start
        ids.append(row_ids + [0] * pad)
        segments.append(row_seg + [0] * pad)
        positions.append(row_pos + [0] * pad)
    return np.array(ids), np.array(segments), np.array(positions), docs


def worst_document_error(logits, hf_model, docs) -> float:
    # a fresh copy per document: transformers' dynamic RoPE keeps the longest length it has seen
    return max(rel_err(logits[r, start:start + len(doc)], hf_logits(copy.deepcopy(hf_model), doc[None])[0])
               for r, start, doc in docs)


@pytest.mark.parametrize("name", list(OPTION_CONFIGS))
def test_packed_documents_match_transformers_on_each_document_alone(name, tmp_path):
    hf_model = make_hf_model(name, tmp_path)
    ids, segments, positions, docs = packed_batch()
    mesh = build_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_hf(tmp_path, mesh=mesh)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions)))
    assert logits.shape == (2, ROW, 300) and logits.dtype == np.float32
    err = worst_document_error(logits, hf_model, docs)
    print(f"{name}: float32 relative error {err:.2e}")
    assert err < 1e-5

    # each option is needed to match: without it, transformers disagrees
    for overrides in OPTION_OFF[name]:
        without = load_hf(tmp_path, mesh=mesh, **overrides)
        off = np.asarray(without(jnp.asarray(ids), jnp.asarray(segments), jnp.asarray(positions)))
        assert worst_document_error(off, hf_model, docs) > 1e-3, overrides


@pytest.mark.parametrize("name", list(OPTION_CONFIGS))
def test_export_round_trip_is_exact_and_reloads_in_transformers(name, tmp_path):
    source, export = tmp_path / "hf", tmp_path / "export"
    make_hf_model(name, source)
    save_hf(load_hf(source, mesh=build_mesh({"fsdp": 4, "tensor": 2})), export, dtype="float32")

    original, exported = load_file(source / "model.safetensors"), load_file(export / "model.safetensors")
    assert sorted(original) == sorted(exported)  # the real vocabulary only: padding rows are not written
    for key in original:
        assert np.array_equal(original[key].view(np.uint8), exported[key].view(np.uint8)), key
    assert read_hf_config(export) == read_hf_config(source)
    assert json.loads((export / "config.json").read_text())["model_type"] == OPTION_CONFIGS[name]().model_type

    ids = np.random.RandomState(1).randint(0, 300, size=(2, 40))
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype="float32").eval()
    original_loaded = AutoModelForCausalLM.from_pretrained(source, dtype="float32").eval()
    assert type(reloaded) is type(original_loaded)
    assert rel_err(hf_logits(reloaded, ids), hf_logits(original_loaded, ids)) == 0.0


REQUIRED = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keys_a_config_json_omits_take_transformers_defaults(family):
    """transformers writes only non-default keys on save; each family reads the defaults of its config class."""
    model_type = FAMILIES[family].model_type
    spelled_out = AutoConfig.for_model(model_type, **REQUIRED).to_dict()
    assert config_from_hf(dict(REQUIRED, model_type=model_type)) == config_from_hf(spelled_out)


def test_unsupported_rope_type_names_the_supported_ones():
    hf = dict(REQUIRED, model_type="llama", rope_parameters={"rope_type": "mrope", "rope_theta": 1e4})
    with pytest.raises(HFFormatError, match="'mrope' is not supported.*default, linear, llama3, yarn, dynamic, longrope"):
        config_from_hf(hf)


def test_scaled_rope_on_gemma3_local_layers_is_refused_with_what_is_supported():
    hf = dict(REQUIRED, model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})
    with pytest.raises(HFFormatError, match="sliding_attention layers.*not supported"):
        config_from_hf(hf)


def test_multimodal_gemma3_checkpoint_says_what_to_do():
    with pytest.raises(HFFormatError, match="gemma3_text.*language model"):
        config_from_hf(dict(REQUIRED, model_type="gemma3"))


def test_export_refuses_options_its_family_cannot_hold():
    cfg = config_from_hf(dict(REQUIRED, model_type="llama"))
    with pytest.raises(HFFormatError, match="'llama' export cannot hold qk_norm=True"):
        config_to_hf(dataclasses.replace(cfg, qk_norm=True), "float32")
    with pytest.raises(HFFormatError, match="norm_plus_one=False \\(always True there\\)"):
        config_to_hf(dataclasses.replace(cfg, family="gemma2"), "float32")

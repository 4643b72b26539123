"""Logits of jaxcpt models loaded from HF checkpoints match transformers (torch, CPU)."""

import numpy as np
import pytest
import jax.numpy as jnp
from hf_models import FAMILY_CONFIGS, hf_logits, make_hf_model, rel_err

from jaxcpt.hf import load_hf
from jaxcpt.sharding.mesh import build_mesh

SEQ = 24  # longer than the Mistral window (7) and the llama3 original context (16)


@pytest.fixture(scope="module")
def input_ids():
    return np.random.RandomState(0).randint(0, 256, size=(2, SEQ))


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_float32_logits_match_transformers(name, tmp_path, input_ids):
    hf_model = make_hf_model(name, tmp_path)
    model = load_hf(tmp_path, mesh=build_mesh({"fsdp": 4, "tensor": 2}))
    logits = np.asarray(model(jnp.asarray(input_ids)))
    assert logits.shape == (2, SEQ, 256) and logits.dtype == np.float32
    assert rel_err(logits, hf_logits(hf_model, input_ids)) < 1e-5


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_tied"])
def test_bfloat16_compute_logits_within_stated_bound(name, tmp_path, input_ids):
    """bf16 matmuls (f32 params, f32 softmax/norms/accumulation): relative error < 2e-2."""
    hf_model = make_hf_model(name, tmp_path)
    model = load_hf(tmp_path, dtype="bfloat16")
    logits = np.asarray(model(jnp.asarray(input_ids)))
    err = rel_err(logits, hf_logits(hf_model, input_ids))
    assert 1e-5 < err < 2e-2  # really bf16 (not silently f32), and still close


def test_packed_row_matches_each_document_alone(tmp_path):
    make_hf_model("mistral_window", tmp_path)
    model = load_hf(tmp_path)
    rng = np.random.RandomState(1)
    doc_a, doc_b = rng.randint(0, 256, 10), rng.randint(0, 256, 14)
    packed = np.concatenate([doc_a, doc_b])[None]
    segment_ids = np.array([[1] * 10 + [2] * 14])
    positions = np.array([list(range(10)) + list(range(14))])
    packed_logits = np.asarray(model(jnp.asarray(packed), jnp.asarray(segment_ids), jnp.asarray(positions)))
    alone_a = np.asarray(model(jnp.asarray(doc_a[None])))
    alone_b = np.asarray(model(jnp.asarray(doc_b[None])))
    assert rel_err(packed_logits[0, :10], alone_a[0]) < 1e-5
    assert rel_err(packed_logits[0, 10:], alone_b[0]) < 1e-5
    # and the packing matters: without segment ids, document b would see document a
    unpacked = np.asarray(model(jnp.asarray(packed)))
    assert rel_err(unpacked[0, 10:], alone_b[0]) > 1e-3

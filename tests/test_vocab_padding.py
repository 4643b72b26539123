"""Vocabulary rows are stored padded to model.vocab_pad_multiple: zero, never given probability, never trained,
and neither imported nor exported beyond the real vocabulary."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import make_hf_model

from jaxcpt.config import to_dict
from jaxcpt.hf import load_hf
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.persist import abstract_params, config_from_meta
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh
from jaxcpt.sharding.rules import make_rules
from jaxcpt.train.loss import model_loss
from jaxcpt.train.metrics import flops_per_token

CFG = ModelConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)


def one_device():
    return build_mesh({"data": 1}, jax.devices()[:1])


def batch(rows=2, length=16):
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 100, size=(rows, length + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "loss_mask": jnp.asarray((rng.rand(rows, length) > 0.2).astype(np.float32))}


@pytest.mark.parametrize("tied", [False, True])
def test_padded_rows_start_at_zero_and_receive_no_gradient(tied):
    model = init_model(dataclasses.replace(CFG, tie_word_embeddings=tied), one_device())
    out_w = model.output_weights()
    assert model.embedding.shape == (128, 32) and out_w.shape == (32, 128)
    assert not np.any(model.embedding[100:]) and not np.any(out_w[:, 100:])
    assert np.all(np.any(np.asarray(model.embedding[:100]) != 0, axis=1))  # the real rows are random
    graphdef, state = nnx.split(model)
    grads = nnx.merge(graphdef, jax.grad(lambda s: model_loss(nnx.merge(graphdef, s), batch(), chunk_size=4)[0])(state))
    assert not np.any(grads.embedding[100:])  # so AdamW (zero moments, zero weights) keeps them at zero
    assert np.any(grads.embedding[:100])
    if not tied:
        assert not np.any(grads.lm_head[:, 100:])


def test_logits_cover_the_real_vocabulary_and_the_loss_gives_padding_no_probability():
    model = init_model(CFG, one_device())
    b = batch()
    logits = model(b["inputs"])
    assert logits.shape == (2, 16, 100)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), b["targets"][..., None], axis=-1)[..., 0]
    expected = (nll * b["loss_mask"]).sum() / b["loss_mask"].sum()
    for chunk in (0, 5):
        np.testing.assert_allclose(model_loss(model, b, chunk_size=chunk)[0], expected, rtol=1e-6)


def test_import_pads_the_real_rows_with_zeros(tmp_path):
    hf_model = make_hf_model("qwen3_untied", tmp_path)  # vocabulary 300 -> 384 rows
    model = load_hf(tmp_path)
    assert model.embedding.shape == (384, 64) and model.lm_head.shape == (64, 384)
    np.testing.assert_array_equal(model.embedding[:300], hf_model.model.embed_tokens.weight.detach().numpy())
    assert not np.any(model.embedding[300:]) and not np.any(model.lm_head[:, 300:])
    assert load_hf(tmp_path, vocab_pad_multiple=1).embedding.shape == (300, 64)


@pytest.mark.parametrize("options", [
    {},
    dict(tie_word_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True),
    dict(family="gemma3", norm_plus_one=True, post_norms=True, qk_norm=True, head_dim=16, vocab_pad_multiple=64),
    dict(vocab_pad_multiple=1),
])
def test_num_params_counts_every_stored_parameter(options):
    cfg = dataclasses.replace(CFG, **options)
    params = abstract_params(cfg, one_device(), make_rules())
    assert cfg.num_params() == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize("tied", [False, True])
def test_flop_count_covers_every_matmul_weight_as_stored(tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    params = abstract_params(cfg, one_device(), make_rules())
    projections = sum(int(np.prod(params["layers"][n].shape)) for n in ("q", "k", "v", "o", "gate", "up", "down"))
    output = 32 * 128  # the padded output projection, tied or not
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * 64
    assert flops_per_token(cfg, 64) == 6 * (projections + output) + attention


def test_checkpoints_from_before_padding_keep_their_exact_vocabulary():
    fields = to_dict(CFG)
    del fields["vocab_pad_multiple"]
    assert config_from_meta({"model_config": fields}).padded_vocab_size == 100
    assert config_from_meta({"model_config": to_dict(CFG)}).padded_vocab_size == 128

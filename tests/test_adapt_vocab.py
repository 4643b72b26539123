"""extend-vocab keeps every old id, encoding and logit, and the new tokens are really produced.

Two bases, built in-process (tests/adapt_fixtures.py): Llama with a sentencepiece BPE
tokenizer (tokenizer.model + tokenizer.json, BOS) and Qwen2 (tied) with a byte-level BPE
tokenizer without BOS and more embedding rows than token ids. Each is extended, through
the command line, with a tokenizer trained by ``jaxcpt train-tokenizer`` on a domain corpus.
"""

import json

import numpy as np
import pytest
import torch
from adapt_fixtures import (
    coarsening_error,
    domain_texts,
    general_texts,
    write_config,
    write_domain_corpus,
    byte_level_base,
    sp_base,
)
from hf_models import hf_logits, rel_err
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxcpt.adapt.bpe import Alphabet
from jaxcpt.adapt.metadata import read_adaptation
from jaxcpt.cli import main

BASES = {"sentencepiece": sp_base, "byte_level": byte_level_base}


@pytest.fixture(scope="module", params=list(BASES))
def extended(request, tmp_path_factory):
    """{base, tokens, out, config} paths: a base model extended with a domain tokenizer (subword-mean)."""
    root = tmp_path_factory.mktemp(request.param)
    BASES[request.param](root / "base")
    config = write_config(root / "data.yaml", {"domain": write_domain_corpus(root / "domain.jsonl")},
                          eval_documents=50)
    assert main(["train-tokenizer", "--config", config, "--base", str(root / "base"), "--vocab-size", "400",
                 "--out", str(root / "tokens")]) == 0
    assert main(["extend-vocab", str(root / "base"), "--tokens", str(root / "tokens"), "--out", str(root / "out"),
                 "--init", "subword-mean", "--measure-config", config]) == 0
    return {"base": root / "base", "out": root / "out", "kind": request.param}


def _tokenizers(extended):
    return Tokenizer.from_file(str(extended["base"] / "tokenizer.json")), Tokenizer.from_file(
        str(extended["out"] / "tokenizer.json"))


def _old_vocab_size(extended) -> int:
    return json.loads((extended["base"] / "config.json").read_text())["vocab_size"]


def test_every_old_token_keeps_its_id(extended):
    old, new = _tokenizers(extended)
    old_vocab, new_vocab = old.get_vocab(with_added_tokens=True), new.get_vocab(with_added_tokens=True)
    assert all(new_vocab[token] == token_id for token, token_id in old_vocab.items())
    start, end = read_adaptation(extended["out"])["new_token_ids"]
    assert start == _old_vocab_size(extended) > max(old_vocab.values())  # after the model's rows, not the tokenizer's
    assert sorted(set(new_vocab.values()) - set(old_vocab.values())) == list(range(start, end))


def test_new_encoding_only_joins_runs_of_old_tokens(extended):
    """On any text: old ids stand where they stood; so a text without new ids is encoded exactly as before."""
    old, new = _tokenizers(extended)
    alphabet = Alphabet.of(json.loads((extended["base"] / "tokenizer.json").read_text()))
    start = read_adaptation(extended["out"])["new_token_ids"][0]
    unchanged = 0
    for text in general_texts(200) + domain_texts(50, seed=7):
        a, b = old.encode(text, add_special_tokens=False), new.encode(text, add_special_tokens=False)
        assert coarsening_error(a.tokens, a.ids, b.tokens, b.ids, start, alphabet) is None, text
        if max(b.ids) < start:
            assert b.ids == a.ids
            unchanged += 1
    assert unchanged >= 5  # the corollary was exercised, not vacuous


def test_sentencepiece_model_file_encodes_like_tokenizer_json(extended):
    if extended["kind"] != "sentencepiece":
        pytest.skip("byte-level bases have no tokenizer.model")
    import sentencepiece as spm

    old_sp = spm.SentencePieceProcessor(model_file=str(extended["base"] / "tokenizer.model"))
    new_sp = spm.SentencePieceProcessor(model_file=str(extended["out"] / "tokenizer.model"))
    _, new = _tokenizers(extended)
    alphabet = Alphabet.of(json.loads((extended["base"] / "tokenizer.json").read_text()))
    start = read_adaptation(extended["out"])["new_token_ids"][0]
    for text in general_texts(200) + domain_texts(50, seed=7):
        ids = new_sp.encode(text)
        assert ids == new.encode(text, add_special_tokens=False).ids, text
        old_ids = old_sp.encode(text)
        error = coarsening_error(old_sp.id_to_piece(old_ids), old_ids, new_sp.id_to_piece(ids), ids, start, alphabet)
        assert error is None, text


def test_transformers_tokenizer_produces_the_new_tokens(extended):
    tokenizer = AutoTokenizer.from_pretrained(extended["out"])
    old_tokenizer = AutoTokenizer.from_pretrained(extended["base"])
    start, end = read_adaptation(extended["out"])["new_token_ids"]
    assert len(tokenizer) == len(old_tokenizer) + (end - start)
    text = " ".join(domain_texts(20, seed=3))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert np.mean(np.asarray(ids) >= start) > 0.3
    assert len(ids) < 0.6 * len(old_tokenizer(text, add_special_tokens=False).input_ids)
    assert tokenizer.decode(ids) == text
    model = Tokenizer.from_file(str(extended["out"] / "tokenizer.json")).model
    new_tokens = [model.id_to_token(i) for i in range(start, end)]
    assert all([t.value for t in model.tokenize(token)] == [token] for token in new_tokens)  # each forms from its string


def test_logits_of_old_tokens_are_unchanged(extended):
    from jaxcpt.hf import load_hf

    old_tok = Tokenizer.from_file(str(extended["base"] / "tokenizer.json"))
    ids = np.array([old_tok.encode(t, add_special_tokens=False).ids[:20] for t in general_texts(30)
                    if len(old_tok.encode(t, add_special_tokens=False).ids) >= 20][:2])
    vocab = _old_vocab_size(extended)
    base = AutoModelForCausalLM.from_pretrained(extended["base"], dtype=torch.float32).eval()
    out = AutoModelForCausalLM.from_pretrained(extended["out"], dtype=torch.float32).eval()
    assert out.config.vocab_size == read_adaptation(extended["out"])["new_token_ids"][1]
    base_logits, out_logits = hf_logits(base, ids), hf_logits(out, ids)
    np.testing.assert_array_equal(out_logits[..., :vocab], base_logits)
    jax_base = np.asarray(load_hf(extended["base"])(ids))
    jax_out = np.asarray(load_hf(extended["out"])(ids))
    np.testing.assert_array_equal(jax_out[..., :vocab], jax_base)
    assert rel_err(jax_out, out_logits) < 1e-5  # the new columns too, jaxcpt against transformers


def test_other_tensors_and_old_rows_are_bit_identical(extended):
    base, out = load_file(str(extended["base"] / "model.safetensors")), load_file(str(extended["out"] / "model.safetensors"))
    assert base.keys() == out.keys()
    vocab = _old_vocab_size(extended)
    for name, value in base.items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert out[name].shape == (read_adaptation(extended["out"])["new_token_ids"][1], value.shape[1])
            np.testing.assert_array_equal(out[name][:vocab], value)
        else:
            np.testing.assert_array_equal(out[name], value, err_msg=name)


def test_compression_gain_is_recorded(extended):
    record = read_adaptation(extended["out"])
    (row,) = record["history"][0]["compression"]
    assert row["source"] == "domain" and row["split"] == "eval" and row["documents"] == 50
    assert row["tokens_per_byte"]["after"] < 0.6 * row["tokens_per_byte"]["before"]

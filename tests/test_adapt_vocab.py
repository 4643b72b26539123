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
    new_vocab = {"sentencepiece": "400", "byte_level": "500"}[request.param]  # bases of 320 and 403 ids
    assert main(["train-tokenizer", "--config", config, "--base", str(root / "base"), "--vocab-size", new_vocab,
                 "--out", str(root / "tokens")]) == 0
    assert main(["extend-vocab", str(root / "base"), "--tokens", str(root / "tokens"), "--out", str(root / "out"),
                 "--init", "subword-mean", "--measure-config", config]) == 0
    return {"base": root / "base", "out": root / "out", "tokens": root / "tokens", "root": root,
            "domain": root / "domain.jsonl", "kind": request.param}


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
    assert sorted(set(new_vocab.values()) - set(old_vocab.values())) == list(range(len(old_vocab), end))
    assert all(new.id_to_token(i).startswith("<jaxcpt_unused_") for i in range(len(old_vocab), start))


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
    tokenizer, old_tokenizer = AutoTokenizer.from_pretrained(extended["out"]), AutoTokenizer.from_pretrained(extended["base"])
    start, end = read_adaptation(extended["out"])["new_token_ids"]
    assert len(tokenizer) == end  # ids are contiguous up to the model's size (placeholders fill a gap)
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
    # jaxcpt: the hidden states are bit-identical; XLA may block the output matmul differently for
    # another vocabulary width, so the old columns agree to float32 rounding.
    jax_base, jax_out = load_hf(extended["base"]), load_hf(extended["out"])
    np.testing.assert_array_equal(np.asarray(jax_out.hidden_states(ids)), np.asarray(jax_base.hidden_states(ids)))
    jax_base_logits, jax_out_logits = np.asarray(jax_base(ids)), np.asarray(jax_out(ids))
    assert rel_err(jax_out_logits[..., :vocab], jax_base_logits) < 1e-6
    assert rel_err(jax_out_logits, out_logits) < 1e-5  # the new columns too, jaxcpt against transformers


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


def test_a_jaxcpt_checkpoint_extends_like_its_hf_directory(extended):
    if extended["kind"] != "sentencepiece":
        pytest.skip("reading the checkpoint does not depend on the tokenizer's kind")
    run, out = extended["root"] / "run", extended["root"] / "from_run"
    assert main(["import-hf", str(extended["base"]), "--out", str(run)]) == 0
    assert main(["extend-vocab", str(run), "--tokens", str(extended["tokens"]), "--out", str(out), "--init",
                 "subword-mean", "--dtype", "float32"]) == 0
    ours, theirs = load_file(str(out / "model.safetensors")), load_file(str(extended["out"] / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    assert (out / "tokenizer.json").read_bytes() == (extended["out"] / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_training_starts_from_the_extended_directory(extended, tmp_path):
    """init.source: hf on the output, with its tokenizer taken from there; every parameter trains; the
    adaptation record survives training."""
    from train_helpers import train_losses

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    run = tmp_path / "run"
    train(load_train_config(None, [
        f"run_dir={run}", "init.source=hf", f"init.path={extended['out']}", "model.dtype=float32",
        f"data.sources=[{{name: domain, paths: ['{extended['domain']}']}}]", "data.seq_len=32", "data.shuffle_buffer=64",
        f"data.add_bos={extended['kind'] == 'sentencepiece'}",  # the byte-level base has no BOS, like Qwen
        "train.steps=3", "train.batch_size=8", "train.loss_chunk_size=16", "eval.every=0", "checkpoint.every_steps=0",
        "optim.schedule.peak_lr=1e-2", "optim.schedule.warmup_steps=1", "export.dtype=float32", "mesh={data: 8}"]))
    assert len(train_losses(run)) == 3
    before = load_file(str(extended["out"] / "model.safetensors"))["model.embed_tokens.weight"]
    after = load_file(str(run / "hf" / "step_3" / "model.safetensors"))["model.embed_tokens.weight"]
    start = read_adaptation(extended["out"])["new_token_ids"][0]
    assert after.shape == before.shape
    assert np.any(after[start:] != before[start:]) and np.any(after[:start] != before[:start])
    assert AutoTokenizer.from_pretrained(run / "hf" / "step_3").get_vocab() == AutoTokenizer.from_pretrained(
        extended["out"]).get_vocab()
    # the run's checkpoint keeps the record: a depth expansion of the trained model carries the new ids on
    assert main(["expand-depth", str(run), "--after", "0", "--out", str(tmp_path / "deeper")]) == 0
    record = read_adaptation(tmp_path / "deeper")
    assert record["new_token_ids"] == [start, after.shape[0]] and record["inserted_layers"] == [1]
    assert [step["operation"] for step in record["history"]] == ["extend-vocab", "expand-depth"]


def test_bfloat16_base_stays_bfloat16_and_bit_identical(tmp_path):
    import shutil

    byte_level_base(tmp_path / "f32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "f32", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(tmp_path / "f32" / name, tmp_path / "base" / name)
    (tmp_path / "tokens.txt").write_text(" dataframe\n tokenizer\n")
    assert main(["extend-vocab", str(tmp_path / "base"), "--tokens", str(tmp_path / "tokens.txt"), "--out",
                 str(tmp_path / "out"), "--init", "mean"]) == 0
    base, out = load_file(str(tmp_path / "base" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {v.dtype.name for v in out.values()} == {"bfloat16"}
    for name, value in base.items():
        rows = value.shape[0]
        np.testing.assert_array_equal(out[name][:rows].view(np.uint16), value.view(np.uint16), err_msg=name)


def _hand_made_sentencepiece(directory):
    """A sentencepiece BPE model with pieces a, b, c, d, ab and abcd: 'abcd' alone encodes as [ab, c, d]
    (no split of it into two pieces exists), so a new piece 'cd' would complete the old piece 'abcd'."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from jaxcpt.hf.tokenizer import sentencepiece_to_hf

    proto = pb.ModelProto()
    proto.trainer_spec.model_type, proto.trainer_spec.bos_id, proto.trainer_spec.eos_id = 2, 1, 2
    proto.normalizer_spec.name, proto.normalizer_spec.add_dummy_prefix = "identity", True
    kinds = pb.ModelProto.SentencePiece.Type
    pieces = [("<unk>", 0, kinds.UNKNOWN), ("<s>", 0, kinds.CONTROL), ("</s>", 0, kinds.CONTROL)]
    pieces += [(p, -i, kinds.NORMAL) for i, p in enumerate(["ab", "abcd", "\u2581", "a", "b", "c", "d"], start=1)]
    for text, score, kind in pieces:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = text, score, kind
    directory.mkdir()
    (directory / "source.model").write_bytes(proto.SerializeToString())
    return sentencepiece_to_hf(directory / "source.model", directory / "hf")


def test_sentencepiece_rule_refuses_a_piece_that_would_complete_an_old_piece(tmp_path):
    import sentencepiece as spm

    from jaxcpt.adapt.spm import extend_model_file
    from jaxcpt.adapt.vocab import plan_extension

    base = _hand_made_sentencepiece(tmp_path / "sp")
    old = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    assert old.encode("abcd", out_type=str) == ["\u2581", "ab", "c", "d"]
    (tmp_path / "naive.model").write_bytes(extend_model_file(base / "tokenizer.model", [(10, "cd")]))
    naive = spm.SentencePieceProcessor(model_file=str(tmp_path / "naive.model"))
    assert naive.encode("abcd", out_type=str) == ["\u2581", "abcd"]  # an old id, yet not the old encoding
    (tmp_path / "tokens.txt").write_text("cd\nbc\n")
    plan = plan_extension(base, str(tmp_path / "tokens.txt"), first_id=10)
    assert plan.tokens == ["bc"] and plan.report["skipped"]["no_safe_merge_path"] == 1


def test_sentencepiece_ids_past_a_gap_get_unused_placeholders(tmp_path):
    """A model with more embedding rows than pieces: new pieces take the model's ids, the gap stays unproduced."""
    import sentencepiece as spm

    from jaxcpt.adapt.spm import extend_model_file

    base = _hand_made_sentencepiece(tmp_path / "sp")
    (tmp_path / "gap.model").write_bytes(extend_model_file(base / "tokenizer.model", [(16, "cd"), (17, "bc")]))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "gap.model"))
    assert sp.get_piece_size() == 18 and (sp.piece_to_id("cd"), sp.piece_to_id("bc")) == (16, 17)
    assert all(sp.is_unused(i) for i in range(10, 16))
    assert sp.encode("dcb abd", out_type=str) == ["\u2581", "d", "c", "b", "\u2581", "ab", "d"]

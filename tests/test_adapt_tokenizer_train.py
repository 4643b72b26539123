"""train-tokenizer: trains on configured sources like the base was trained, within a budget, never on held-out text."""

import json
from pathlib import Path

import pytest
from adapt_fixtures import general_texts, write_config, write_domain_corpus
from test_data_fixtures import write_jsonl
from tokenizer_fixtures import llama_style_tokenizer_dir, qwen_style_tokenizer_dir
from tokenizers import Tokenizer

from jaxcpt.cli import main
from jaxcpt.data.tokenize import load_tokenizer


@pytest.fixture
def corpus(tmp_path):
    return write_config(tmp_path / "data.yaml", {"domain": write_domain_corpus(tmp_path / "domain.jsonl", n=600)},
                        eval_documents=50)


def _stats(directory) -> dict:
    return json.loads((directory / "jaxcpt_tokenizer_training.json").read_text())


def test_sentencepiece_tokenizer_takes_the_base_settings(tmp_path, corpus):
    from sentencepiece import sentencepiece_model_pb2

    assert main(["train-tokenizer", "--config", corpus, "--base", llama_style_tokenizer_dir(), "--vocab-size", "400",
                 "--out", str(tmp_path / "tok")]) == 0
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tok" / "tokenizer.model").read_bytes())
    assert len(proto.pieces) == 400 and proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == 2
    assert (proto.trainer_spec.bos_id, proto.trainer_spec.pad_id) == (1, 3)  # the base's special ids
    tok = load_tokenizer(str(tmp_path / "tok"))  # usable as data.tokenizer
    assert tok.facts.bos_id == 1 and len(tok.encode(" dataframe tokenizer")) <= 4


def test_bpe_tokenizer_keeps_the_base_pre_tokenizer(tmp_path, corpus):
    assert main(["train-tokenizer", "--config", corpus, "--base", qwen_style_tokenizer_dir(), "--vocab-size", "500",
                 "--out", str(tmp_path / "tok")]) == 0
    trained = json.loads((tmp_path / "tok" / "tokenizer.json").read_text())
    base = json.loads((Path(qwen_style_tokenizer_dir()) / "tokenizer.json").read_text())
    assert trained["pre_tokenizer"] == base["pre_tokenizer"] and trained["decoder"] == base["decoder"]
    tok = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    assert 403 < tok.get_vocab_size() == _stats(tmp_path / "tok")["vocab_size"] <= 500  # stops when pairs run out
    assert {t["content"] for t in trained["added_tokens"]} == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    text = " attention über 模型 dataframe"
    assert tok.decode(tok.encode(text).ids) == text


def test_budget_and_held_out_documents_bound_what_is_read(tmp_path, corpus):
    assert main(["train-tokenizer", "--config", corpus, "--kind", "bpe", "--vocab-size", "300", "--out",
                 str(tmp_path / "all")]) == 0
    assert _stats(tmp_path / "all")["sources"]["domain"]["documents"] == 550  # 600 minus the 50 held out
    assert main(["train-tokenizer", "--config", corpus, "--kind", "bpe", "--vocab-size", "300", "--max-documents",
                 "120", "--out", str(tmp_path / "some")]) == 0
    assert _stats(tmp_path / "some")["sources"]["domain"]["documents"] == 120
    assert main(["train-tokenizer", "--config", corpus, "--kind", "bpe", "--vocab-size", "300", "--max-bytes",
                 "2000", "--out", str(tmp_path / "bytes")]) == 0
    read = _stats(tmp_path / "bytes")["sources"]["domain"]["bytes"]
    assert 2000 <= read < 2000 + 400  # stops at the first document past the budget


def test_plain_files_are_read_with_the_data_readers(tmp_path):
    path = write_jsonl(str(tmp_path / "docs.jsonl.gz"), general_texts(300), field="body")
    assert main(["train-tokenizer", path, "--text-field", "body", "--kind", "sentencepiece", "--vocab-size", "300",
                 "--out", str(tmp_path / "tok")]) == 0
    assert _stats(tmp_path / "tok")["sources"]["input"]["documents"] == 300


def test_without_base_or_kind_is_a_one_line_error(tmp_path, corpus, capsys):
    assert main(["train-tokenizer", "--config", corpus, "--vocab-size", "300", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "Traceback" not in err

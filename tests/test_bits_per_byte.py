"""Held-out loss in bits per byte: the bytes each token spells, summed over a document, are the document's bytes."""

import json
import math

import numpy as np
import pytest
from test_data_fixtures import make_texts, sp_model
from tokenizer_fixtures import llama_style_tokenizer_dir, qwen_style_tokenizer_dir
from train_helpers import make_corpora, tiny_overrides

from jaxcpt.data.tokenize import cached_tokenizer, token_byte_lengths

TEXTS = make_texts(40, seed=5) + ["naïve café — 数据 😀 tabs\tand\nnewlines", "  leading spaces"]


@pytest.mark.parametrize("name, tokenizer, prefix", [
    ("sentencepiece", sp_model, 1),  # a sentencepiece model spells the one-space prefix it adds
    ("llama_style_hf", llama_style_tokenizer_dir, 1),
    ("qwen_style_byte_level", qwen_style_tokenizer_dir, 0),
])
def test_token_bytes_sum_to_the_utf8_bytes_of_the_text(name, tokenizer, prefix):
    path = tokenizer()
    lengths = token_byte_lengths(path)
    tok = cached_tokenizer(path)
    assert lengths.shape == (tok.facts.num_ids,)
    for text in TEXTS:
        ids = tok.encode(text)
        assert int(lengths[ids].sum()) in (len(text.encode()), len(text.encode()) + prefix), (name, text)
    for special in (tok.facts.bos_id, tok.facts.eos_id):
        if special is not None:
            assert lengths[special] == 0


def test_eval_records_and_the_report_carry_bits_per_byte(tmp_path):
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")
    train(load_train_config(None, tiny_overrides(tmp_path / "run", corpora, steps=2)))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    general = next(r for r in records if r["kind"] == "eval")["sources"]["general"]
    assert general["bits_per_byte"] == pytest.approx(general["loss"] * general["tokens"] / (math.log(2) * general["bytes"]))
    assert general["bytes"] > general["tokens"]  # several bytes per token
    report = open(tmp_path / "run" / "report.txt").read()
    assert "bits per byte" in report and f"{general['bits_per_byte']:.4f}" in report


def test_comparing_runs_with_different_tokenizers_uses_bits_per_byte(tmp_path):
    from jaxcpt.report.forgetting import compare

    for name, tokens_per_byte in (("a", 0.5), ("b", 0.25)):  # B's tokenizer makes half as many tokens
        (tmp_path / name).mkdir()
        rows = [{"kind": "eval", "step": s, "sources": {"domain": {"loss": loss, "bits_per_byte": loss * tokens_per_byte / math.log(2)}}}
                for s, loss in ((0, 4.0), (10, 3.0))]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table, _ = compare(tmp_path / "a", tmp_path / "b")
    line = next(line for line in table.splitlines()[table.splitlines().index(next(l for l in table.splitlines() if l.startswith("bits per byte"))) + 1:])
    assert line.split()[1:] == [f"{4 * 0.5 / math.log(2):.4f}", f"{3 * 0.5 / math.log(2):.4f}", f"{-0.5 / math.log(2):+.4f}",
                                f"{4 * 0.25 / math.log(2):.4f}", f"{3 * 0.25 / math.log(2):.4f}", f"{-0.25 / math.log(2):+.4f}"]

"""Tokenizers (sentencepiece, Hugging Face directory) and `jaxcpt tokenize` shards."""

import json
import os

import numpy as np
import pytest
from test_data_fixtures import (
    assert_batches_equal,
    data_config,
    make_texts,
    sp_model,
    take,
    write_jsonl,
)
from tokenizer_fixtures import llama_style_tokenizer_dir

from jaxcpt.cli import main
from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator
from jaxcpt.data.sources import TOKENIZED_META
from jaxcpt.data.tokenize import load_tokenizer
from jaxcpt.errors import UserError


def test_sentencepiece_tokenizer_ids_and_special_tokens():
    tok = load_tokenizer(sp_model())
    texts = make_texts(5, seed=1)
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    facts = tok.facts
    assert (facts.bos_id, facts.eos_id, facts.pad_id, facts.num_ids, facts.kind) == (1, 2, 3, 320, "sentencepiece")
    assert facts.bos_id not in tok.encode(texts[0])  # special tokens are the pipeline's job


def test_hf_tokenizer_directory_matches_sentencepiece():
    hf = load_tokenizer(llama_style_tokenizer_dir())
    sp = load_tokenizer(sp_model())
    texts = make_texts(50, seed=2)
    assert hf.encode_batch(texts) == sp.encode_batch(texts)
    assert (hf.facts.bos_id, hf.facts.eos_id, hf.facts.num_ids) == (sp.facts.bos_id, sp.facts.eos_id, sp.facts.num_ids)


def test_pipeline_with_hf_tokenizer_gives_the_sentencepiece_batches(tmp_path):
    path = write_jsonl(str(tmp_path / "a.jsonl"), make_texts(40, seed=3))
    batches = []
    for tokenizer in (sp_model(), llama_style_tokenizer_dir()):
        cfg = data_config(sources=[{"name": "a", "paths": [path]}], tokenizer=tokenizer, seq_len=32, shuffle_buffer=8,
                          add_bos=True, add_eos=True)  # the same special tokens: only the tokenizers differ
        batches.append(take(build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1), 5))
    assert_batches_equal(*batches)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.model"))


def test_tokenize_command_writes_shards_that_train_like_the_text(tmp_path, capsys):
    texts = make_texts(120, seed=4)
    path = write_jsonl(str(tmp_path / "web.jsonl.gz"), texts)
    out = str(tmp_path / "web_tok")
    assert main(["tokenize", "--tokenizer", sp_model(), "--output", out, "--shard-tokens", "500", path]) == 0
    meta = json.load(open(os.path.join(out, TOKENIZED_META)))
    assert meta["num_documents"] == 120 and len(meta["shards"]) > 1
    assert "wrote 120 documents" in capsys.readouterr().out

    def cfg(paths, **kw):
        source = {"name": "web", "paths": paths, "eval_fraction": 0.1, "repeat": False}
        return data_config(sources=[source], tokenizer=sp_model(), seq_len=32, shuffle_files=False, **kw)

    # The same documents in the same order: the same batches, and the same held-out split (stored text hashes).
    from_text = list(build_train_iterator(cfg([path]), batch_size=4, process_index=0, process_count=1))
    from_shards = list(build_train_iterator(cfg([out]), batch_size=4, process_index=0, process_count=1))
    assert_batches_equal(from_text, from_shards)
    eval_text = build_eval_batches(cfg([path]), batch_size=4, process_index=0, process_count=1)
    eval_shards = build_eval_batches(cfg([out]), batch_size=4, process_index=0, process_count=1)
    assert_batches_equal(eval_text["web"], eval_shards["web"])
    # Without a tokenizer, BOS/EOS come from the shards' metadata.
    no_tok = data_config(
        sources=[{"name": "web", "paths": [out], "eval_fraction": 0.1, "repeat": False}],
        seq_len=32,
        shuffle_files=False,
    )
    assert_batches_equal(
        from_shards, list(build_train_iterator(no_tok, batch_size=4, process_index=0, process_count=1))
    )


def test_tokenize_command_reads_a_source_from_a_config_and_refuses_to_overwrite(tmp_path, capsys):
    path = write_jsonl(str(tmp_path / "a.jsonl"), make_texts(10, seed=5), field="body")
    config = tmp_path / "run.yaml"
    config.write_text(
        json.dumps(
            {"data": {"tokenizer": sp_model(), "sources": [{"name": "a", "paths": [path], "text_field": "body"}]}}
        )
    )
    out = str(tmp_path / "tok")
    assert main(["tokenize", "--config", str(config), "--source", "a", "--output", out, "--workers", "1"]) == 0
    tokens = np.load(os.path.join(out, "shard-00000.tokens.npy"))
    assert tokens.dtype == np.uint16 and len(tokens) > 10
    assert main(["tokenize", "--config", str(config), "--source", "a", "--output", out]) == 2
    assert "already holds token shards" in capsys.readouterr().err

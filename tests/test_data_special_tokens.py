"""BOS/EOS follow the tokenizer's own convention unless data.add_bos / add_eos say otherwise.

The oracle for Hugging Face directories is transformers itself: with default settings a
document's tokens in the training stream are exactly ``AutoTokenizer(dir)(text)["input_ids"]``.
"""

import json
import os

import numpy as np
import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl
from tokenizer_fixtures import (
    LLAMA_STYLE,
    QWEN_STYLE,
    llama_style_tokenizer_dir,
    qwen_style_tokenizer_dir,
)

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator, resolved_special_tokens
from jaxcpt.data.sources import TOKENIZED_META
from jaxcpt.data.tokenize import TokenizerFacts, tokenizer_facts

TOKENIZERS = {"llama_style_hf": llama_style_tokenizer_dir, "qwen_style_hf": qwen_style_tokenizer_dir}


def _documents_in_stream(cfg) -> list[list[int]]:
    """Every document's tokens as the stream trains on them (inputs of each segment, then its last target)."""
    docs = []
    for batch in build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1):
        for inputs, targets, segments in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
            for segment in range(1, segments.max(initial=0) + 1):
                at = segments == segment
                docs.append([*inputs[at].tolist(), int(targets[at][-1])])
    return sorted(docs)


def _short_docs(tmp_path, n=6):
    texts = make_texts(n, seed=11, max_words=8)
    return texts, write_jsonl(str(tmp_path / "docs.jsonl"), texts)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_tokenizer_facts_of_real_shaped_hf_tokenizers(name):
    from transformers import AutoTokenizer

    path = TOKENIZERS[name]()
    expected = {"llama_style_hf": LLAMA_STYLE, "qwen_style_hf": QWEN_STYLE}[name]
    assert tokenizer_facts(path) == TokenizerFacts(**expected, kind="huggingface")
    hf = AutoTokenizer.from_pretrained(path)
    assert tokenizer_facts(path).num_ids == 1 + max(hf.get_vocab().values())  # added tokens counted


def test_tokenizer_facts_of_a_sentencepiece_model():
    facts = tokenizer_facts(sp_model())
    assert facts == TokenizerFacts(bos_id=1, eos_id=2, pad_id=3, adds_bos=True, adds_eos=True, num_ids=320,
                                   kind="sentencepiece")


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_default_special_tokens_are_the_hf_tokenizers_bos_and_an_eos_per_document(tmp_path, name):
    from transformers import AutoTokenizer

    texts, path = _short_docs(tmp_path)
    tokenizer = TOKENIZERS[name]()
    cfg = data_config(sources=[{"name": "d", "paths": [path], "repeat": False}], tokenizer=tokenizer, seq_len=64)
    hf = AutoTokenizer.from_pretrained(tokenizer)
    # BOS as the tokenizer adds it; EOS closes every document, as in pretraining
    assert _documents_in_stream(cfg) == sorted(hf(t)["input_ids"] + [hf.eos_token_id] for t in texts)


def test_default_special_tokens_of_a_sentencepiece_model_are_bos_and_eos(tmp_path):
    import sentencepiece as spm

    texts, path = _short_docs(tmp_path)
    cfg = data_config(sources=[{"name": "d", "paths": [path], "repeat": False}], tokenizer=sp_model(), seq_len=64)
    sp = spm.SentencePieceProcessor(model_file=sp_model())
    assert _documents_in_stream(cfg) == sorted([1, *sp.encode(t), 2] for t in texts)


def test_explicit_flags_override_the_tokenizer(tmp_path):
    _, path = _short_docs(tmp_path)
    source = [{"name": "d", "paths": [path], "repeat": False}]
    llama = data_config(sources=source, tokenizer=llama_style_tokenizer_dir(), add_bos=False, add_eos=True)
    assert resolved_special_tokens(llama) == (None, 2)
    assert all(d[0] != 1 and d[-1] == 2 for d in _documents_in_stream(llama))
    qwen = data_config(sources=source, tokenizer=qwen_style_tokenizer_dir(), add_eos=False)
    assert resolved_special_tokens(qwen) == (None, None)
    assert resolved_special_tokens(data_config(sources=source, tokenizer=qwen_style_tokenizer_dir())) == (None, 400)


def test_explicit_add_bos_with_a_tokenizer_without_bos_is_an_error_naming_the_fix(tmp_path):
    _, path = _short_docs(tmp_path)
    cfg = data_config(sources=[{"name": "d", "paths": [path]}], tokenizer=qwen_style_tokenizer_dir(), add_bos=True)
    with pytest.raises(ConfigError, match=r"data.add_bos=true, but the tokenizer .* has no BOS token; set data.add_bos=false"):
        build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)


def test_token_shards_without_a_tokenizer_follow_the_convention_they_were_written_with(tmp_path):
    _, path = _short_docs(tmp_path)
    out = str(tmp_path / "qwen_tok")
    assert main(["tokenize", "--tokenizer", qwen_style_tokenizer_dir(), "--output", out, path]) == 0
    shards = data_config(sources=[{"name": "d", "paths": [out]}])
    assert resolved_special_tokens(shards) == (None, 400)  # Qwen: no BOS, EOS closes each document
    assert resolved_special_tokens(data_config(sources=[{"name": "d", "paths": [out]}], add_eos=False)) == (None, None)
    # Shards from before the convention was recorded: BOS and EOS where the tokenizer has them.
    meta_path = os.path.join(out, TOKENIZED_META)
    meta = json.load(open(meta_path))
    del meta["adds_bos"], meta["adds_eos"]
    json.dump(meta, open(meta_path, "w"))
    assert resolved_special_tokens(shards) == (None, 400)


def test_the_resolved_flags_are_part_of_the_data_state_fingerprint(tmp_path):
    _, path = _short_docs(tmp_path)
    source = [{"name": "d", "paths": [path]}]
    default = build_train_iterator(
        data_config(sources=source, tokenizer=sp_model(), seq_len=32), batch_size=1, process_index=0, process_count=1
    )
    explicit = build_train_iterator(data_config(sources=source, tokenizer=sp_model(), seq_len=32, add_bos=True,
                                                add_eos=True), batch_size=1, process_index=0, process_count=1)
    explicit.set_state(default.get_state())  # unset = the tokenizer's convention = the same stream
    np.testing.assert_array_equal(next(explicit)["inputs"], next(default)["inputs"])

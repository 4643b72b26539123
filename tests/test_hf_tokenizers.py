"""Exports ship the source tokenizer unchanged: Gemma's sentencepiece with its special tokens (BOS added)
and Qwen's byte-level BPE (no BOS), each built in-process the way those releases ship them."""

import os
import shutil

import pytest
import sentencepiece as spm
from test_data_fixtures import make_texts
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, GemmaTokenizer, Qwen2Tokenizer, Qwen3Config

from jaxcpt.data.tokenize import tokenizer_facts
from jaxcpt.hf import load_hf, save_hf
from jaxcpt.hf.convert import COMPANION_FILES

TEXT = "the data model<start_of_turn>user\nreplay the domain<end_of_turn>"


def write_corpus(directory) -> str:
    path = os.path.join(directory, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n".join(make_texts(500, seed=3)) + "\n")
    return path


def gemma_tokenizer(directory, corpus):
    """Gemma's layout: <pad>=0, <eos>=1, <bos>=2, <unk>=3, chat-turn tokens, byte fallback; tokenizer.model shipped."""
    prefix = os.path.join(directory, "sp")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=300, model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    staging = os.path.join(directory, "staging")
    os.makedirs(staging)
    shutil.copy2(prefix + ".model", os.path.join(staging, "tokenizer.model"))
    GemmaTokenizer.from_pretrained(staging, add_bos_token=True).save_pretrained(directory)
    shutil.copy2(prefix + ".model", os.path.join(directory, "tokenizer.model"))


def qwen_tokenizer(directory, corpus):
    """Qwen's layout: byte-level BPE, <|endoftext|> as EOS and padding, no BOS; vocab.json + merges.txt shipped."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train([corpus], trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    Qwen2Tokenizer(tokenizer_object=bpe, bos_token=None, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                   unk_token=None).save_pretrained(directory)
    bpe.model.save(str(directory))  # vocab.json, merges.txt
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")


CASES = {  # tokenizer, model whose vocabulary holds it, the BOS the tokenizer adds
    "gemma": (gemma_tokenizer, lambda: Gemma3TextConfig(vocab_size=320, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                        head_dim=16), 2),
    "qwen": (qwen_tokenizer, lambda: Qwen3Config(vocab_size=400, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16), None),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_export_ships_the_source_tokenizer_byte_identical_and_transformers_loads_it(kind, tmp_path):
    build_tokenizer, model_config, bos = CASES[kind]
    source, export = tmp_path / "hf", tmp_path / "export"
    AutoModelForCausalLM.from_config(model_config()).save_pretrained(source)
    build_tokenizer(source, write_corpus(tmp_path))
    shipped = sorted(name for name in COMPANION_FILES if (source / name).is_file())
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(shipped)

    save_hf(load_hf(source), export, tokenizer_dir=source)  # the tokenizer travels explicitly, not on the model
    for name in shipped:
        assert (export / name).read_bytes() == (source / name).read_bytes(), name

    original, exported = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(export)
    ids = exported(TEXT).input_ids
    assert ids == original(TEXT).input_ids and len(exported) == len(original)
    assert exported.bos_token_id == bos and (ids[0] == bos if bos is not None else bos not in ids)
    facts = tokenizer_facts(str(export))  # what jaxcpt's data pipeline reads: BOS only where the tokenizer adds one
    assert (facts.bos_id, facts.adds_bos) == (bos, bos is not None)


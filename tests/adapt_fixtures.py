"""Helpers for the adaptation tests: tiny base models with their tokenizers, and a domain corpus.

Two kinds of base, both built in-process from random weights:
- ``sp_base``: a Llama model (untied) with a sentencepiece BPE tokenizer (tokenizer.model +
  tokenizer.json, BOS, byte fallback), as Llama 2 / Mistral ship;
- ``byte_level_base``: a Qwen2 model (tied embeddings) with a byte-level BPE tokenizer and no
  BOS, whose embedding has more rows than the tokenizer has ids, as Qwen ships.
"""

from __future__ import annotations

import json
import random

import torch
from test_data_fixtures import make_texts, sp_model, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hf_models import TINY

DOMAIN_WORDS = (
    "dataframe tokenizer embedding gradient checkpoint optimizer sharding transformer attention softmax kernel "
    "tensor matrix vector scalar batch epoch learning schedule warmup cosine decay momentum dropout residual "
    "normalization layernorm activation über naïve данные 模型 数据"
).split()
SP_VOCAB, BYTE_LEVEL_TOKENIZER_VOCAB, BYTE_LEVEL_MODEL_VOCAB = 320, 300, 320


def domain_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"run{i} " + " ".join(rng.choice(DOMAIN_WORDS) for _ in range(rng.randint(5, 40))) for i in range(n)]


def general_texts(n: int, seed: int = 1) -> list[str]:
    return make_texts(n, seed=seed)


def _save_model(config, directory, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(directory)
    return model


def sp_base(directory) -> torch.nn.Module:
    """Llama (untied) + the sentencepiece tokenizer of test_data_fixtures, saved to ``directory``."""
    from jaxcpt.hf.tokenizer import sentencepiece_to_hf

    sentencepiece_to_hf(sp_model(), directory)
    config = LlamaConfig(**{**TINY, "vocab_size": SP_VOCAB}, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return _save_model(config, directory)


def byte_level_tokenizer(directory, texts: list[str], vocab_size: int = BYTE_LEVEL_TOKENIZER_VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)


def byte_level_base(directory) -> torch.nn.Module:
    """Qwen2 (tied, 320 embedding rows) + a 300-token byte-level BPE tokenizer without BOS."""
    byte_level_tokenizer(directory, general_texts(1500))
    config = Qwen2Config(**{**TINY, "vocab_size": BYTE_LEVEL_MODEL_VOCAB}, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=0)
    return _save_model(config, directory)


def write_domain_corpus(path, n: int = 600, seed: int = 0) -> str:
    return write_jsonl(str(path), domain_texts(n, seed))


def write_config(path, sources: dict[str, str], eval_documents: int = 0) -> str:
    """A data-only config with one jsonl source per entry of ``sources`` {name: path}."""
    data = {"data": {"sources": [{"name": name, "paths": [p], "eval_documents": eval_documents}
                                 for name, p in sources.items()]}}
    with open(path, "w") as f:
        json.dump(data, f)  # JSON is YAML
    return str(path)


def coarsening_error(old_tokens: list[str], old_ids: list[int], new_tokens: list[str], new_ids: list[int],
                     first_new_id: int, alphabet) -> str | None:
    """Why the new encoding is not the old one with runs of adjacent tokens joined into new tokens (None if it is).

    Compares in bytes: every token with an old id must be the old token at the same byte
    position, and every new token must start and end on old token boundaries."""
    def spans(tokens, ids):
        out, pos = [], 0
        for token, token_id in zip(tokens, ids):
            width = len(alphabet.to_surface(token))
            out.append((pos, pos + width, token_id))
            pos += width
        return out

    old, new = spans(old_tokens, old_ids), spans(new_tokens, new_ids)
    if old[-1:] and new[-1:] and old[-1][1] != new[-1][1]:
        return "the encodings cover different bytes"
    starts = {s: (e, i) for s, e, i in old}
    ends = {e for _, e, _ in old}
    for start, end, token_id in new:
        if token_id < first_new_id and starts.get(start) != (end, token_id):
            return f"old id {token_id} at bytes [{start}, {end}) is not the old token there"
        if token_id >= first_new_id and (start not in starts or end not in ends):
            return f"new id {token_id} at bytes [{start}, {end}) does not span whole old tokens"
    return None

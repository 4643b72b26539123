"""Helpers for the adaptation tests: tiny base models with their tokenizers, and a domain corpus.

Two kinds of base, both random-weight models beside the shared real-shaped tokenizers of
tests/tokenizer_fixtures.py:
- ``sp_base``: a Llama model (untied) with the Llama-2-style sentencepiece BPE tokenizer
  (tokenizer.model + tokenizer.json, BOS prepended, byte fallback; 320 ids, 320 rows);
- ``byte_level_base``: a Qwen2 model (tied embeddings) with the Qwen-style byte-level BPE
  tokenizer (no BOS; 400 BPE tokens, specials at 400..402) and 416 embedding rows, more
  than the tokenizer has ids, as Qwen ships.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from test_data_fixtures import make_texts, write_jsonl
from tokenizer_fixtures import llama_style_tokenizer_dir, qwen_style_tokenizer_dir
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from hf_models import TINY

DOMAIN_WORDS = (
    "dataframe tokenizer embedding gradient checkpoint optimizer sharding transformer attention softmax kernel "
    "tensor matrix vector scalar batch epoch learning schedule warmup cosine decay momentum dropout residual "
    "normalization layernorm activation über naïve данные 模型 数据"
).split()
SP_VOCAB, BYTE_LEVEL_TOKENIZER_IDS, BYTE_LEVEL_MODEL_VOCAB = 320, 403, 416


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


def _copy_tokenizer(source: str, directory) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    for file in Path(source).iterdir():
        shutil.copy2(file, Path(directory) / file.name)


def sp_base(directory) -> torch.nn.Module:
    """Llama (untied, 320 rows) + the Llama-style sentencepiece tokenizer, saved to ``directory``."""
    _copy_tokenizer(llama_style_tokenizer_dir(), directory)
    config = LlamaConfig(**{**TINY, "vocab_size": SP_VOCAB}, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    return _save_model(config, directory)


def byte_level_base(directory) -> torch.nn.Module:
    """Qwen2 (tied, 416 rows) + the Qwen-style byte-level tokenizer (403 ids, no BOS), saved to ``directory``."""
    _copy_tokenizer(qwen_style_tokenizer_dir(), directory)
    config = Qwen2Config(**{**TINY, "vocab_size": BYTE_LEVEL_MODEL_VOCAB}, num_key_value_heads=2,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=400)
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

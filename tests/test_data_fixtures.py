"""Helpers for the data tests: tiny corpora, a sentencepiece model trained in-process, token shards.

No test lives here; the test_data_* modules import these functions. Nothing is downloaded.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import json
import os
import random
import shutil
import tempfile

import numpy as np

from jaxcpt.data.sources import TOKENIZED_FORMAT, TOKENIZED_META, text_hash

WORDS = (
    "the of and to in is was for on that with as by at from his her an were are which this be or has had not "
    "first one their its new after who they have two been also all more other she would time there than can "
    "data model train token mixture replay domain protein cell gene clinical patient study result method"
).split()


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60, tag: str = "") -> list[str]:
    """``n`` distinct short documents (a numbered tag makes each unique, so hashes differ)."""
    rng = random.Random(seed)
    return [
        f"{tag}doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words)))
        for i in range(n)
    ]


def write_jsonl(path: str, texts: list[str], field: str = "text") -> str:
    lines = "".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(lines)
    elif path.endswith(".zst"):
        import zstandard

        with open(path, "wb") as f:
            f.write(zstandard.ZstdCompressor().compress(lines))
    else:
        with open(path, "wb") as f:
            f.write(lines)
    return path


@functools.lru_cache(maxsize=None)
def sp_model() -> str:
    """Path of a tiny sentencepiece model (trained once per test process, about a second)."""
    import sentencepiece as spm

    directory = tempfile.mkdtemp(prefix="jaxcpt_sp_")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    corpus = os.path.join(directory, "corpus.txt")
    with open(corpus, "w") as f:
        f.write("\n".join(make_texts(2000, seed=123)) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(directory, "tok"),
        vocab_size=320,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        byte_fallback=True,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=3,
        minloglevel=2,
    )
    return os.path.join(directory, "tok.model")


def write_token_shards(
    directory: str,
    docs: list[np.ndarray],
    *,
    docs_per_shard: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
    hashes: list[int] | None = None,
    fingerprint: str = "test",
) -> str:
    """A pre-tokenized directory in `jaxcpt tokenize`'s format, from token arrays (no tokenizer needed)."""
    os.makedirs(directory, exist_ok=True)
    if hashes is None:
        hashes = [text_hash(np.asarray(d, np.int32).tobytes()) for d in docs]
    per = docs_per_shard or len(docs)
    shards = []
    for s, start in enumerate(range(0, len(docs), per)):
        part = docs[start : start + per]
        stem = f"shard-{s:05d}"
        np.save(os.path.join(directory, f"{stem}.tokens.npy"), np.concatenate(part).astype(np.uint16))
        np.save(
            os.path.join(directory, f"{stem}.offsets.npy"),
            np.concatenate([[0], np.cumsum([len(d) for d in part])]).astype(np.int64),
        )
        np.save(os.path.join(directory, f"{stem}.hashes.npy"), np.asarray(hashes[start : start + per], np.uint64))
        shards.append(
            {"tokens": f"{stem}.tokens.npy", "num_documents": len(part), "num_tokens": int(sum(map(len, part)))}
        )
    meta = {
        "format": TOKENIZED_FORMAT,
        "tokenizer": "test",
        "tokenizer_fingerprint": fingerprint,
        "vocab_size": 1000,
        "bos_id": bos_id,
        "eos_id": eos_id,
        "pad_id": None,
        "dtype": "uint16",
        "shards": shards,
    }
    with open(os.path.join(directory, TOKENIZED_META), "w") as f:
        json.dump(meta, f)
    return directory


def random_token_docs(
    n: int, seed: int, low: int = 10, high: int = 1000, min_len: int = 5, max_len: int = 120
) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, size=rng.integers(min_len, max_len + 1)).astype(np.int32) for _ in range(n)]


def data_config(**kw):
    """A DataConfig from plain values, through the same loader as YAML."""
    from jaxcpt.config import from_dict
    from jaxcpt.data.config import DataConfig

    return from_dict(DataConfig, kw, prefix="data")


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def document_dataset(paths: list[str], *, fmt: str = "auto", text_field: str = "text", text_split: str = "per_file",
                     counter=None, **overrides):
    """A single-source ``DocumentDataset`` over ``paths`` with test defaults (train split, no
    held-out documents, read once, shuffled units, one host); keyword arguments override them.
    The counter is fatal on bad input unless another is given."""
    from jaxcpt.data.documents import BadInputCounter, DocumentDataset
    from jaxcpt.data.sources import list_units, resolve_files

    if counter is None:
        counter = BadInputCounter("s", fatal=True, max_fraction=1.0, min_records=0, warn_seconds=60.0)
    settings = dict(split="train", eval_fraction=0.0, eval_hashes=None, repeat=False, seed=0, shuffle_units=True)
    settings.update(overrides)
    units = list_units(resolve_files(paths, "s"), fmt, text_field, "s")
    return DocumentDataset(source="s", units=units, text_field=text_field, text_split=text_split, counter=counter,
                           **settings)

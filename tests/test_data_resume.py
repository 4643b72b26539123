"""Determinism and resume: the same seed gives the same batches; a restored state continues the stream exactly."""

import json

import numpy as np
import pytest
from test_data_fixtures import (
    assert_batches_equal,
    data_config,
    make_texts,
    random_token_docs,
    sp_model,
    take,
    write_jsonl,
    write_token_shards,
)

from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.data.state import decode_state
from jaxcpt.data.tokenize import tokenizer_fingerprint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    write_jsonl(str(root / "web-0.jsonl"), make_texts(20, seed=1, tag="a"))
    write_jsonl(str(root / "web-1.jsonl.zst"), make_texts(15, seed=2, tag="b"))
    # Token ids below the tiny tokenizer's vocabulary (320), as if it had written them.
    docs = random_token_docs(30, seed=3, low=4, high=320)
    write_token_shards(str(root / "tok"), docs, docs_per_shard=8, fingerprint=tokenizer_fingerprint(sp_model()))
    return root


def _cfg(corpus, **kw):
    sources = [
        {"name": "web", "paths": [str(corpus / "web-*")], "weight": 0.7, "eval_fraction": 0.1},
        {"name": "tok", "paths": [str(corpus / "tok")], "weight": 0.3},
    ]
    defaults = dict(
        sources=sources, tokenizer=sp_model(), seq_len=48, shuffle_buffer=20, packing_bins=4, tokenize_batch_size=8
    )
    return data_config(**{**defaults, **kw})


def _build(cfg, **kw):
    return build_train_iterator(cfg, batch_size=3, **{"process_index": 0, "process_count": 1, **kw})


@pytest.mark.parametrize("packing", ["first_fit", "concat_split"])
def test_resume_through_json_matches_the_uninterrupted_stream(corpus, packing):
    cfg = _cfg(corpus, packing=packing)
    straight = _build(cfg)
    take(straight, 7)
    state = json.loads(json.dumps(straight.get_state()))  # exactly what a checkpoint stores
    expected = take(straight, 60)  # crosses several epochs of both sources
    resumed = _build(cfg)
    resumed.set_state(state)
    assert resumed.step == 7
    assert_batches_equal(take(resumed, 60), expected)
    assert resumed.step == straight.step == 67


def test_state_records_epochs(corpus):
    it = _build(_cfg(corpus))
    take(it, 60)
    text = json.dumps(it.get_state())
    epochs = [int(part.split(",")[0]) for part in text.split('"epoch": ')[1:]]
    assert max(epochs) >= 1


def test_same_seed_same_batches_other_seed_other_batches(corpus):
    a, b, c = (take(_build(_cfg(corpus, seed=s)), 10) for s in (5, 5, 6))
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_resume_with_worker_processes(corpus):
    cfg = _cfg(corpus, num_workers=2, worker_buffer_size=2)
    with _build(cfg) as straight:
        first = take(straight, 4)
        state = json.loads(json.dumps(straight.get_state()))
        expected = take(straight, 8)
    with _build(cfg) as resumed:
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 8), expected)
    # Workers change which rows come when, not what a row can be: same keys, shapes, sources.
    assert {k: v.shape for k, v in first[0].items()} == {k: v.shape for k, v in expected[0].items()}


def test_resume_on_another_host_count_is_an_error_naming_both_counts(corpus):
    cfg = _cfg(corpus)
    two_hosts = _build(cfg, process_index=0, process_count=2)
    take(two_hosts, 2)
    state = two_hosts.get_state()
    with pytest.raises(ConfigError, match=r"process_count: saved 2, now 1"):
        _build(cfg).set_state(state)


def test_restart_on_mismatch_starts_a_fresh_stream_at_the_saved_step(corpus):
    cfg = _cfg(corpus, resume_mismatch="restart", stages=[[6, {"tok": 1.0}]])
    two_hosts = _build(cfg, process_index=0, process_count=2)
    take(two_hosts, 3)
    one_host = _build(cfg)
    one_host.set_state(two_hosts.get_state())
    assert one_host.step == 3
    fresh = take(_build(cfg), 2)
    restarted = take(one_host, 2)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(fresh, restarted))
    # ... and a restarted stream resumes like any other, stages on their steps.
    state = one_host.get_state()
    expected = take(one_host, 3)
    assert [set(b["source"].tolist()) for b in expected[1:]] == [{1}, {1}]  # steps 6 and 7
    again = _build(cfg)
    again.set_state(state)
    assert_batches_equal(take(again, 3), expected)


def test_state_is_plain_json_without_lost_tuples(corpus):
    it = _build(_cfg(corpus, packing="concat_split"))
    take(it, 3)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state
    # ConcatThenSplit keeps (start, stop) tuples; they come back as tuples, not lists (FACTS.md trap).
    assert "__tuple__" in json.dumps(state) and isinstance(_find_tuple(decode_state(state["pipeline"])), tuple)


def _find_tuple(x):
    if isinstance(x, tuple):
        return x
    children = x.values() if isinstance(x, dict) else x if isinstance(x, list) else []
    for child in children:
        found = _find_tuple(child)
        if found is not None:
            return found
    return None


def test_each_epoch_is_shuffled_anew(tmp_path):
    from test_data_fixtures import document_dataset
    from test_data_fixtures import make_texts as texts_of

    from jaxcpt.data.documents import EpochEnd
    from jaxcpt.data.shuffle import WindowShuffleDataset

    texts = texts_of(30, seed=9)
    for f in range(3):
        write_jsonl(str(tmp_path / f"p{f}.jsonl"), texts[f * 10 : (f + 1) * 10])
    docs = document_dataset([str(tmp_path / "*.jsonl")], repeat=True)
    it = iter(WindowShuffleDataset(docs, window_size=1000, seed=1))  # a window larger than an epoch
    marked = [take(it, 31) for _ in range(3)]  # each epoch's documents, then its EpochEnd (the accounting counts it)
    assert all(isinstance(e[-1], EpochEnd) for e in marked)
    epochs = [e[:-1] for e in marked]
    assert all(sorted(e) == sorted(texts) for e in epochs)  # the window stops at each epoch's end
    assert epochs[0] != epochs[1] != epochs[2]
    assert not any(isinstance(d, EpochEnd) for e in epochs for d in e)

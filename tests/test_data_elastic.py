"""Elastic data (data.elastic: true): the position is the step, so resuming on another host count,
with other weights or another source set neither repeats nor skips a document's tokens.

Every token id of the corpus names its document and place (``doc * 200 + 10 + k``), so the
next-token pairs (input, target) a batch trains on say exactly which documents were seen.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from test_data_fixtures import data_config, write_jsonl, write_token_shards

from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator

SEQ, GLOBAL_BATCH = 16, 4


def _docs(first: int, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.arange(rng.integers(3, 60)) + (first + d) * 200 + 10 for d in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    write_token_shards(str(root / "a"), _docs(0, 40, 1), docs_per_shard=7)
    write_token_shards(str(root / "b"), _docs(40, 40, 2), docs_per_shard=9)
    write_token_shards(str(root / "c"), _docs(80, 30, 3), docs_per_shard=30)
    return root


def _cfg(corpus, weights=None, **kw):
    weights = weights or {"a": 0.7, "b": 0.3}
    sources = [{"name": n, "paths": [str(corpus / n)], "weight": w} for n, w in weights.items()]
    return data_config(**{"sources": sources, "seq_len": SEQ, "elastic": True, **kw})


def _run(cfg, steps, hosts=1, state=None):
    """[(source name, input, target)] trained over ``steps`` steps on ``hosts`` simulated hosts, and the state."""
    iters = [build_train_iterator(cfg, batch_size=GLOBAL_BATCH // hosts, process_index=h, process_count=hosts)
             for h in range(hosts)]
    names = [s.name for s in cfg.sources]
    seen = []
    for it in iters:
        if state is not None:
            it.set_state(state)
        for _ in range(steps):
            batch = next(it)
            for row in range(batch["inputs"].shape[0]):
                mask = batch["loss_mask"][row] > 0
                src = names[batch["source"][row]]
                seen += [(src, int(i), int(t)) for i, t in zip(batch["inputs"][row][mask], batch["targets"][row][mask])]
    states = [it.get_state() for it in iters]
    assert all(s == states[0] for s in states), "every host holds the same elastic state"
    return seen, states[0]


def _assert_once(seen):
    dupes = [p for p, n in collections.Counter(seen).items() if n > 1]
    assert not dupes, f"pairs trained twice: {dupes[:5]}"


@pytest.mark.parametrize("hosts_before, hosts_after", [(2, 1), (1, 2)])
def test_resume_on_another_host_count_trains_what_one_uninterrupted_host_trains(corpus, hosts_before, hosts_after):
    cfg = _cfg(corpus)
    before, state = _run(cfg, 3, hosts=hosts_before)
    after, _ = _run(cfg, 4, hosts=hosts_after, state=state)
    straight, _ = _run(cfg, 7, hosts=1)
    _assert_once(before + after)
    assert collections.Counter(before + after) == collections.Counter(straight)


def test_changed_weights_continue_each_source_where_it_stopped(corpus):
    """Without repeating = per source, the rows trained before and after the resume are one
    unbroken prefix of that source's own row order (what the source alone would train)."""
    before, state = _run(_cfg(corpus, {"a": 0.5, "b": 0.5}), 3)
    after, end = _run(_cfg(corpus, {"a": 0.1, "b": 0.9}), 4, state=state)
    seen = before + after
    _assert_once(seen)
    for name in ("a", "b"):
        rows = end["sources"][name]["rows"]
        assert rows * SEQ == sum(1 for s, *_ in seen if s == name)
        alone_steps = -(-rows // GLOBAL_BATCH)
        alone, _ = _run(_cfg(corpus, {name: 1.0}), alone_steps)
        prefix = alone[: rows * SEQ]  # the first `rows` rows of the source on its own
        assert collections.Counter(p for p in seen if p[0] == name) == collections.Counter(prefix)
    b_before = sum(1 for s, *_ in before if s == "b")
    b_after = sum(1 for s, *_ in after if s == "b")
    assert b_after / len(after) > 0.8 > b_before / len(before)  # the new weights apply from the resume on


def test_added_source_starts_fresh_and_a_removed_one_keeps_its_position(corpus):
    _, state = _run(_cfg(corpus), 2)
    _, with_c = _run(_cfg(corpus, {"a": 0.4, "b": 0.3, "c": 0.3}), 2, state=state)
    assert with_c["sources"]["c"]["offset"] == with_c["sources"]["c"]["rows"] * SEQ > 0  # from its first row
    _, without_b = _run(_cfg(corpus, {"a": 0.5, "c": 0.5}), 2, state=with_c)
    assert without_b["sources"]["b"] == with_c["sources"]["b"]  # kept untouched in later checkpoints
    back, _ = _run(_cfg(corpus, {"a": 0.5, "b": 0.5, "c": 0.0}), 2, state=without_b)
    earlier, _ = _run(_cfg(corpus), 2)
    assert not set(p for p in back if p[0] == "b") & set(p for p in earlier if p[0] == "b")


def test_each_epoch_is_a_new_permutation_that_trains_every_row_once(corpus):
    it = build_train_iterator(_cfg(corpus, {"c": 1.0}), batch_size=1, process_index=0, process_count=1)
    epochs = collections.defaultdict(list)  # epoch -> its rows' inputs, in order
    for _ in range(200):
        batch = next(it)
        epochs[it.get_state()["sources"]["c"]["epoch"]].append(tuple(batch["inputs"][0]))
    assert len(epochs) >= 3
    for e, rows in epochs.items():
        assert len(set(rows)) == len(rows), f"a row repeats within epoch {e}"
    assert epochs[0] != epochs[1][: len(epochs[0])]  # reshuffled


def test_array_record_shards_give_the_batches_of_npy_shards(corpus, tmp_path):
    from jaxcpt.data.indexed import write_array_record_shards
    from jaxcpt.data.sources import read_tokenized_meta

    meta = read_tokenized_meta(str(corpus / "a"))
    docs = _docs(0, 40, 1)
    hashes = np.concatenate([np.load(corpus / "a" / f"shard-{k:05d}.hashes.npy") for k in range(6)])
    tok_meta = {k: meta[k] for k in ("tokenizer", "tokenizer_fingerprint", "bos_id", "eos_id", "dtype")}
    write_array_record_shards(str(tmp_path / "a"), [(d.tolist(), "") for d in docs], tokenizer_meta=tok_meta,
                              docs_per_shard=7, source_fingerprint="x")
    for k in range(6):  # the same hashes as the npy shards, so the same held-out split
        np.save(tmp_path / "a" / f"shard-{k:05d}.hashes.npy", hashes[k * 7 : (k + 1) * 7])
    npy, _ = _run(_cfg(corpus, {"a": 1.0}), 5)
    ar, _ = _run(data_config(sources=[{"name": "a", "paths": [str(tmp_path / "a")]}], seq_len=SEQ, elastic=True), 5)
    assert npy == ar


def test_held_out_documents_are_never_trained_and_fill_the_eval_rows(corpus):
    cfg = _cfg(corpus, None, eval_rows=2)
    cfg = data_config(sources=[{"name": "a", "paths": [str(corpus / "a")], "eval_documents": 5},
                               {"name": "b", "paths": [str(corpus / "b")], "eval_fraction": 0.2}],
                      seq_len=SEQ, elastic=True, eval_rows=2)
    seen, _ = _run(cfg, 20)
    trained_docs = {(t - 10) // 200 for _, _, t in seen if t > 2}
    evals = build_eval_batches(cfg, batch_size=2, process_index=0, process_count=1)
    eval_docs = {(t - 10) // 200 for b in evals.values() for t in b[0]["targets"][b[0]["loss_mask"] > 0] if t > 2}
    assert {0, 1} <= eval_docs and not trained_docs & eval_docs


def test_streaming_source_is_an_error_naming_it(corpus, tmp_path):
    path = write_jsonl(str(tmp_path / "web.jsonl"), ["hello world"])
    cfg = data_config(sources=[{"name": "web", "paths": [path]}], seq_len=SEQ, elastic=True, tokenizer="x")
    with pytest.raises(ConfigError, match="source 'web' reads .*streaming"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)


def test_changed_shards_or_streaming_state_are_errors_unless_restart(corpus, tmp_path):
    _, state = _run(_cfg(corpus), 2)
    write_token_shards(str(tmp_path / "a"), _docs(0, 41, 1), docs_per_shard=7)
    moved = data_config(sources=[{"name": "a", "paths": [str(tmp_path / "a")], "weight": 0.7},
                                 {"name": "b", "paths": [str(corpus / "b")], "weight": 0.3}], seq_len=SEQ, elastic=True)
    it = build_train_iterator(moved, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match="source 'a': its shards changed"):
        it.set_state(state)
    with pytest.raises(ConfigError, match="streaming reader's position"):
        it.set_state({"format": "jaxcpt-data-state-v1", "step": 3})
    restart = data_config(**{**moved.__dict__, "sources": [s.__dict__ for s in moved.sources], "stages": [],
                             "resume_mismatch": "restart"})
    it = build_train_iterator(restart, batch_size=4, process_index=0, process_count=1)
    it.set_state(state)
    after = it.get_state()["sources"]
    assert after["a"]["offset"] == 0 and after["b"] == state["sources"]["b"] and it.step == 2


@pytest.mark.slow  # starts Grain worker processes
def test_worker_processes_give_the_batches_of_the_trainer_process_and_resume_on_another_count(corpus):
    def batches(workers, steps, state=None):
        it = build_train_iterator(_cfg(corpus, num_workers=workers), batch_size=GLOBAL_BATCH, process_index=0,
                                  process_count=1)
        try:
            if state is not None:
                it.set_state(state)
            return [next(it) for _ in range(steps)], it.get_state()
        finally:
            it.close()

    straight, _ = batches(0, 6)
    first, state = batches(2, 3)
    second, _ = batches(3, 3, state)
    for a, b in zip(straight, first + second):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)

"""Row shape stages and min_doc_tokens on the elastic reader (data.elastic: true, jaxcpt.data.elastic).

Every token id names its document and place (``doc * 200 + 10 + k``), so the next-token pairs a
batch trains on say exactly which documents, and which of their pairs, were seen. Oracles: an
uninterrupted stream on one host (resume inside either stage, on 1 or 2 hosts, gives the same
bits), the documents themselves (every pair trained once, a document cut at the boundary goes on
where it stopped), and the index's lengths (min_doc_tokens keeps exactly the long documents).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest
from test_data_fixtures import data_config, write_token_shards

from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_eval_batches, build_train_iterator

STAGES = [{"step": 4, "seq_len": 32, "batch_size": 2},  # longer rows, the tokens per step kept
          {"step": 7, "seq_len": 8, "batch_size": 8}]  # then shorter rows, the tokens per step kept
BASE_SEQ, BASE_ROWS = 16, 4


def _docs(first: int, lengths) -> list[np.ndarray]:
    return [np.arange(n) + (first + d) * 200 + 10 for d, n in enumerate(lengths)]


def _lengths(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, 60, size=n).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_stages")
    write_token_shards(str(root / "a"), _docs(0, _lengths(40, 1)), docs_per_shard=7)
    write_token_shards(str(root / "b"), _docs(40, _lengths(40, 2)), docs_per_shard=9)
    return root


def _cfg(corpus, weights=None, stages=STAGES, **kw):
    weights = weights or {"a": 0.7, "b": 0.3}
    sources = [{"name": n, "paths": [str(corpus / n)], "weight": w, **kw.pop(f"source_{n}", {})}
               for n, w in weights.items()]
    return data_config(**{"sources": sources, "seq_len": BASE_SEQ, "elastic": True, "stages": stages, **kw})


def _global_batches(cfg, steps: int, hosts: int, state=None) -> tuple[list[dict], list[dict]]:
    """Each step's global batch (the hosts' rows in host order) from ``state`` on, and the state before each step."""
    iters = [build_train_iterator(cfg, batch_size=BASE_ROWS // hosts, process_index=h, process_count=hosts)
             for h in range(hosts)]
    batches, states = [], []
    for it in iters:
        if state is not None:
            it.set_state(json.loads(json.dumps(state)))  # through JSON, as a checkpoint holds it
    for _ in range(steps):
        saved = [json.loads(json.dumps(it.get_state())) for it in iters]
        assert all(s == saved[0] for s in saved), "every host holds the same elastic state"
        states.append(saved[0])
        parts = [next(it) for it in iters]
        batches.append({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
    return batches, states


def _place(i: int, t: int) -> tuple[int, int]:
    """(document, pair index in it) of the pair (input i, target t): (BOS, id 0) is pair 0, (id k, next) pair k + 1."""
    assert i != 2 and t != 1, (i, t)  # no pair starts at EOS or ends at BOS: pairs never cross documents
    doc = (t - 10) // 200 if i == 1 else (i - 10) // 200
    assert t == 2 or (t - 10) // 200 == doc, (i, t)
    return doc, 0 if i == 1 else (i - 10) % 200 + 1


def _pairs(batches, names=("a", "b")) -> list[tuple[str, int, int]]:
    out = []
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            mask = b["loss_mask"][row] > 0
            out += [(names[b["source"][row]], int(i), int(t)) for i, t in zip(b["inputs"][row][mask],
                                                                              b["targets"][row][mask])]
    return out


@pytest.mark.parametrize("hosts", [1, 2])
def test_resume_before_at_and_after_each_boundary_gives_the_uninterrupted_batches(corpus, hosts):
    cfg = _cfg(corpus)
    straight, states = _global_batches(cfg, 10, hosts=1)
    shapes = [b["inputs"].shape for b in straight]
    assert shapes == [(4, 16)] * 4 + [(2, 32)] * 3 + [(8, 8)] * 3  # each stage's rows at its own length
    assert not [p for p, n in collections.Counter(_pairs(straight)).items() if n > 1]  # no pair trained twice
    two_hosts, two_states = _global_batches(cfg, 10, hosts=2)
    assert two_states == states  # the position is global: the same on any host count
    for resume_at in (2, 4, 5, 7, 8):  # before, at, after the lengthening boundary; at and after the shortening
        got, _ = _global_batches(cfg, 10 - resume_at, hosts=hosts, state=states[resume_at])
        for step, (a, b) in enumerate(zip(straight[resume_at:], got), start=resume_at):
            for key in a:
                np.testing.assert_array_equal(b[key], a[key], err_msg=f"{hosts} host(s), resumed at {resume_at}, "
                                                                      f"step {step}: {key}")
    for a, b in zip(straight, two_hosts):
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_across_the_boundary_no_pair_is_repeated_or_skipped_and_the_cut_document_goes_on(corpus):
    """'Without repeating': a source's first row of the new length starts at the pair after its last
    row of the old length. Only the end of the epoch is not trained: (repeat: false) the rows of the step
    the source could not fill, fewer than that step's rows x its length."""
    lengths = _lengths(40, 1)  # document d of n ids has n + 1 pairs (BOS and EOS added)
    cfg = _cfg(corpus, {"a": 1.0}, stages=[{"step": 5, "seq_len": 40, "batch_size": 2}],
               source_a={"repeat": False})
    it = build_train_iterator(cfg, batch_size=BASE_ROWS, process_index=0, process_count=1)
    batches = list(it)  # repeat: false: the stream ends when no whole row is left
    assert [b["inputs"].shape for b in batches[4:6]] == [(4, 16), (2, 40)] and len(batches) > 8
    trained = collections.Counter((i, t) for _, i, t in _pairs(batches, ["a"]))
    assert max(trained.values()) == 1  # nothing twice
    per_doc = collections.defaultdict(set)
    for i, t in trained:
        doc, k = _place(i, t)
        per_doc[doc].add(k)
    # Nothing skipped: each document trains a prefix of its pairs, and what is missing (the last
    # documents of the epoch, the last one possibly in part) is less than the last step's 2 x 40 pairs.
    assert all(ks == set(range(len(ks))) for ks in per_doc.values())
    missing = sum(n + 1 for n in lengths) - len(trained)
    assert 0 <= missing < 2 * 40
    # The document cut at the boundary: its pairs before it end the last 16-token row, the rest starts the
    # first 40-token row (its own segment, positions from 0): the rows of one source are consecutive.
    last_old, first_new = batches[4], batches[5]
    end = _place(int(last_old["inputs"][-1, -1]), int(last_old["targets"][-1, -1]))
    start = _place(int(first_new["inputs"][0, 0]), int(first_new["targets"][0, 0]))
    assert start == (end[0], end[1] + 1), (end, start)
    assert first_new["positions"][0, 0] == 0 and first_new["segment_ids"][0, 0] == 1


def _min_doc_corpus(root):
    # Lengths around the threshold 30 (BOS and EOS make a document of n ids 30 tokens at n = 28).
    lengths = [27, 28, 29, 3, 50, 12, 28, 45, 27, 60, 31, 5, 40, 26, 33, 28] * 3
    write_token_shards(str(root / "long"), _docs(0, lengths), docs_per_shard=10)
    return lengths


def test_min_doc_tokens_leaves_out_exactly_the_short_documents_in_training_eval_and_accounting(tmp_path):
    lengths = _min_doc_corpus(tmp_path)
    long = {d for d, n in enumerate(lengths) if n + 2 >= 30}  # BOS/EOS included, as the streaming reader counts
    assert 0 < len(long) < len(lengths)
    cfg = data_config(sources=[{"name": "long", "paths": [str(tmp_path / "long")], "min_doc_tokens": 30,
                                "repeat": False, "eval_documents": 6}], seq_len=BASE_SEQ, elastic=True, eval_rows=4)
    held_out = set(range(6))  # eval_documents: the first 6 in index order
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    batches = list(it)
    trained = _pairs(batches, ["long"])
    docs = collections.Counter(_place(i, t)[0] for _, i, t in trained)
    expected_pairs = sum(lengths[d] + 1 for d in long - held_out)  # n ids + BOS + EOS - 1 pairs
    assert set(docs) <= long - held_out and len(trained) > expected_pairs - BASE_SEQ  # all but the epoch's tail
    assert not [p for p, n in collections.Counter(trained).items() if n > 1]
    acct = it.accounting()["long"]
    assert acct["pass_tokens"] == expected_pairs  # an epoch is the kept documents' pairs
    assert acct["tokens_trained"] == len(trained) and acct["epochs"] == len(trained) / expected_pairs
    evals = build_eval_batches(cfg, batch_size=2, process_index=0, process_count=1)["long"]
    eval_docs = {(int(t) - 10) // 200 for b in evals for t in b["targets"][b["loss_mask"] > 0] if t > 2}
    assert eval_docs == long & held_out  # the held-out split is filtered the same way


def test_min_doc_tokens_above_every_document_is_an_error_naming_it(tmp_path):
    _min_doc_corpus(tmp_path)
    cfg = data_config(sources=[{"name": "long", "paths": [str(tmp_path / "long")], "min_doc_tokens": 100}],
                      seq_len=BASE_SEQ, elastic=True)
    with pytest.raises(ConfigError, match=r"source 'long' trains on 0 tokens of documents of at least "
                                          r"min_doc_tokens=100 tokens \(0 of 48 documents\).*lower seq_len or min_doc"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)


def test_a_source_smaller_than_one_row_of_a_stage_where_it_is_drawn_is_an_error(tmp_path):
    write_token_shards(str(tmp_path / "small"), _docs(0, [20, 20]))  # 42 pairs
    write_token_shards(str(tmp_path / "big"), _docs(10, [60] * 10))
    sources = [{"name": "small", "paths": [str(tmp_path / "small")], "weight": 0.5},
               {"name": "big", "paths": [str(tmp_path / "big")], "weight": 0.5}]
    paused = [{"step": 3, "seq_len": 64, "batch_size": 2, "weights": {"big": 1.0}}]
    build_train_iterator(data_config(sources=sources, seq_len=16, elastic=True, stages=paused), batch_size=4,
                         process_index=0, process_count=1)  # 'small' has no weight in the 64-token stage: fine
    drawn = [{"step": 3, "seq_len": 64, "batch_size": 2}]
    with pytest.raises(ConfigError, match="source 'small' trains on 42 tokens, fewer than one row of seq_len=64"):
        build_train_iterator(data_config(sources=sources, seq_len=16, elastic=True, stages=drawn), batch_size=4,
                             process_index=0, process_count=1)


def test_a_stage_whose_rows_do_not_split_over_the_hosts_is_an_error(corpus):
    cfg = _cfg(corpus, stages=[{"step": 2, "seq_len": 48, "batch_size": 3}])
    with pytest.raises(ConfigError, match="step 2 trains 3 rows per step, not a multiple of the 2 hosts"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=2)


# -- through the trainer: train --check, plan budget, and a run resumed across the boundary ------------------
@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    from test_data_fixtures import sp_model
    from train_helpers import make_corpora

    from jaxcpt.data.command import tokenize_source
    from jaxcpt.data.config import SourceConfig

    root = tmp_path_factory.mktemp("elastic_stages_tok")
    out = {}
    for name, path in make_corpora(root / "data").items():
        out[name] = str(root / f"tok-{name}")
        tokenize_source(SourceConfig(name=name, paths=[path]), sp_model(), out[name], progress=False)
    return out


def _train_overrides(run_dir, tokenized, steps=8, extra=()):
    from train_helpers import tiny_overrides

    return tiny_overrides(run_dir, tokenized, steps=steps) + [
        "data.elastic=true", "data.stages=[{step: 4, seq_len: 64, batch_size: 8}]", *extra]


def test_train_check_and_plan_budget_show_each_stage_with_the_elastic_reader(tmp_path, tokenized):
    from jaxcpt.plan.budget import format_plan, plan_budget
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.setup import set_up

    setup = set_up(load_train_config(None, _train_overrides(tmp_path / "run", tokenized,
                                                            extra=["eval.position_buckets=[16, 40]"])), check=True)
    text = setup.describe()
    setup.close()
    assert "positions    held-out loss by position 0-16, 16-40, 40-64 at every evaluation, on general (" in text
    assert "stage        steps 0..3: 8 rows x 32 tokens, positions 0..31, 1,024 row positions; rope" in text
    assert "stage        steps 4..7: 8 rows x 64 tokens, positions 0..63, 2,048 row positions; rope" in text

    general = tokenized["general"]
    sources = (f"data.sources=[{{name: general, paths: [{general}], weight: 0.5}}, "
               f"{{name: long, paths: [{general}], weight: 0.5, min_doc_tokens: 40}}]")
    plan = plan_budget(load_train_config(None, _train_overrides(tmp_path / "run", tokenized, extra=[sources])),
                       sample_documents=50)
    assert [(s["first"], s["last"], s["seq_len"], s["rows"], s["row_positions"]) for s in plan.stages] == [
        (0, 3, 32, 8, 4 * 8 * 32), (4, 7, 64, 8, 4 * 8 * 64)]
    assert [s.fill for s in plan.sources] == [1.0, 1.0]  # the elastic reader's rows are full (concat-then-split)
    assert plan.tokens[:4].sum(axis=1).tolist() == [8 * 32] * 4 and plan.tokens[4:].sum(axis=1).tolist() == [8 * 64] * 4
    everything, long = plan.sources
    assert 0 < long.count.positions < everything.count.positions and "below min_doc_tokens" in long.count.how
    from jaxcpt.data.elastic import build_elastic_train_iterator  # the reader's own epoch size: the same count

    cfg = load_train_config(None, _train_overrides(tmp_path / "run", tokenized, extra=[sources])).data
    with build_elastic_train_iterator(cfg, batch_size=8, seq_len=32, host=(0, 1)) as it:
        assert it.accounting()["long"]["pass_tokens"] == long.count.positions
    assert "2 row shapes (data.stages)" in format_plan(plan)


@pytest.mark.parametrize("hosts", [1, 2])
def test_position_bucket_rows_from_array_record_shards_equal_the_streaming_readers(tokenized, tmp_path, hosts):
    """eval.position_buckets on the elastic reader: the same long held-out documents, each from its first
    token, as the streaming reader reads from the same documents' .npy shards (min_doc_tokens applied by both),
    also from ArrayRecord shards, which only the index can read."""
    from test_data_fixtures import sp_model

    from jaxcpt.data.indexed import IndexedSource, write_array_record_shards
    from jaxcpt.data.sources import read_tokenized_meta
    from jaxcpt.eval.position_loss import build_position_batches

    meta = read_tokenized_meta(tokenized["general"])
    ids = IndexedSource("general", [meta], bos_id=None, eos_id=None)  # the documents' ids as stored
    tokenizer_meta = {k: v for k, v in meta.items() if k not in ("format", "shards", "directory", "num_documents",
                                                                 "num_tokens", "source_fingerprint", "storage")}
    write_array_record_shards(str(tmp_path / "ar"), [(ids.tokens(d).tolist(), "") for d in range(ids.num_documents)],
                              tokenizer_meta=tokenizer_meta, docs_per_shard=70, source_fingerprint="ar")
    got = {}
    for elastic, path in ((False, tokenized["general"]), (True, str(tmp_path / "ar"))):
        source = {"name": "general", "paths": [path], "eval_documents": 60, "min_doc_tokens": 40}
        cfg = data_config(tokenizer=sp_model(), seq_len=32, sources=[source], elastic=elastic)
        got[elastic] = [build_position_batches(cfg, length=64, min_pairs=16, rows=5, batch_size=2, process_index=h,
                                               process_count=hosts)["general"] for h in range(hosts)]
    assert sum(int(b["loss_mask"][r].any()) for host in got[True] for b in host for r in range(2)) == 5
    for a_host, b_host in zip(got[False], got[True]):
        assert len(a_host) == len(b_host)
        for a, b in zip(a_host, b_host):
            for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "source"):
                np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.slow
def test_training_resumed_before_and_after_the_boundary_on_the_elastic_reader_matches_bitwise(tmp_path, tokenized):
    import os
    import shutil

    from train_helpers import train_losses

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    def overrides(run_dir):
        return _train_overrides(run_dir, tokenized, extra=["checkpoint.every_steps=3", "checkpoint.keep_last=5",
                                                           "eval.position_buckets=[16, 40]", "eval.position_rows=4"])

    straight = tmp_path / "straight"
    train(load_train_config(None, overrides(straight)))
    expected = train_losses(straight)
    assert sorted(expected) == list(range(1, 9))
    evals = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"kind": "eval"' in line]
    assert [e["step"] for e in evals] == [0, 8] and all(set(e["positions"]["general"]) == {"0-16", "16-40", "40-64"}
                                                        for e in evals)
    for resume_at in (3, 6):  # checkpoints before and after the boundary at step 4
        run = tmp_path / f"resumed_{resume_at}"
        shutil.copytree(straight, run)
        for step in os.listdir(run / "checkpoints"):
            if step.isdigit() and int(step) > resume_at:
                shutil.rmtree(run / "checkpoints" / step)
        train(load_train_config(None, overrides(run)))
        got = train_losses(run)
        assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)], resume_at  # bitwise


@pytest.mark.slow  # starts Grain worker processes
def test_grain_workers_give_the_staged_batches_and_resume_after_the_boundary_on_another_count(corpus):
    """Each worker builds every W-th step at that step's own shape."""
    def batches(workers, steps, state=None):
        with build_train_iterator(_cfg(corpus, num_workers=workers), batch_size=BASE_ROWS, process_index=0,
                                  process_count=1) as it:
            if state is not None:
                it.set_state(state)
            return [next(it) for _ in range(steps)], it.get_state()

    straight, _ = batches(0, 10)
    first, state = batches(2, 5)  # the boundary at step 4 inside the first stream
    second, _ = batches(3, 5, state)
    for step, (a, b) in enumerate(zip(straight, first + second)):
        for key in a:
            np.testing.assert_array_equal(b[key], a[key], err_msg=f"step {step}: {key}")

"""Per-source accounting (rows, tokens seen, tokens trained on, epochs): exact across resume.

The oracle is the batches themselves: the counts an iterator reports equal the counts summed
over the batches it handed out, and an interrupted run (state through JSON, a new iterator)
reports what an uninterrupted one does, for the streaming reader and the elastic one (also
when the elastic run resumes on another number of hosts).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl, write_token_shards

from jaxcpt.config import ConfigError
from jaxcpt.data.accounting import COUNTS, from_states
from jaxcpt.data.pipeline import build_train_iterator, resolved_special_tokens
from jaxcpt.data.tokenize import load_tokenizer

SEQ = 32
TINY = make_texts(3, seed=2, tag="t", max_words=8)
WEB = make_texts(40, seed=1, tag="w")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("accounting")
    write_jsonl(str(root / "web.jsonl"), WEB)
    write_jsonl(str(root / "tiny.jsonl"), TINY)  # many passes
    with open(root / "sft.jsonl", "w") as f:
        for i, text in enumerate(make_texts(30, seed=3, tag="s", max_words=12)):
            f.write(json.dumps({"prompt": f"question {i}: {text}", "completion": f" answer {i}"}) + "\n")
    rng = np.random.default_rng(0)
    for name, seed in (("a", 1), ("b", 2)):
        docs = [np.arange(rng.integers(3, 40)) + 10 * seed for _ in range(30)]
        write_token_shards(str(root / name), docs, docs_per_shard=7)
    return root


def _streaming(corpus, **kw):
    sources = [{"name": "web", "paths": [str(corpus / "web.jsonl")], "weight": 0.5},
               {"name": "tiny", "paths": [str(corpus / "tiny.jsonl")], "weight": 0.2},
               {"name": "sft", "paths": [str(corpus / "sft.jsonl")], "weight": 0.3, "instruction": "prompt_completion"}]
    return data_config(**{"sources": sources, "tokenizer": sp_model(), "seq_len": SEQ, "shuffle_buffer": 8, **kw})


def _elastic(corpus, **kw):
    sources = [{"name": "a", "paths": [str(corpus / "a")], "weight": 0.6},
               {"name": "b", "paths": [str(corpus / "b")], "weight": 0.4}]
    return data_config(**{"sources": sources, "seq_len": 16, "elastic": True, **kw})


def _counted(batches, names):
    """{source: [rows, tokens seen, tokens trained]} summed over batches: the oracle."""
    out = {n: np.zeros(3, np.int64) for n in names}
    for b in batches:
        for row in range(b["source"].shape[0]):
            seen = int((b["segment_ids"][row] > 0).sum())
            out[names[b["source"][row]]] += [seen > 0, seen, int((b["loss_mask"][row] > 0).sum())]
    return {n: v.tolist() for n, v in out.items()}


def _counts(acct):
    return {n: [a[k] for k in COUNTS] for n, a in acct.items()}


def _resumed(build, steps, split, hosts_before=1):
    """Accounting after ``split`` steps on ``hosts_before`` hosts, a JSON round trip of host 0's state, and the rest."""
    first = [build(h, hosts_before) for h in range(hosts_before)]
    for it in first:
        for _ in range(split):
            next(it)
    states = [json.loads(json.dumps(it.get_state())) for it in first]
    for it in first:
        it.close()
    second = build(0, 1)
    second.set_state(states[0])
    for _ in range(steps - split):
        next(second)
    acct = from_states([json.loads(json.dumps(second.get_state()))])
    second.close()
    return acct


def test_streaming_accounting_counts_the_batches_handed_out_and_is_exact_across_resume(corpus):
    cfg = _streaming(corpus)
    straight = build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1)
    batches = [next(straight) for _ in range(12)]
    acct = straight.accounting()
    straight.close()
    assert _counts(acct) == _counted(batches, ["web", "tiny", "sft"])
    assert acct["web"]["tokens_trained"] == acct["web"]["tokens_seen"] > 0  # text: every token trains
    assert 0 < acct["sft"]["tokens_trained"] < acct["sft"]["tokens_seen"]  # answers only
    # Epochs: tokens seen over the next-token pairs of one pass, counted here with the tokenizer (the packer's
    # bins hand rows out of reading order: this does not depend on it).
    bos, eos = resolved_special_tokens(cfg)
    tok = load_tokenizer(sp_model())
    for name, texts in (("tiny", TINY), ("web", WEB)):
        one_pass = sum(len(tok.encode(t)) + (bos is not None) + (eos is not None) - 1 for t in texts)
        assert acct[name]["pass_tokens"] == one_pass
        assert acct[name]["epochs"] == pytest.approx(acct[name]["tokens_seen"] / one_pass)
    assert acct["tiny"]["epochs"] > 2 > 0 < acct["web"]["epochs"] < 1

    build = lambda h, n: build_train_iterator(cfg, batch_size=4, process_index=h, process_count=n)  # noqa: E731
    assert _resumed(build, 12, 5) == acct


def test_streaming_accounting_sums_the_hosts_states(corpus):
    cfg = _streaming(corpus)
    iters = [build_train_iterator(cfg, batch_size=2, process_index=h, process_count=2) for h in range(2)]
    batches = [next(it) for _ in range(6) for it in iters]
    total = from_states([it.get_state() for it in iters])
    for it in iters:
        it.close()
    assert _counts(total) == _counted(batches, ["web", "tiny", "sft"])


@pytest.mark.parametrize("hosts_before", [1, 2])
def test_elastic_accounting_is_exact_across_resume_on_another_host_count(corpus, hosts_before):
    cfg = _elastic(corpus)
    straight = build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1)
    batches = [next(straight) for _ in range(10)]
    acct = from_states([straight.get_state()])
    straight.close()
    assert _counts(acct) == _counted(batches, ["a", "b"])
    assert 0 < acct["b"]["epochs"] < acct["a"]["epochs"]  # exact fractions of an epoch
    build = lambda h, n: build_train_iterator(cfg, batch_size=4 // n, process_index=h, process_count=n)  # noqa: E731
    assert _resumed(build, 10, 4, hosts_before=hosts_before) == acct


def test_removing_a_streaming_source_mid_way_is_an_error_saying_what_happens(corpus, caplog):
    it = build_train_iterator(_streaming(corpus), batch_size=4, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    it.close()
    without_sft = _streaming(corpus)
    without_sft = data_config(**{**_plain(without_sft), "sources": _plain(without_sft)["sources"][:2]})
    fresh = build_train_iterator(without_sft, batch_size=4, process_index=0, process_count=1)
    with pytest.raises(ConfigError, match=r"\['sft'\] are in the checkpoint, read part-way.*resume_mismatch=restart"):
        fresh.set_state(state)
    restart = data_config(**{**_plain(without_sft), "resume_mismatch": "restart"})
    resumed = build_train_iterator(restart, batch_size=4, process_index=0, process_count=1)
    resumed.set_state(state)
    assert resumed.accounting()["sft"] == state["accounting"]["sft"]  # what it trained stays counted
    next(resumed)
    resumed.close()


def test_removing_an_elastic_source_mid_way_says_its_rows_stop_and_its_position_is_kept(corpus, caplog):
    it = build_train_iterator(_elastic(corpus), batch_size=4, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    state = it.get_state()
    only_a = data_config(**{**_plain(_elastic(corpus)), "sources": _plain(_elastic(corpus))["sources"][:1]})
    resumed = build_train_iterator(only_a, batch_size=4, process_index=0, process_count=1)
    with caplog.at_level(logging.WARNING, logger="jaxcpt.data.elastic"):
        resumed.set_state(state)
    assert "source 'b' is in the checkpoint" in caplog.text and "adding it back continues there" in caplog.text
    next(resumed)
    after = resumed.get_state()
    assert after["sources"]["b"] == state["sources"]["b"] and after["accounting"]["b"]["rows"] > 0


def _plain(cfg):
    from jaxcpt.config import to_dict

    return to_dict(cfg)


def test_report_shows_tokens_seen_and_trained_on_per_source_from_the_latest_data_record(tmp_path):
    from jaxcpt.report.forgetting import format_table

    data = {"web": {"rows": 10, "tokens_seen": 300, "tokens_trained": 300, "epochs": 0.25},
            "sft": {"rows": 4, "tokens_seen": 120, "tokens_trained": 30, "epochs": None}}
    records = [{"kind": "eval", "step": 0, "sources": {"web": {"loss": 3.0}}},
               {"kind": "data", "step": 2, "sources": {n: {**a, "rows": 1} for n, a in data.items()}},
               {"kind": "data", "step": 4, "sources": data},
               {"kind": "eval", "step": 4, "sources": {"web": {"loss": 2.5}}}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = format_table(tmp_path)
    assert "data trained per source (step 4)" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip().startswith(("web ", "sft "))}
    assert rows["web"] == ["10", "300", "300", "100.0%", "0.250"]
    assert rows["sft"] == ["4", "120", "30", "25.0%", "<", "1"]



@pytest.mark.slow  # two Grain worker processes, twice: ~15 s
def test_streaming_accounting_with_worker_processes_is_exact_across_resume(corpus):
    cfg = _streaming(corpus, num_workers=2)
    build = lambda h, n: build_train_iterator(cfg, batch_size=4, process_index=h, process_count=n)  # noqa: E731
    straight = build(0, 1)
    batches = [next(straight) for _ in range(8)]
    acct = straight.accounting()
    straight.close()
    assert _counts(acct) == _counted(batches, ["web", "tiny", "sft"])
    assert acct["tiny"]["epochs"] > 1  # both workers' shares measured: the pass is their sum
    assert _resumed(build, 8, 3) == acct

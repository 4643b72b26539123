"""Sources with fewer units than readers: split into ranges so each record is scanned by one reader.

Readers are simulated hosts (process_index / process_count). ``read_unit`` is wrapped to count
the records each reader scans (read, whether it keeps them or not).
"""

import json
import logging
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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

import jaxcpt.data.documents as documents
import jaxcpt.data.shares as shares
from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.data.sources import list_units, read_unit
from jaxcpt.data.tokenize import tokenizer_fingerprint

READERS = 8


def _blank_line_text(path, texts):
    # Runs of blank lines, whitespace-only lines and a CRLF block: separators of every shape.
    seps = ["\n\n", "\n\n\n", "\n \n", "\r\n\r\n"]
    path.write_text("\n\n\n" + "".join(t + seps[i % len(seps)] for i, t in enumerate(texts[:-1])) + texts[-1])
    return str(path)


def _source(tmp_path, kind):
    """(source dict, number of records): one file (or shard) that 8 readers must share."""
    texts = make_texts(120, seed=5, tag=kind)
    if kind == "jsonl":
        return {"paths": [write_jsonl(str(tmp_path / "a.jsonl"), texts)]}, len(texts)
    if kind == "blank_line":
        return {"paths": [_blank_line_text(tmp_path / "a.txt", texts)], "text_split": "blank_line"}, len(texts)
    if kind == "parquet":
        path = str(tmp_path / "a.parquet")
        pq.write_table(pa.table({"text": texts}), path, row_group_size=60)  # 2 row groups for 8 readers
        return {"paths": [path]}, len(texts)
    if kind == "tokenized":
        docs = random_token_docs(120, seed=6, low=4, high=320)
        directory = write_token_shards(str(tmp_path / "tok"), docs, fingerprint=tokenizer_fingerprint(sp_model()))
        return {"paths": [directory]}, len(docs)
    if kind == "jsonl.zst":
        return {"paths": [write_jsonl(str(tmp_path / "a.jsonl.zst"), texts)]}, len(texts)
    raise ValueError(kind)


def _cfg(source, **kw):
    return data_config(
        sources=[{"name": "s", "repeat": False, **source}], tokenizer=sp_model(), seq_len=48, shuffle_buffer=4, **kw
    )


@pytest.fixture
def scanned(monkeypatch):
    """Records scanned since the fixture started, per call of the wrapped read_unit's caller."""
    counts = Counter()

    def counting(unit, *args, **kwargs):
        for item in read_unit(unit, *args, **kwargs):
            counts["records"] += 1
            yield item

    monkeypatch.setattr(documents, "read_unit", counting)
    return counts


def _trained_tokens(cfg, host, hosts):
    it = build_train_iterator(cfg, batch_size=2, process_index=host, process_count=hosts)
    return Counter(np.concatenate([b["inputs"][b["loss_mask"] > 0] for b in it] or [np.zeros(0, int)]).tolist())


@pytest.mark.parametrize("kind", ["jsonl", "blank_line", "parquet", "tokenized"])
def test_readers_of_a_split_source_scan_each_record_once_and_train_on_it_once(tmp_path, kind, scanned):
    source, records = _source(tmp_path, kind)
    cfg = _cfg(source)
    per_reader = []
    union = Counter()
    for host in range(READERS):
        before = scanned["records"]
        union += _trained_tokens(cfg, host, READERS)
        per_reader.append(scanned["records"] - before)
    assert sum(per_reader) == records  # nobody scans another reader's records
    assert max(per_reader) <= 2 * records / READERS  # and the ranges are balanced
    assert union == _trained_tokens(cfg, 0, 1)  # every document trained on once, by one reader


def test_compressed_files_fewer_than_readers_keep_record_sharding_and_warn_once(tmp_path, caplog, scanned):
    source, records = _source(tmp_path, "jsonl.zst")
    cfg = _cfg(source)
    with caplog.at_level(logging.WARNING):
        union = sum((_trained_tokens(cfg, host, 4) for host in range(4)), Counter())
    assert union == _trained_tokens(cfg, 0, 1)
    assert scanned["records"] == 4 * records + records  # every reader decompresses everything (+ the 1-host run)
    warnings = [r.getMessage() for r in caplog.records if "cannot be split by bytes" in r.getMessage()]
    assert len(warnings) == 1  # once at build time, not per host or per build
    assert "source 's'" in warnings[0] and "a.jsonl.zst" in warnings[0] and "jaxcpt tokenize" in warnings[0]
    assert "4 host(s) x 1 worker(s)" in warnings[0]


def _every_byte_ranges(path, fmt):
    (unit,) = list_units([path], fmt, "text", "s")
    size = len(open(path, "rb").read())
    return unit, [unit._replace(begin=b, end=b + 1 if b + 1 < size else None) for b in range(size)]


@pytest.mark.parametrize("kind", ["jsonl", "blank_line"])
def test_byte_ranges_cut_anywhere_give_every_record_to_exactly_one_range(tmp_path, kind):
    texts = make_texts(15, seed=7)
    split = "blank_line" if kind == "blank_line" else "per_file"
    if kind == "jsonl":
        path = tmp_path / "a.jsonl"
        path.write_bytes(b"".join(json.dumps({"text": t}).encode() + b"\n" + (b"\n" if i % 3 == 0 else b"")
                                  for i, t in enumerate(texts)).rstrip(b"\n"))  # blank lines, no final newline
        path = str(path)
    else:
        path = _blank_line_text(tmp_path / "a.txt", texts)
    whole, ranges = _every_byte_ranges(path, "jsonl" if kind == "jsonl" else "text")
    expected = [raw for _, raw in read_unit(whole, 0, "text", split)]
    assert len(expected) == len(texts)
    assert [raw for r in ranges for _, raw in read_unit(r, 0, "text", split)] == expected


@pytest.mark.parametrize("kind", ["jsonl", "blank_line", "parquet", "tokenized", "jsonl.zst"])
def test_resume_through_json_is_exact_for_every_unit_kind(tmp_path, kind):
    source, _ = _source(tmp_path, kind)
    cfg = _cfg({**source, "repeat": True})
    straight = build_train_iterator(cfg, batch_size=2, process_index=1, process_count=3)
    take(straight, 5)
    state = json.loads(json.dumps(straight.get_state()))
    expected = take(straight, 40)  # past the end of host 1's share: a second epoch
    resumed = build_train_iterator(cfg, batch_size=2, process_index=1, process_count=3)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 40), expected)


def test_the_data_state_fingerprint_notices_a_different_split(tmp_path, monkeypatch):
    source, _ = _source(tmp_path, "jsonl")
    cfg = _cfg(source)
    state = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=READERS).get_state()
    monkeypatch.setattr(shares, "RANGES_PER_READER", 2)  # what another version of the splitter would do
    with pytest.raises(ConfigError, match=r"sources\[0\]\.files"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=READERS).set_state(state)

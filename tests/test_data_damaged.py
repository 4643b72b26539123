"""Damaged data files (issue 20.3) and byte-order marks (20.13): the rest of a damaged file is counted
as bad, with a warning naming the file and where it broke; a run stops only past max_bad_fraction."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_fixtures import document_dataset, make_texts, random_token_docs, write_jsonl, write_token_shards

from jaxcpt.data.documents import BadInputCounter, BadInputError


def _read(paths, max_fraction=1.0, min_records=0, **kw):
    """(documents read, counter) of one source over ``paths``, in file order."""
    counter = BadInputCounter("web", fatal=False, max_fraction=max_fraction, min_records=min_records,
                              warn_seconds=60.0)
    docs = list(document_dataset(paths, counter=counter, shuffle_units=False, **kw))
    return docs, counter


def _cut(path, fraction):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * fraction)])


def _corrupt(path, at_fraction, length=64):
    data = bytearray(open(path, "rb").read())
    start = int(len(data) * at_fraction)
    data[start : start + length] = bytes(b ^ 0xA5 for b in data[start : start + length])
    with open(path, "wb") as f:
        f.write(bytes(data))


TEXTS = make_texts(4000, seed=11, min_words=20, max_words=60)  # ~1.3 MB of JSONL: many 64 KiB reads


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst"])
def test_truncated_compressed_file_keeps_what_precedes_the_cut_and_names_the_file(tmp_path, suffix, caplog):
    path = write_jsonl(str(tmp_path / f"part-0{suffix}"), TEXTS)
    _cut(path, 0.6)
    docs, counter = _read([path])
    assert 0 < len(docs) < len(TEXTS) and docs == TEXTS[: len(docs)]  # everything before the damage, in order
    assert counter.counts["damaged_file"] >= 1  # what a cut file lost cannot be measured: at least one
    warning = next(r.getMessage() for r in caplog.records if "damaged" in r.getMessage())
    assert "part-0" in warning and "decompressed byte" in warning and "compressed byte" in warning
    if suffix.endswith(".zst"):  # python-zstandard reads a cut frame as a short stream: we walk the frame
        assert "truncated zstd" in warning


def test_corrupt_zstd_file_counts_the_rest_estimated_from_its_bytes(tmp_path, caplog):
    path = write_jsonl(str(tmp_path / "part-1.jsonl.zst"), TEXTS)
    _corrupt(path, 0.5)
    docs, counter = _read([path])
    good = len([d for d in docs if d in set(TEXTS)])
    lost = len(TEXTS) - good
    assert good > len(TEXTS) // 4  # the records before the damaged block were delivered
    # records per byte before the damage, times the bytes after it: within a factor of two of the truth
    assert lost / 2 <= counter.counts["damaged_file"] <= lost * 2
    assert "part-1" in caplog.text and "skipped the rest of the file" in caplog.text


def test_corrupt_gzip_file_is_named_when_its_crc_fails(tmp_path, caplog):
    # Deflate decodes corrupt bytes into garbage until the member's CRC at its end: the garbage lines
    # count as malformed, and the failed check names the file (gzip cannot tell sooner in one pass).
    path = write_jsonl(str(tmp_path / "part-1.jsonl.gz"), TEXTS)
    _corrupt(path, 0.5)
    docs, counter = _read([path])
    good = [d for d in docs if d in set(TEXTS)]
    assert len(good) > len(TEXTS) // 4 and good == TEXTS[: len(good)]
    assert counter.counts["damaged_file"] >= 1 and counter.counts["malformed_json"] > 0
    assert "part-1.jsonl.gz" in caplog.text and "CRC check failed" in caplog.text


def _row_groups_file(path, rows=200, group=50):
    texts = make_texts(rows, seed=12)
    pq.write_table(pa.table({"text": texts}), path, row_group_size=group, compression="NONE")
    return texts


def test_corrupt_parquet_row_group_counts_its_remaining_rows_and_reads_the_others(tmp_path, caplog):
    path = str(tmp_path / "shard.parquet")
    texts = _row_groups_file(path)
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    data = bytearray(open(path, "rb").read())
    start = column.data_page_offset
    data[start : start + 24] = b"\xff" * 24  # the data page's header: the group cannot be decoded
    open(path, "wb").write(bytes(data))
    docs, counter = _read([path])
    assert docs == texts[:100] + texts[150:]
    assert counter.counts["damaged_file"] == 50  # the rows of the row group, from its metadata
    assert "shard.parquet" in caplog.text and "row group 2" in caplog.text


def test_parquet_file_with_an_unreadable_footer_is_counted_not_a_crash(tmp_path, caplog):
    good, bad = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    texts = _row_groups_file(good)
    _row_groups_file(bad)
    _cut(bad, 0.97)  # the footer (schema, row groups) is at the end
    docs, counter = _read([good, bad])
    assert docs == texts and counter.counts["damaged_file"] == 1
    assert "b.parquet" in caplog.text and "footer" in caplog.text


@pytest.mark.parametrize("damage", ["truncated_tokens", "offsets_do_not_fit"])
def test_corrupt_token_shard_counts_its_documents_and_reads_the_other_shards(tmp_path, damage, caplog):
    docs_in = random_token_docs(40, seed=13)
    directory = write_token_shards(str(tmp_path / "tok"), docs_in, docs_per_shard=10)
    shard = os.path.join(directory, "shard-00001.tokens.npy")
    if damage == "truncated_tokens":
        _cut(shard, 0.5)
    else:
        offsets = os.path.join(directory, "shard-00001.offsets.npy")
        np.save(offsets, np.load(offsets) * 2)
    docs, counter = _read([directory])
    assert len(docs) == 30 and counter.counts["damaged_file"] == 10  # the shard's documents, from the metadata
    for got, want in zip(docs, docs_in[:10] + docs_in[20:]):
        np.testing.assert_array_equal(got, want)
    assert "shard-00001.tokens.npy" in caplog.text


def test_damaged_file_stops_the_run_only_past_max_bad_fraction(tmp_path):
    path = write_jsonl(str(tmp_path / "part-2.jsonl.zst"), TEXTS)
    _corrupt(path, 0.5)
    docs, counter = _read([path], max_fraction=0.6, min_records=100)  # about half is lost: within 0.6
    assert counter.counts["damaged_file"] > 0
    with pytest.raises(BadInputError, match=r"max_bad_fraction=0.2 \(latest: damaged_file in .*part-2.jsonl.zst"):
        _read([path], max_fraction=0.2, min_records=100)


def test_a_resumed_reader_does_not_count_the_damage_twice(tmp_path):
    path = write_jsonl(str(tmp_path / "part-3.jsonl.gz"), TEXTS[:3000])
    _cut(path, 0.6)
    it = iter(document_dataset([path], counter=BadInputCounter("web", fatal=False, max_fraction=1.0,
                                                                  min_records=0, warn_seconds=60.0),
                               shuffle_units=False))
    docs = list(it)
    state = it.get_state()  # after the damage: the position is past the damaged unit
    assert state["bad"][-2] == 1  # damaged_file, then records read
    again = iter(document_dataset([path], counter=BadInputCounter("web", fatal=False, max_fraction=1.0,
                                                                     min_records=0, warn_seconds=60.0),
                                  shuffle_units=False))
    again.set_state(state)
    assert list(again) == [] and again.get_state()["bad"] == state["bad"] and docs


def test_a_file_damaged_after_its_position_was_saved_is_counted_on_resume(tmp_path):
    path = write_jsonl(str(tmp_path / "part-4.jsonl.gz"), TEXTS[:3000])
    counter = BadInputCounter("web", fatal=False, max_fraction=1.0, min_records=0, warn_seconds=60.0)
    it = iter(document_dataset([path], counter=counter, shuffle_units=False))
    first = [next(it) for _ in range(2000)]
    state = it.get_state()
    _cut(path, 0.3)  # the file is truncated before the saved position (a copy that went wrong)
    again = iter(document_dataset([path], counter=BadInputCounter("web", fatal=False, max_fraction=1.0, min_records=0,
                                                                     warn_seconds=60.0), shuffle_units=False))
    again.set_state(state)
    assert list(again) == [] and again.get_state()["bad"][-2] == 1 and first == TEXTS[:2000]


def test_jsonl_with_a_byte_order_mark_keeps_its_first_record(tmp_path):
    texts = make_texts(5, seed=14)
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"text": t}) + "\n" for t in texts).encode())
    docs, counter = _read([str(path)])
    assert docs == texts and counter.counts["malformed_json"] == 0
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert _read([str(gz)])[0] == texts


def test_text_file_with_a_byte_order_mark_does_not_start_with_it(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbffirst block\n\nsecond block\n")
    assert _read([str(path)], text_split="blank_line")[0] == ["first block", "second block"]
    assert _read([str(path)])[0] == ["first block\n\nsecond block\n"]


@pytest.mark.slow
def test_damaged_file_counts_reach_metrics_and_the_run_summary(tmp_path):
    from train_helpers import make_corpora, run_cli, tiny_overrides

    corpora = make_corpora(tmp_path / "data")
    corpora["domain"] = write_jsonl(str(tmp_path / "data" / "domain.jsonl.gz"), make_texts(40, seed=15, tag="dom"))
    _cut(corpora["domain"], 0.6)  # every epoch of the domain source meets the damage
    run_dir = tmp_path / "run"
    proc = run_cli(["train", *tiny_overrides(run_dir, corpora, steps=2)])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "domain.jsonl.gz' is damaged at decompressed byte" in out
    records = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    damaged = last_train["bad_input"]["domain"]["damaged_file"]
    assert damaged >= 1 and "general" not in last_train["bad_input"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["bad_input"]["domain"]["damaged_file"] >= damaged
    assert summary["bad_input"]["domain"]["records"] > damaged
    assert "bad input: source 'domain': damaged_file" in out
    # The same run checks the per-source accounting the final checkpoint writes (jaxcpt.data.accounting):
    # the device's count of tokens with loss, step by step, is the oracle for the tokens trained on.
    data = [r for r in records if r["kind"] == "data"]
    assert [r["step"] for r in data] == [2]
    trained = sum(r["tokens"] for r in records if r["kind"] == "train")
    assert sum(a["tokens_trained"] for a in data[0]["sources"].values()) == trained
    assert sum(a["rows"] for a in data[0]["sources"].values()) == 2 * 8  # 2 steps of 8 rows, none empty
    assert "data trained per source (step 2)" in (run_dir / "report.txt").read_text()

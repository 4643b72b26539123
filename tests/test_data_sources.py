"""Reading sources: every format, resumable positions, bad input counted or fatal, clear build-time errors."""

import gzip
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_fixtures import data_config, document_dataset, make_texts, sp_model, take, write_jsonl

from jaxcpt.config import ConfigError
from jaxcpt.data.documents import BadInputCounter, BadInputError
from jaxcpt.data.pipeline import build_train_iterator
from jaxcpt.data.sources import list_units, read_unit, resolve_files


def _read_source(paths, fmt="auto", text_field="text", text_split="per_file", **counter_kw):
    counter = BadInputCounter(
        "s", **{"fatal": False, "max_fraction": 1.0, "min_records": 0, "warn_seconds": 60.0, **counter_kw}
    )
    ds = document_dataset(paths, fmt=fmt, text_field=text_field, text_split=text_split, counter=counter,
                          shuffle_units=False)
    return list(ds), counter


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_plain_and_compressed(tmp_path, suffix):
    texts = make_texts(30, seed=1)
    path = write_jsonl(str(tmp_path / f"a{suffix}"), texts, field="content")
    docs, counter = _read_source([path], text_field="content")
    assert docs == texts and counter.records == 30


def test_parquet_streams_row_groups(tmp_path):
    texts = make_texts(50, seed=2)
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"body": texts, "n": list(range(50))}), path, row_group_size=7)
    units = list_units([path], "auto", "body", "s")
    assert len(units) == 8  # ceil(50 / 7) row groups: the units hosts share
    assert _read_source([path], text_field="body")[0] == texts
    with pytest.raises(ConfigError, match="no column 'text'"):
        list_units([path], "auto", "text", "s")


def test_text_files_per_file_and_blank_line_blocks(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("second\nfile\n")
    (tmp_path / "docs" / "sub" / "a.md").write_text("first file")
    assert _read_source([str(tmp_path / "docs")])[0] == ["second\nfile\n", "first file"]
    (tmp_path / "blocks.txt").write_text("one\nblock\n\n\n\ntwo\n\nthree")
    assert _read_source([str(tmp_path / "blocks.txt")], text_split="blank_line")[0] == ["one\nblock", "two", "three"]


@pytest.mark.parametrize("name,split", [("a.jsonl", "per_file"), ("a.jsonl.gz", "per_file"), ("b.txt", "blank_line")])
def test_reading_resumes_from_a_saved_position(tmp_path, name, split):
    texts = make_texts(12, seed=3)
    if name.endswith(".txt"):
        path = tmp_path / name
        path.write_text("\n\n".join(texts))
        path = str(path)
    else:
        path = write_jsonl(str(tmp_path / name), texts)
    (unit,) = list_units([path], "auto", "text", "s")
    records = list(read_unit(unit, 0, "text", split))
    position_after_five = records[4][0]
    assert list(read_unit(unit, position_after_five, "text", split)) == records[5:]


def _planted_bad_file(path, good):
    lines = [json.dumps({"text": t}).encode() for t in good]
    lines[1:1] = [
        b'{"text": "unterminated',  # malformed JSON
        json.dumps({"body": "wrong field"}).encode(),  # missing field
        json.dumps({"text": 42}).encode(),  # non-string field
        json.dumps({"text": "   "}).encode(),  # empty document
        b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8
    ]
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return str(path)


def test_bad_lines_are_counted_per_kind_and_skipped(tmp_path, caplog):
    good = make_texts(10, seed=4)
    path = _planted_bad_file(tmp_path / "bad.jsonl", good)
    docs, counter = _read_source([path])
    assert docs == good
    assert counter.counts == {
        "malformed_json": 1,
        "missing_field": 1,
        "non_string_field": 1,
        "empty": 1,
        "invalid_utf8": 1,
        "too_large": 0,
        "damaged_file": 0,
    }
    assert "skipped" in caplog.text and "bad" in caplog.text  # a warning, not silence


def test_trainer_reads_bad_input_counts_from_the_iterator(tmp_path):
    path = _planted_bad_file(tmp_path / "bad.jsonl", make_texts(40, seed=5))
    cfg = data_config(
        sources=[{"name": "web", "paths": [path], "repeat": False}],
        tokenizer=sp_model(),
        seq_len=32,
        max_bad_fraction=0.5,
    )
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    take(it, 3)
    expected = {k: 1 for k in ("malformed_json", "missing_field", "non_string_field", "empty", "invalid_utf8")}
    expected.update(too_large=0, damaged_file=0)
    assert it.bad_input_counts()["web"] == expected
    resumed = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    resumed.set_state(it.get_state())  # the counts are part of the saved state
    assert resumed.bad_input_counts()["web"] == expected


def test_fatal_bad_input_raises_naming_the_file(tmp_path):
    path = _planted_bad_file(tmp_path / "bad.jsonl", make_texts(5, seed=6))
    cfg = data_config(
        sources=[{"name": "web", "paths": [path]}], tokenizer=sp_model(), seq_len=32, fatal_bad_input=True
    )
    it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
    with pytest.raises(BadInputError, match="malformed_json.*bad.jsonl"):
        next(it)


def test_too_many_bad_documents_stop_the_run(tmp_path):
    path = tmp_path / "wrong_field.jsonl"
    path.write_text("".join(json.dumps({"body": t}) + "\n" for t in make_texts(30, seed=7)))
    with pytest.raises(BadInputError, match="max_bad_fraction"):
        _read_source([str(path)], max_fraction=0.1, min_records=20)


def test_invalid_surrogate_escape_counts_as_invalid_utf8(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "ok \\ud800 lone"}\n{"text": "fine"}\n')
    docs, counter = _read_source([str(path)])
    assert docs == ["fine"] and counter.counts["invalid_utf8"] == 1


def test_missing_file_and_empty_glob_are_build_time_errors_naming_the_pattern(tmp_path):
    with pytest.raises(ConfigError, match="nothing_here.jsonl' does not exist"):
        resolve_files([str(tmp_path / "nothing_here.jsonl")], "web")
    with pytest.raises(ConfigError, match=r"pattern '.*\*\.parquet' matches no file"):
        resolve_files([str(tmp_path / "*.parquet")], "web")
    with pytest.raises(ConfigError, match="no file system for 'nosuchfs://'.*mount"):  # buckets: test_data_remote
        resolve_files(["nosuchfs://bucket/data/*.parquet"], "web")
    cfg = data_config(sources=[{"name": "web", "paths": [str(tmp_path / "x-*.jsonl")]}], tokenizer=sp_model())
    with pytest.raises(ConfigError, match="source 'web'"):
        build_train_iterator(cfg, batch_size=1, process_index=0, process_count=1)


def test_gzip_resume_position_counts_decompressed_bytes(tmp_path):
    path = str(tmp_path / "a.jsonl.gz")
    write_jsonl(path, ["x" * 100, "y" * 100, "z"])
    (unit,) = list_units([path], "auto", "text", "s")
    positions = [p for p, _ in read_unit(unit, 0, "text", "per_file")]
    with gzip.open(path, "rb") as f:
        assert positions[-1] == len(f.read()) != os.path.getsize(path)
    assert np.diff(positions).min() > 0


@pytest.mark.parametrize("name", ["a.txt.gz", "a.md.zst"])
@pytest.mark.parametrize("split", ["per_file", "blank_line"])
def test_compressed_text_files_are_decompressed_not_counted_as_invalid_utf8(tmp_path, name, split):
    import zstandard

    texts = make_texts(4, seed=8)
    raw = "\n\n".join(texts).encode()
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else zstandard.ZstdCompressor().compress(raw))
    docs, counter = _read_source([str(path)], text_split=split)
    assert docs == (["\n\n".join(texts)] if split == "per_file" else texts)
    assert counter.counts["invalid_utf8"] == 0


def _data_directory(root):
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    write_jsonl(str(root / "a.jsonl"), ["alpha"])
    write_jsonl(str(root / "sub" / "b.jsonl.zst"), ["beta"])
    for name in ("README.md", "LICENSE", "LICENSE.txt", ".gitattributes", ".gitignore", "notes.py", "sub/CHANGELOG.md"):
        (root / name).write_text("not a document\n")
    (root / ".git" / "config.json").write_text("{}\n")


def test_a_data_directory_reads_only_data_files_and_names_what_it_skipped(tmp_path, caplog):
    _data_directory(tmp_path / "corpus")
    files = resolve_files([str(tmp_path / "corpus")], "web")
    assert [os.path.relpath(f, tmp_path / "corpus") for f in files] == ["a.jsonl", "sub/b.jsonl.zst"]
    assert "source 'web': skipped 7 file(s)" in caplog.text and "README.md" in caplog.text
    # A glob skips the same; a file named explicitly is read whatever its name.
    assert [os.path.basename(f) for f in resolve_files([str(tmp_path / "corpus" / "*")], "web2")] == [
        "a.jsonl", "b.jsonl.zst"
    ]
    assert resolve_files([str(tmp_path / "corpus" / "README.md")], "web") == [str(tmp_path / "corpus" / "README.md")]


def test_a_declared_text_format_reads_any_text_file_but_not_readmes(tmp_path):
    (tmp_path / "code").mkdir()
    for name in ("main.py", "util.md", "README.md", "data.parquet", ".hidden.py"):
        (tmp_path / "code" / name).write_text("x = 1\n")
    files = resolve_files([str(tmp_path / "code")], "code", "text")
    assert [os.path.basename(f) for f in files] == ["main.py", "util.md"]


def test_a_directory_without_data_files_is_an_error_naming_what_was_skipped(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("# a dataset card\n")
    with pytest.raises(ConfigError, match=r"holds no data file \(skipped: '.*README.md'\)"):
        resolve_files([str(tmp_path / "empty")], "web")

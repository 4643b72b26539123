"""`jaxcpt tokenize --engine beam`: ArrayRecord shards from an Apache Beam pipeline on the direct runner.

Needs apache-beam (the jaxcpt[data] extra, in its own environment: docs/data.md); skipped without it.
The oracle is the local engine (`jaxcpt tokenize` without --engine), whose .npy shards hold the
same documents in the same order.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator

pytest.importorskip("apache_beam")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam")
    write_jsonl(str(root / "a.jsonl"), make_texts(30, seed=1))
    write_jsonl(str(root / "b.jsonl"), make_texts(20, seed=2) + [""])  # one empty (bad) record
    table = pa.table({"text": make_texts(25, seed=3)})
    pq.write_table(table, str(root / "c.parquet"), row_group_size=10)  # three row groups: three shards
    (root / "d.txt").write_text(make_texts(1, seed=4)[0])
    return root


def _tree(directory):
    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def _beam(inputs, out, *extra):
    assert main(["tokenize", str(inputs), "--output", str(out), "--tokenizer", sp_model(), "--engine", "beam",
                 "--workers", "2", *extra]) == 0


def test_beam_tokenize_is_byte_identical_twice_and_holds_the_local_engines_documents(inputs, tmp_path):
    _beam(inputs, tmp_path / "one")
    _beam(inputs, tmp_path / "two", "--beam-args=--direct_running_mode=in_memory")
    one, two = _tree(tmp_path / "one"), _tree(tmp_path / "two")
    assert one == two
    assert sum(n.endswith(".array_record") for n in one) == 6  # a, b, three row groups, d

    assert main(["tokenize", str(inputs), "--output", str(tmp_path / "local"), "--tokenizer", sp_model()]) == 0
    from jaxcpt.data.indexed import IndexedSource
    from jaxcpt.data.sources import read_tokenized_meta

    beam = IndexedSource("s", [read_tokenized_meta(str(tmp_path / "one"))], bos_id=None, eos_id=None)
    local = IndexedSource("s", [read_tokenized_meta(str(tmp_path / "local"))], bos_id=None, eos_id=None)
    assert beam.num_documents == local.num_documents == 30 + 20 + 25 + 1
    np.testing.assert_array_equal(beam.hashes, local.hashes)
    for d in range(beam.num_documents):
        np.testing.assert_array_equal(beam.tokens(d), local.tokens(d))
    meta = read_tokenized_meta(str(tmp_path / "one"))
    assert meta["bad_documents"] == {"empty": 1} and meta["storage"] == "array_record"
    assert meta["num_tokens"] == sum(s["num_tokens"] for s in meta["shards"])


def test_beam_shards_train_elastically_like_the_local_shards(inputs, tmp_path):
    _beam(inputs, tmp_path / "ar", "--beam-args=--direct_running_mode=in_memory")
    assert main(["tokenize", str(inputs), "--output", str(tmp_path / "npy"), "--tokenizer", sp_model()]) == 0

    def batches(path):
        cfg = data_config(sources=[{"name": "s", "paths": [str(path)], "eval_fraction": 0.1}], tokenizer=sp_model(),
                          seq_len=32, elastic=True)
        it = build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)
        return [next(it) for _ in range(4)]

    for a, b in zip(batches(tmp_path / "ar"), batches(tmp_path / "npy")):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ConfigError, match="random access only: set data.elastic=true"):
        build_train_iterator(data_config(sources=[{"name": "s", "paths": [str(tmp_path / "ar")]}],
                                         tokenizer=sp_model(), seq_len=32), batch_size=2, process_index=0,
                             process_count=1)


def test_shards_of_another_tokenizer_are_an_error_naming_the_fix(inputs, tmp_path):
    _beam(inputs, tmp_path / "ar", "--beam-args=--direct_running_mode=in_memory")
    other = tmp_path / "other.model"
    other.write_bytes(open(sp_model(), "rb").read())  # the digest covers the file name: another tokenizer
    cfg = data_config(sources=[{"name": "s", "paths": [str(tmp_path / "ar")]}], tokenizer=str(other), seq_len=32,
                      elastic=True)
    with pytest.raises(ConfigError, match="were written with tokenizer .* re-run `jaxcpt tokenize`"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)

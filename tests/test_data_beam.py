"""`jaxcpt tokenize --engine beam`: ArrayRecord shards from an Apache Beam pipeline on the direct runner.

The pipeline tests need apache-beam (the jaxcpt[data] extra; docs/data.md) and are skipped without it;
the first test runs the pipeline's per-unit steps (its DoFns) without Beam, so their logic is checked
everywhere. The oracle is the local engine (`jaxcpt tokenize` without --engine), whose .npy shards
hold the same documents in the same order.
"""

import importlib.util
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.cli import main
from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator

needs_beam = pytest.mark.skipif(importlib.util.find_spec("apache_beam") is None,
                                reason="apache-beam is not installed (pip install -e '.[data]'; docs/data.md)")


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



def _dofn_shards(inputs, out):
    """Every unit through the pipeline's tokenize step and the shard writer, in unit order, without Beam."""
    from jaxcpt.data.beam_tokenize import _TokenizeUnit, tokenizer_files
    from jaxcpt.data.command import source_units
    from jaxcpt.data.config import SourceConfig
    from jaxcpt.data.indexed import write_array_record_shard

    src = SourceConfig(name="input", paths=[str(inputs)])
    tokenize = _TokenizeUnit(tokenizer_files(sp_model()), True, src, batch_size=7)
    os.makedirs(out)
    shards, bad = [], {}
    for index, unit in enumerate(source_units(src)):
        _, docs, unit_bad = tokenize((index, unit))
        for kind, n in unit_bad.items():
            bad[kind] = bad.get(kind, 0) + n
        if docs:
            write_array_record_shard(str(out), f"shard-{index:05d}", [i for i, _ in docs], [h for _, h in docs],
                                     "uint16")
            shards.append({"stem": f"shard-{index:05d}", "num_documents": len(docs),
                           "num_tokens": sum(len(i) for i, _ in docs)})
    return {"directory": str(out), "storage": "array_record", "dtype": "uint16", "shards": shards}, bad


def test_beam_steps_without_beam_write_the_documents_of_the_local_engine_byte_for_byte(inputs, tmp_path):
    from jaxcpt.data.indexed import IndexedSource
    from jaxcpt.data.sources import read_tokenized_meta

    meta, bad = _dofn_shards(inputs, tmp_path / "one")
    _dofn_shards(inputs, tmp_path / "two")
    assert _tree(tmp_path / "one") == _tree(tmp_path / "two")  # deterministic, shard by shard
    assert main(["tokenize", str(inputs), "--output", str(tmp_path / "local"), "--tokenizer", sp_model()]) == 0
    local_meta = read_tokenized_meta(str(tmp_path / "local"))
    assert bad == local_meta["bad_documents"] == {"empty": 1}
    ours = IndexedSource("s", [meta], bos_id=None, eos_id=None)
    local = IndexedSource("s", [local_meta], bos_id=None, eos_id=None)
    assert ours.num_documents == local.num_documents == 30 + 20 + 25 + 1 and len(meta["shards"]) == 6
    np.testing.assert_array_equal(ours.hashes, local.hashes)
    for d in range(ours.num_documents):
        assert ours.tokens(d).tobytes() == local.tokens(d).tobytes()

@pytest.mark.slow  # Beam's direct runner starts worker processes: ~15 s a test
@needs_beam
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


@pytest.mark.slow  # Beam's direct runner starts worker processes: ~15 s a test
@needs_beam
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


@pytest.mark.slow  # Beam's direct runner starts worker processes: ~15 s a test
@needs_beam
def test_shards_of_another_tokenizer_are_an_error_naming_the_fix(inputs, tmp_path):
    _beam(inputs, tmp_path / "ar", "--beam-args=--direct_running_mode=in_memory")
    other = tmp_path / "other.model"
    other.write_bytes(open(sp_model(), "rb").read())  # the digest covers the file name: another tokenizer
    cfg = data_config(sources=[{"name": "s", "paths": [str(tmp_path / "ar")]}], tokenizer=str(other), seq_len=32,
                      elastic=True)
    with pytest.raises(ConfigError, match="were written with tokenizer .* re-run `jaxcpt tokenize`"):
        build_train_iterator(cfg, batch_size=2, process_index=0, process_count=1)

"""Bounded memory for hostile input (issue 20.11): a huge single-line JSONL record, a huge text file
or blank-line block, a large Parquet row group. Each is read in a child process whose peak RSS growth
(resource.getrusage) is compared with the input's size; the bounds are generous, the input 24 MB."""

import gzip
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_fixtures import make_texts

HUGE = 24 << 20  # bytes of the hostile document / row group
LIMIT = 1 << 20  # data.max_document_bytes in these reads
GROWTH_BOUND_MB = 12  # peak RSS growth allowed while reading (the old readers held >= HUGE)

_CHILD = r"""
import json, resource, sys
import pyarrow
from jaxcpt.data.documents import BadInputCounter, DocumentDataset
from jaxcpt.data.sources import list_units, read_unit, resolve_files
try:
    from jaxcpt.data.readers import ReadLimits
except ImportError:  # the readers before the bounds (0acb231): measured the same way, without them
    ReadLimits = None

for unit in list_units([sys.argv[2]], "auto", "text", "s"):  # pyarrow's first use allocates: before the baseline
    list(read_unit(unit, 0, "text", "per_file"))

results = {}
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for name, path, split, limit, batch in json.loads(sys.argv[1]):
    counter = BadInputCounter("s", fatal=False, max_fraction=1.0, min_records=0, warn_seconds=1e9)
    units = list_units(resolve_files([path], "s"), "auto", "text", "s")
    ds = DocumentDataset(source="s", units=units, text_field="text", text_split=split, split="train",
                         eval_fraction=0.0, eval_hashes=None, counter=counter, repeat=False, seed=0,
                         shuffle_units=False, **({"limits": ReadLimits(limit, batch)} if ReadLimits else {}))
    docs = sum(1 for _ in ds)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the high-water mark so far
    arrow_mb = pyarrow.default_memory_pool().max_memory() / 2**20  # Arrow's own high-water mark
    results[name] = {"docs": docs, "counts": counter.counts, "growth_mb": (peak - base) / 1024, "arrow_mb": arrow_mb}
print(json.dumps(results))
"""


def _write_chunks(f, total: int, piece: bytes) -> None:
    for _ in range(total // len(piece)):
        f.write(piece)


@pytest.fixture(scope="module")
def hostile_reads(tmp_path_factory):
    """Every hostile input read once in one child process (cases in order; the peak only grows)."""
    root = tmp_path_factory.mktemp("hostile")
    small = make_texts(20, seed=21)
    cases = []
    # A multi-MB single-line JSONL record between ordinary ones.
    path = root / "one_line.jsonl"
    with open(path, "wb") as f:
        f.write("".join(json.dumps({"text": t}) + "\n" for t in small[:10]).encode())
        f.write(b'{"text": "')
        _write_chunks(f, HUGE, b"abcdefgh" * 8192)
        f.write(b'"}\n')
        f.write("".join(json.dumps({"text": t}) + "\n" for t in small[10:]).encode())
    cases.append(("jsonl_line", str(path), "per_file", LIMIT, 64 << 20))
    # A huge text file read whole (text_split: per_file), plain and gzip (its size is not on disk).
    (root / "per_file").mkdir()
    with open(root / "per_file" / "huge.txt", "wb") as f:
        _write_chunks(f, HUGE, b"word " * 4096)
    (root / "per_file" / "small.txt").write_text(small[0])
    cases.append(("text_per_file", str(root / "per_file"), "per_file", LIMIT, 64 << 20))
    with gzip.open(root / "huge.txt.gz", "wb", compresslevel=1) as f:
        _write_chunks(f, HUGE, b"word " * 4096)
    cases.append(("text_per_file_gz", str(root / "huge.txt.gz"), "per_file", LIMIT, 64 << 20))
    # A blank-line block of many lines, between ordinary blocks.
    with open(root / "blocks.txt", "wb") as f:
        f.write("\n\n".join(small[:5]).encode() + b"\n\n")
        _write_chunks(f, HUGE, (b"a line of a very long block " * 100 + b"\n") * 10)
        f.write(b"\n" + "\n\n".join(small[5:10]).encode())
    cases.append(("text_block", str(root / "blocks.txt"), "blank_line", LIMIT, 64 << 20))
    # A Parquet file whose one row group holds HUGE bytes of text, in rows of ~10 KB.
    rows = HUGE // 10_000
    texts = [f"row{i} " + "abcdefghij" * 1000 for i in range(rows)]
    # Pages of 32 rows, no dictionary: a page is read whole (Parquet's unit), so the bound is a batch plus a
    # page; pyarrow's default writer makes pages of 1024 rows, 10 MB here, and a dictionary page besides.
    pq.write_table(pa.table({"text": texts}), root / "group.parquet", row_group_size=rows, write_batch_size=32,
                   use_dictionary=False)
    pq.write_table(pa.table({"text": texts[:3]}), root / "warm_up.parquet")
    del texts
    cases.append(("parquet_group", str(root / "group.parquet"), "per_file", LIMIT, 256 << 10))
    # Arrow's system allocator: mimalloc (the default) keeps ~20 MB of freed pages mapped after these reads,
    # which RSS would count against the reader; Arrow's own peak is asserted as well.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               ARROW_DEFAULT_MEMORY_POOL="system")
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases), str(root / "warm_up.parquet")], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), rows


def test_multi_megabyte_jsonl_line_is_skipped_as_too_large_without_being_held(hostile_reads):
    result = hostile_reads[0]["jsonl_line"]
    assert result["docs"] == 20 and result["counts"]["too_large"] == 1
    assert result["growth_mb"] < GROWTH_BOUND_MB, result


def test_huge_text_file_read_per_file_is_skipped_as_too_large_without_being_read(hostile_reads):
    for case in ("text_per_file", "text_per_file_gz"):
        result = hostile_reads[0][case]
        assert result["counts"]["too_large"] == 1, case
        assert result["growth_mb"] < GROWTH_BOUND_MB, (case, result)
    assert hostile_reads[0]["text_per_file"]["docs"] == 1  # the small file beside it


def test_huge_blank_line_block_is_skipped_as_too_large_and_its_neighbours_kept(hostile_reads):
    result = hostile_reads[0]["text_block"]
    assert result["docs"] == 10 and result["counts"]["too_large"] == 1
    assert result["growth_mb"] < GROWTH_BOUND_MB, result


def test_large_parquet_row_group_is_read_in_bounded_batches(hostile_reads):
    results, rows = hostile_reads
    result = results["parquet_group"]
    assert result["docs"] == rows and result["counts"]["too_large"] == 0
    assert result["growth_mb"] < GROWTH_BOUND_MB and result["arrow_mb"] < HUGE / 2**20 / 3, result


def test_parquet_value_above_the_limit_is_skipped_as_too_large(tmp_path):
    from test_data_fixtures import document_dataset

    from jaxcpt.data.documents import BadInputCounter
    from jaxcpt.data.readers import ReadLimits

    texts = make_texts(10, seed=22)
    path = str(tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts[:5] + ["x" * (LIMIT + 1)] + texts[5:]}), path, row_group_size=4)
    counter = BadInputCounter("s", fatal=False, max_fraction=1.0, min_records=0, warn_seconds=60.0)
    docs = list(document_dataset([path], counter=counter, shuffle_units=False, limits=ReadLimits(LIMIT, 64)))
    assert docs == texts and counter.counts["too_large"] == 1

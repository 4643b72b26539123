"""Multi-host splitting, simulated with process_index / process_count: disjoint shares whose union is the whole."""

from collections import Counter

import numpy as np
import pytest
from test_data_fixtures import (
    data_config,
    document_dataset,
    make_texts,
    random_token_docs,
    write_jsonl,
    write_token_shards,
)

from jaxcpt.data.pipeline import build_train_iterator


def _docs(paths, host, hosts, worker=0, workers=1):
    ds = document_dataset(paths, host_index=host, host_count=hosts)
    if workers > 1:
        ds.set_slice(slice(worker, None, workers))  # what Grain's multiprocess prefetch does in each worker
    return list(ds)


@pytest.mark.parametrize("num_files", [4, 1])  # 4 files: whole files per host; 1 file: every other record
def test_two_hosts_read_disjoint_documents_whose_union_is_the_source(tmp_path, num_files):
    texts = make_texts(41, seed=1)
    per = -(-len(texts) // num_files)
    for f in range(num_files):
        write_jsonl(str(tmp_path / f"part-{f}.jsonl"), texts[f * per : (f + 1) * per])
    paths = [str(tmp_path / "part-*.jsonl")]
    host0, host1 = _docs(paths, 0, 2), _docs(paths, 1, 2)
    assert not set(host0) & set(host1)
    assert sorted(host0 + host1) == sorted(texts)
    assert abs(len(host0) - len(host1)) <= per  # balanced to within a file


def test_workers_split_a_hosts_share_without_changing_it(tmp_path):
    texts = make_texts(30, seed=2)
    for f in range(3):
        write_jsonl(str(tmp_path / f"part-{f}.jsonl"), texts[f * 10 : (f + 1) * 10])
    paths = [str(tmp_path / "part-*.jsonl")]
    host_share = _docs(paths, 1, 2)
    by_worker = [_docs(paths, 1, 2, worker=w, workers=2) for w in range(2)]
    assert not set(by_worker[0]) & set(by_worker[1])
    assert sorted(by_worker[0] + by_worker[1]) == sorted(host_share)


def test_two_host_pipelines_train_on_every_token_once(tmp_path):
    docs = random_token_docs(50, seed=3)
    directory = write_token_shards(str(tmp_path / "tok"), docs, docs_per_shard=5)
    cfg = data_config(sources=[{"name": "t", "paths": [directory], "repeat": False}], seq_len=40, shuffle_buffer=8)

    def trained_inputs(host, hosts):
        it = build_train_iterator(cfg, batch_size=4, process_index=host, process_count=hosts)
        return Counter(np.concatenate([b["inputs"][b["loss_mask"] > 0] for b in it]).tolist())

    union = trained_inputs(0, 2) + trained_inputs(1, 2)
    assert union == trained_inputs(0, 1)
    # Every document's tokens (with BOS, without the final EOS) are inputs exactly once.
    assert union == Counter(np.concatenate([np.concatenate([[1], d]) for d in docs]).tolist())

"""Packing: segments never span documents, positions restart, every token is trained exactly once."""

import numpy as np
import pytest
from test_data_fixtures import data_config, write_token_shards

from jaxcpt.data.packing import document_pieces
from jaxcpt.data.pipeline import build_train_iterator

BOS, EOS = 1, 2
BASE, STRIDE = 100, 400  # token BASE + STRIDE*i + k is token k of document i: a token names its document


def _docs(n: int, seed: int) -> list[np.ndarray]:
    lengths = np.random.default_rng(seed).integers(0, 100, size=n)  # some longer than a row, some empty
    return [BASE + STRIDE * i + np.arange(length, dtype=np.int32) for i, length in enumerate(lengths)]


def _full(doc: np.ndarray) -> np.ndarray:
    return np.concatenate([[BOS], doc, [EOS]]).astype(np.int32)


def _read_all(tmp_path, packing: str, docs: list[np.ndarray], seq_len: int) -> list[dict]:
    directory = write_token_shards(str(tmp_path / "src"), docs, docs_per_shard=17)
    cfg = data_config(
        sources=[{"name": "only", "paths": [directory], "repeat": False}],
        seq_len=seq_len,
        packing=packing,
        packing_bins=4,
        shuffle_buffer=16,
    )
    return list(build_train_iterator(cfg, batch_size=3, process_index=0, process_count=1))


@pytest.mark.parametrize("packing", ["first_fit", "concat_split"])
def test_each_document_token_is_an_input_exactly_once_and_segments_stay_in_one_document(tmp_path, packing):
    seq_len = 32
    docs = _docs(60, seed=0)
    batches = _read_all(tmp_path, packing, docs, seq_len)
    covered = [np.zeros(len(d) + 1, int) for d in docs]  # input positions of each full document (len + 2 - 1)
    for batch in batches:
        np.testing.assert_array_equal(batch["loss_mask"], (batch["segment_ids"] > 0).astype(np.float32))
        for row in range(batch["inputs"].shape[0]):
            seg, inp, tgt, pos = (batch[k][row] for k in ("segment_ids", "inputs", "targets", "positions"))
            assert (np.diff(seg[seg > 0]) >= 0).all(), "segment ids grow along a row"
            for s in np.unique(seg[seg > 0]):
                where = np.flatnonzero(seg == s)
                assert (np.diff(where) == 1).all(), "a segment must be contiguous"
                np.testing.assert_array_equal(pos[where], np.arange(len(where)))  # positions restart per piece
                body = np.concatenate([inp[where], tgt[where]])
                owners = {(t - BASE) // STRIDE for t in body if t >= BASE}
                assert len(owners) <= 1, f"segment {s} spans documents {owners}"
                doc = (
                    owners.pop()
                    if owners
                    else next(i for i, d in enumerate(docs) if len(d) == 0 and covered[i][0] == 0)
                )
                full = _full(docs[doc])
                start = 0 if inp[where][0] == BOS else int(inp[where][0] - BASE - STRIDE * doc + 1)
                np.testing.assert_array_equal(inp[where], full[start : start + len(where)])
                np.testing.assert_array_equal(tgt[where], full[start + 1 : start + 1 + len(where)])  # the next token
                covered[doc][start : start + len(where)] += 1
    for doc, cover in enumerate(covered):
        assert (cover == 1).all(), f"document {doc}: input positions covered {cover.tolist()}"


def test_first_fit_keeps_short_documents_whole_in_one_row(tmp_path):
    docs = _docs(40, seed=1)
    seq_len = 128  # every document (at most 101 pairs) fits a row
    batches = _read_all(tmp_path, "first_fit", docs, seq_len)
    pieces = 0
    for batch in batches:
        for seg, inp in zip(batch["segment_ids"], batch["inputs"]):
            for s in np.unique(seg[seg > 0]):
                assert inp[seg == s][0] == BOS, "a document that fits a row is never split"
                pieces += 1
    assert pieces == len(docs)


def test_concat_split_rows_are_full_except_the_last(tmp_path):
    batches = _read_all(tmp_path, "concat_split", _docs(50, seed=2), 32)
    full = np.concatenate([b["loss_mask"].sum(axis=1) for b in batches])
    filled = full[full > 0]
    assert (filled[:-1] == 32).all()


def test_document_pieces_pairs_each_token_with_the_next():
    tokens = np.arange(10, dtype=np.int32)  # a document of 10 tokens: 9 next-token pairs
    pieces = document_pieces(tokens, seq_len=4)
    assert [len(p["inputs"]) for p in pieces] == [4, 4, 1]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in pieces]), tokens[:-1])
    np.testing.assert_array_equal(np.concatenate([p["targets"] for p in pieces]), tokens[1:])
    assert document_pieces(np.array([7], np.int32), seq_len=4) == []  # nothing to predict

"""Held-out splits: chosen by a stable text hash, never trained on, the same evaluation rows every call."""

import numpy as np
import pytest
from test_data_fixtures import data_config, document_dataset, make_texts, sp_model, write_jsonl

from jaxcpt.data.pipeline import _plan, build_eval_batches
from jaxcpt.data.sources import text_hash


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    texts = make_texts(400, seed=1)
    write_jsonl(str(root / "a.jsonl"), texts[:200])
    write_jsonl(str(root / "b.jsonl"), texts[200:])
    return root, texts


def _split_docs(root, split, eval_fraction=0.0, eval_hashes=None, host=(0, 1)):
    return list(document_dataset([str(root / "*.jsonl")], split=split, eval_fraction=eval_fraction,
                                 eval_hashes=eval_hashes, host_index=host[0], host_count=host[1]))


def test_eval_fraction_holds_out_documents_by_stable_hash_and_never_trains_on_them(corpus):
    root, texts = corpus
    train, held_out = _split_docs(root, "train", 0.1), _split_docs(root, "eval", 0.1)
    assert not set(train) & set(held_out)
    assert sorted(train + held_out) == sorted(texts)
    assert 20 <= len(held_out) <= 60  # about 10% of 400
    # The split is a property of each text, not of hosts, order or seed.
    assert set(held_out) == {t for t in texts if text_hash(t.encode()) < 0.1 * 2**64}
    both_hosts = _split_docs(root, "train", 0.1, host=(0, 2)) + _split_docs(root, "train", 0.1, host=(1, 2))
    assert sorted(both_hosts) == sorted(train)


def test_eval_documents_holds_out_the_first_documents(corpus):
    root, texts = corpus
    cfg = data_config(
        sources=[{"name": "s", "paths": [str(root / "*.jsonl")], "eval_documents": 5}], tokenizer=sp_model()
    )
    plan = _plan(cfg, None, 0, 1)
    assert plan.eval_hashes[0] == {text_hash(t.encode()) for t in texts[:5]}
    held_out = _split_docs(root, "eval", eval_hashes=plan.eval_hashes[0])
    train = _split_docs(root, "train", eval_hashes=plan.eval_hashes[0])
    assert held_out == texts[:5]
    assert sorted(train) == sorted(texts[5:])


def test_eval_batches_are_the_same_every_call_and_split_across_hosts(corpus):
    root, _ = corpus
    cfg = data_config(
        sources=[
            {"name": "s", "paths": [str(root / "*.jsonl")], "eval_fraction": 0.2},
            {"name": "no_eval", "paths": [str(root / "a.jsonl")]},
        ],
        tokenizer=sp_model(),
        seq_len=32,
        eval_rows=10,
        seed=1,
    )
    first = build_eval_batches(cfg, batch_size=4, process_index=0, process_count=1)
    again = build_eval_batches(
        data_config(**{**_as_dict(cfg), "seed": 99}), batch_size=4, process_index=0, process_count=1
    )
    assert list(first) == ["s"]  # sources without a held-out split have no eval batches
    assert len(first["s"]) == 3  # 10 rows in batches of 4, the last padded
    for a, b in zip(first["s"], again["s"]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert first["s"][-1]["loss_mask"][2:].sum() == 0  # padding rows carry no loss
    hosts = [build_eval_batches(cfg, batch_size=4, process_index=i, process_count=2)["s"] for i in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == 2  # equal counts: no host waits in a collective
    rows = lambda batches: [r for b in batches for r, m in zip(b["inputs"], b["loss_mask"]) if m.any()]  # noqa: E731
    np.testing.assert_array_equal(
        np.array(rows(hosts[0]) + rows(hosts[1]))[np.argsort([0, 2, 4, 6, 8, 1, 3, 5, 7, 9])], rows(first["s"])
    )


def _as_dict(cfg):
    from jaxcpt.config import to_dict

    return to_dict(cfg)


def _trained_texts(cfg) -> set[str]:
    """The texts the training stream holds, decoded from each packed segment."""
    import sentencepiece as spm

    from jaxcpt.data.pipeline import build_train_iterator

    sp = spm.SentencePieceProcessor(model_file=sp_model())
    texts = set()
    for batch in build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1):
        for inputs, segments in zip(batch["inputs"], batch["segment_ids"]):
            for segment in range(1, segments.max(initial=0) + 1):
                texts.add(sp.decode(inputs[segments == segment][1:].tolist()))  # drop the BOS
    return texts


@pytest.mark.parametrize("held_out", [{"eval_documents": 5}, {"eval_fraction": 0.2}])
def test_a_document_held_out_by_one_source_is_trained_on_by_no_source(corpus, tmp_path, held_out):
    root, texts = corpus
    write_jsonl(str(tmp_path / "replay.jsonl"), texts[:100])  # the same documents in a second source
    cfg = data_config(
        sources=[
            {"name": "domain", "paths": [str(root / "a.jsonl")], "weight": 0.0, **held_out},
            {"name": "replay", "paths": [str(tmp_path / "replay.jsonl")], "repeat": False},
        ],
        tokenizer=sp_model(),
        seq_len=512,
        shuffle_buffer=0,
    )
    if "eval_documents" in held_out:
        held = set(texts[:5])  # the first documents of domain's file
    else:
        held = {t for t in texts[:200] if text_hash(t.encode()) < 0.2 * 2**64}
    replay = set(texts[:100])
    assert held & replay
    assert _trained_texts(cfg) == replay - held  # replay trains on all of its documents but domain's held-out ones

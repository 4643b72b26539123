"""Held-out loss by position bucket (eval.position_buckets, jaxcpt.eval.position_loss, jaxcpt.report.positions).

Oracles: the per-token cross-entropy of the model's full logits averaged by hand over each
range of positions; the held-out documents themselves (a row is one document from its first
token); a metrics file written by hand for the report.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.eval.position_loss import bucket_name, bucket_ranges, build_position_batches, position_eval_step
from jaxcpt.model.config import ModelConfig
from jaxcpt.model.transformer import init_model
from jaxcpt.sharding.mesh import build_mesh


def test_buckets_cut_at_the_edges_below_the_row_length_and_are_named_in_k():
    assert bucket_ranges([4096, 16384, 32768, 65536], 32768) == [(0, 4096), (4096, 16384), (16384, 32768)]
    assert bucket_ranges([16, 40], 64) == [(0, 16), (16, 40), (40, 64)]
    assert [bucket_name(*r) for r in bucket_ranges([4096, 16384], 32768)] == ["0-4k", "4k-16k", "16k-32k"]


def test_bucket_losses_equal_the_per_token_loss_averaged_over_each_range_of_positions():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      dtype="float32")
    model = init_model(cfg, build_mesh({"data": 1}, jax.devices()[:1]))
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    tokens = rng.randint(0, 128, size=(2, 25))
    mask = np.ones((2, 24), np.float32)
    mask[1, 15:] = 0  # a shorter document: its row is padded from position 15
    batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
             "segment_ids": jnp.asarray((mask > 0).astype(np.int32)), "positions": jnp.asarray(np.tile(np.arange(24), (2, 1))),
             "loss_mask": jnp.asarray(mask)}
    ranges = ((0, 5), (5, 17), (17, 24))
    step = jax.jit(functools.partial(position_eval_step, graphdef=graphdef, chunk_size=4, ranges=ranges))
    loss, count = step(params, batch)

    logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b["inputs"], b["segment_ids"], b["positions"]))(params, batch)
    # logits [2, 24, V]
    per_token = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), batch["targets"][..., None], -1)[..., 0]
    for k, (lo, hi) in enumerate(ranges):
        expected = float((per_token[:, lo:hi] * mask[:, lo:hi]).sum())
        np.testing.assert_allclose(float(loss[k]), expected, rtol=1e-5)
        assert float(count[k]) == mask[:, lo:hi].sum()
    assert float(count[2]) == 7  # only the long row reaches the last range


def test_position_rows_are_long_held_out_documents_each_from_its_first_token(tmp_path):
    texts = make_texts(40, seed=5, min_words=1, max_words=70)
    path = write_jsonl(str(tmp_path / "h.jsonl"), texts)
    cfg = data_config(tokenizer=sp_model(), seq_len=64, sources=[{"name": "h", "paths": [path], "eval_documents": 30}])
    batches = build_position_batches(cfg, length=64, min_pairs=16, rows=5, batch_size=4, process_index=0,
                                     process_count=1)
    rows = [dict((k, b[k][r]) for k in b) for b in batches["h"] for r in range(4) if b["loss_mask"][r].any()]
    assert len(rows) == 5 and len(batches["h"]) == 2  # 5 rows in batches of 4, the last padded

    from jaxcpt.data.tokenize import cached_tokenizer
    from jaxcpt.data.pipeline import resolved_special_tokens

    bos, eos = resolved_special_tokens(cfg)
    docs = [[bos, *ids, eos] for ids in cached_tokenizer(sp_model()).encode_batch(texts[:30])]
    long_docs = [d for d in docs if len(d) - 1 > 16][:5]  # the first held-out documents past the first edge
    assert len(long_docs) == 5 and len(long_docs) < len(docs)
    for row, doc in zip(rows, long_docs):
        n = min(len(doc) - 1, 64)
        np.testing.assert_array_equal(row["inputs"][:n], doc[:n])
        np.testing.assert_array_equal(row["targets"][:n], doc[1 : n + 1])
        np.testing.assert_array_equal(row["positions"][:n], np.arange(n))
        assert row["loss_mask"].sum() == n and (row["segment_ids"][:n] == 1).all()


def test_report_shows_each_bucket_against_step_0(tmp_path):
    from jaxcpt.report.forgetting import format_table

    records = [
        {"kind": "eval", "step": 0, "sources": {"long": {"loss": 3.0}},
         "positions": {"long": {"0-16": {"loss": 2.5, "tokens": 64}, "16-64": {"loss": 3.5, "tokens": 100}}}},
        {"kind": "eval", "step": 10, "sources": {"long": {"loss": 2.8}},
         "positions": {"long": {"0-16": {"loss": 2.6, "tokens": 64}, "16-64": {"loss": 3.0, "tokens": 100}}}},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = format_table(tmp_path)
    assert "held-out loss by position" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["long", "0-16", "2.5000", "2.6000", "+0.1000"] in lines  # short-context forgetting
    assert ["long", "16-64", "3.5000", "3.0000", "-0.5000"] in lines  # long-context gain

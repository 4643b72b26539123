"""Sequence length as part of a data stage (data.stages[].seq_len / batch_size, jaxcpt.data.stage_shapes).

Oracles: the documents themselves (every next-token pair of every training document is trained
exactly once over a finite stream that crosses the boundary), an uninterrupted stream / run
(resume inside either stage gives the same bits), and the numbers in the config (messages).
"""

from __future__ import annotations

import collections
import json
import os
import shutil

import numpy as np
import pytest
from test_data_fixtures import data_config, make_texts, sp_model, write_jsonl

from jaxcpt.config import ConfigError
from jaxcpt.data.pipeline import build_train_iterator, resolved_special_tokens
from jaxcpt.data.stage_shapes import check_context_split, resolve_shapes
from jaxcpt.errors import UserError


def _corpus(tmp_path, n=120, seed=3, max_words=90):
    return write_jsonl(str(tmp_path / "long.jsonl"), make_texts(n, seed=seed, min_words=2, max_words=max_words))


def _cfg(path, stages, *, seq_len=32, repeat=False, **kw):
    source = {"name": "long", "paths": [path], "weight": 1.0, "repeat": repeat, **kw.pop("source", {})}
    return data_config(tokenizer=sp_model(), seq_len=seq_len, sources=[source], stages=stages, shuffle_buffer=16,
                       packing_bins=3, **kw)  # 3 bins: the boundary falls inside a packing round


def _document_pairs(cfg, path, min_tokens=0) -> collections.Counter:
    """The oracle: every (input, target) pair of every document, BOS/EOS as the pipeline adds them."""
    from jaxcpt.data.tokenize import cached_tokenizer

    bos, eos = resolved_special_tokens(cfg)
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f]
    pairs = collections.Counter()
    for ids in cached_tokenizer(cfg.tokenizer).encode_batch(texts):
        tokens = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        if len(tokens) >= min_tokens:
            pairs.update(zip(tokens[:-1], tokens[1:]))
    return pairs


def _trained_pairs(batches) -> collections.Counter:
    pairs = collections.Counter()
    for b in batches:
        real = b["loss_mask"] > 0  # [rows, seq]
        pairs.update(zip(b["inputs"][real].tolist(), b["targets"][real].tolist()))
    return pairs


def _drain(it) -> list[dict]:
    out = []
    for batch in it:
        out.append(batch)
    return out


@pytest.mark.parametrize("before,after", [((32, 8), (64, 4)), ((64, 4), (32, 8))])  # longer rows, then shorter
def test_repacking_at_the_boundary_trains_every_document_pair_exactly_once(tmp_path, before, after):
    path = _corpus(tmp_path)
    cfg = _cfg(path, [{"step": 5, "seq_len": after[0], "batch_size": after[1]}], seq_len=before[0])
    with build_train_iterator(cfg, batch_size=before[1], process_index=0, process_count=1) as it:
        batches = _drain(it)  # repeat: false, so the stream ends once the corpus is read
    assert len(batches) > 8  # the boundary is well inside the stream
    assert all(b["inputs"].shape == (before[1], before[0]) for b in batches[:5])
    assert all(b["inputs"].shape == (after[1], after[0]) for b in batches[5:])
    assert _trained_pairs(batches) == _document_pairs(cfg, path)  # nothing lost, nothing repeated


def test_before_the_boundary_a_staged_stream_gives_the_batches_of_an_unstaged_one(tmp_path):
    """Within a stage the rows are Grain's first-fit packing, exactly as a run without seq_len stages packs them."""
    path = _corpus(tmp_path)
    staged = _cfg(path, [{"step": 6, "seq_len": 64, "batch_size": 4}], repeat=True)
    plain = _cfg(path, [], repeat=True)
    with build_train_iterator(staged, batch_size=8, process_index=0, process_count=1) as a, \
            build_train_iterator(plain, batch_size=8, process_index=0, process_count=1) as b:
        for step in range(6):
            x, y = next(a), next(b)
            for key in y:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"step {step} {key}")


def test_resume_inside_either_stage_gives_the_batches_of_an_uninterrupted_stream(tmp_path):
    path = _corpus(tmp_path)
    cfg = _cfg(path, [{"step": 4, "seq_len": 64, "batch_size": 4}], repeat=True)
    with build_train_iterator(cfg, batch_size=8, process_index=0, process_count=1) as it:
        states, straight = {}, []
        for step in range(10):
            states[step] = json.loads(json.dumps(it.get_state()))  # through JSON, as a checkpoint holds it
            straight.append(next(it))
    for at in (2, 4, 6):  # before the boundary, at it, after it
        with build_train_iterator(cfg, batch_size=8, process_index=0, process_count=1) as it:
            it.set_state(states[at])
            for step in range(at, 10):
                got = next(it)
                for key in straight[step]:
                    np.testing.assert_array_equal(got[key], straight[step][key], err_msg=f"resumed at {at}, step {step}")


def test_min_doc_tokens_trains_only_the_long_documents(tmp_path):
    path = _corpus(tmp_path, n=80)
    cfg = _cfg(path, [], source={"min_doc_tokens": 60})
    with build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1) as it:
        batches = _drain(it)
    expected = _document_pairs(cfg, path, min_tokens=60)
    assert 0 < sum(expected.values()) < sum(_document_pairs(cfg, path).values())  # the filter bites, not everything
    assert _trained_pairs(batches) == expected


def test_min_doc_tokens_above_every_document_stops_instead_of_spinning(tmp_path):
    path = _corpus(tmp_path, n=40, max_words=10)
    cfg = _cfg(path, [], source={"min_doc_tokens": 10_000}, repeat=True, max_documents_without_tokens=30)
    with build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1) as it:
        with pytest.raises(UserError, match="shorter than min_doc_tokens=10000"):
            next(it)


def test_a_seq_len_stage_without_batch_size_asks_for_the_choice_with_both_numbers(tmp_path):
    cfg = _cfg(_corpus(tmp_path, n=5), [{"step": 3, "seq_len": 128}])
    with pytest.raises(ConfigError, match=r"batch_size: 2 keeps the 256 tokens per step .* batch_size: 8 keeps the rows"):
        resolve_shapes(cfg, batch_size=8, seq_len=32, stage_starts=[3])


def test_a_context_axis_that_does_not_divide_a_stage_seq_len_names_the_stage_and_the_fix(tmp_path):
    cfg = _cfg(_corpus(tmp_path, n=5), [{"step": 3, "seq_len": 100, "batch_size": 2}])
    check_context_split(cfg, 2)  # data.seq_len 32 splits into 4 chunks: fine
    with pytest.raises(UserError, match=r"does not divide data.stages\[0\].seq_len=100.*multiple of 8 \(e.g. 104\)"):
        check_context_split(cfg, 4)


def test_train_check_shows_each_stage_positions_and_rope_and_warns_past_the_trained_length(tmp_path, capsys):
    from train_helpers import make_corpora, tiny_overrides

    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.setup import set_up

    overrides = tiny_overrides(tmp_path / "run", make_corpora(tmp_path / "data"), steps=8) + [
        "model.max_position_embeddings=48", "data.stages=[{step: 4, seq_len: 64, batch_size: 8}]"]
    setup = set_up(load_train_config(None, overrides), check=True)
    text = setup.describe()
    setup.close()
    assert "stage        steps 0..3: 8 rows x 32 tokens, positions 0..31, 1,024 row positions; rope theta" in text
    assert ("stage        steps 4..7: 8 rows x 64 tokens, positions 0..63 (past the RoPE's 48 trained positions), "
            "2,048 row positions; rope theta") in text
    warning = capsys.readouterr().out
    assert "data.stages[0].seq_len trains rows of 64 tokens" in warning and "was trained for 48 positions" in warning


def test_plan_budget_shows_each_stage_seq_len_positions_and_rope(tmp_path):
    from train_helpers import make_corpora, tiny_overrides

    from jaxcpt.plan.budget import format_plan, plan_budget
    from jaxcpt.train.config import load_train_config

    overrides = tiny_overrides(tmp_path / "run", make_corpora(tmp_path / "data"), steps=10) + [
        "data.stages=[{step: 6, seq_len: 64, batch_size: 4}]", "model.rope.theta=50000"]
    plan = plan_budget(load_train_config(None, overrides), sample_documents=50)
    assert [(s["first"], s["last"], s["seq_len"], s["rows"], s["row_positions"]) for s in plan.stages] == [
        (0, 5, 32, 8, 6 * 8 * 32), (6, 9, 64, 4, 4 * 4 * 64)]
    assert all(s["rope"].startswith("theta 50000, no scaling") for s in plan.stages)
    assert plan.tokens[:6].sum(axis=1).max() <= 8 * 32 and plan.tokens[6:].sum(axis=1).max() <= 4 * 64
    text = format_plan(plan)
    assert "2 row shapes (data.stages)" in text and "0..63" in text and "theta 50000" in text


# -- through the trainer: a run across the boundary, interrupted before and after it ------------------------
def _params(run_dir, step):
    from test_train_resume import _flat

    from jaxcpt.checkpoint import read_meta, restore_params
    from jaxcpt.config import from_dict
    from jaxcpt.model.config import ModelConfig
    from jaxcpt.model.persist import abstract_params
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.sharding.rules import make_rules

    directory = os.path.join(run_dir, "checkpoints")
    cfg = from_dict(ModelConfig, read_meta(directory)["model_config"])
    params = restore_params(directory, abstract_params(cfg, build_mesh({"data": 8}), make_rules()))
    return {k: np.asarray(v) for k, v in _flat(params).items()}


@pytest.mark.slow
def test_resume_before_and_after_a_seq_len_boundary_matches_the_uninterrupted_run_bitwise(tmp_path):
    from train_helpers import make_corpora, tiny_overrides, train_losses

    from jaxcpt.report.forgetting import format_table
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    corpora = make_corpora(tmp_path / "data")

    def overrides(run_dir):
        return tiny_overrides(run_dir, corpora, steps=8) + [
            "data.stages=[{step: 4, seq_len: 64, batch_size: 8}]", "checkpoint.every_steps=3",
            "checkpoint.keep_last=5", "eval.position_buckets=[16, 40]", "eval.position_rows=4"]

    straight = tmp_path / "straight"
    train(load_train_config(None, overrides(straight)))
    expected = train_losses(straight)
    assert sorted(expected) == list(range(1, 9))
    evals = [json.loads(line) for line in open(straight / "metrics.jsonl") if '"kind": "eval"' in line]
    assert [e["step"] for e in evals] == [0, 8] and all(set(e["positions"]["general"]) == {"0-16", "16-40", "40-64"}
                                                        for e in evals)
    assert "held-out loss by position" in format_table(straight)

    for resume_at in (3, 6):  # checkpoints before and after the boundary at step 4
        run = tmp_path / f"resumed_{resume_at}"
        shutil.copytree(straight, run)
        for step in os.listdir(run / "checkpoints"):
            if step.isdigit() and int(step) > resume_at:
                shutil.rmtree(run / "checkpoints" / step)
        train(load_train_config(None, overrides(run)))
        got = train_losses(run)
        assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)], resume_at  # bitwise
        a, b = _params(straight, 8), _params(run, 8)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), (resume_at, key)


@pytest.mark.slow
def test_repacking_and_resume_across_the_boundary_hold_with_grain_worker_processes(tmp_path):
    """Each Grain worker builds every 2nd batch and repacks its own share of the documents at the boundary."""
    path = _corpus(tmp_path)
    cfg = _cfg(path, [{"step": 5, "seq_len": 64, "batch_size": 4}], num_workers=2)
    with build_train_iterator(cfg, batch_size=8, process_index=0, process_count=1) as it:
        batches = _drain(it)
    assert [b["inputs"].shape for b in batches[4:6]] == [(8, 32), (4, 64)]
    assert _trained_pairs(batches) == _document_pairs(cfg, path)
    cfg = _cfg(path, [{"step": 5, "seq_len": 64, "batch_size": 4}], num_workers=2, repeat=True)
    with build_train_iterator(cfg, batch_size=8, process_index=0, process_count=1) as it:
        for _ in range(7):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        straight = [next(it) for _ in range(3)]
    with build_train_iterator(cfg, batch_size=8, process_index=0, process_count=1) as it:
        it.set_state(state)
        for a in straight:
            b = next(it)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_a_stage_batch_the_mesh_cannot_split_names_the_stage(tmp_path):
    from jaxcpt.data.stage_shapes import check_stage_batches
    from jaxcpt.sharding.layout import check_batch_split
    from jaxcpt.sharding.mesh import build_mesh
    from jaxcpt.sharding.rules import make_rules

    cfg = _cfg(_corpus(tmp_path, n=5), [{"step": 3, "seq_len": 64, "batch_size": 4}])
    shapes = resolve_shapes(cfg, batch_size=8, seq_len=32, stage_starts=[3])
    mesh, rules = build_mesh({"data": 8}), make_rules()
    with pytest.raises(UserError, match=r"the data stage starting at step 3 \(batch_size 4\): .*micro-batches of 4 rows"):
        check_stage_batches(shapes, lambda rows: check_batch_split(rows, 1, mesh, rules))

"""``jaxcpt plan budget``: token counts per source, draws as the real mixer makes them, repeat warnings."""

import glob
import json
import os

import numpy as np
import pytest
import yaml
from test_data_fixtures import make_texts, random_token_docs, sp_model, write_jsonl, write_token_shards

from jaxcpt.cli import main
from jaxcpt.plan.budget import plan_budget
from jaxcpt.plan.tokens import count_source
from jaxcpt.train.config import load_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(path, sources, *, steps=100, batch=8, seq_len=64, tokenizer="", stages=(), packing="first_fit",
                 schedule=None):
    config = {
        "data": {"tokenizer": tokenizer, "seq_len": seq_len, "packing": packing, "sources": sources,
                 "stages": list(stages), "shuffle_buffer": 16},
        "optim": {"schedule": schedule or {"kind": "warmup_cosine", "peak_lr": 1e-3, "warmup_steps": 5}},
        "train": {"steps": steps, "batch_size": batch},
    }
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.parametrize("config", sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))),
                         ids=lambda p: os.path.basename(p))
def test_budget_runs_on_every_shipped_config_without_its_data(config, tmp_path, capsys):
    out = tmp_path / "budget.png"
    assert main(["plan", "budget", "--config", config, "--out", str(out), "--json", str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    plan = json.loads((tmp_path / "b.json").read_text())
    cfg = load_train_config(config)
    assert [s["name"] for s in plan["sources"]] == [s.name for s in cfg.data.sources]
    unknown = 0
    for source, src in zip(plan["sources"], cfg.data.sources):
        if not glob.glob(src.paths[0]):  # the data of these configs lives on the training machines
            unknown += 1
            assert source["tokens_per_epoch"] is None and source["epochs"] is None
            assert f"'{source['name']}': size unknown" in text
        assert source["drawn"] > 0  # the planned draws are shown even when the size is unknown
    total = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    drawn = sum(s["drawn"] for s in plan["sources"])
    if unknown == len(cfg.data.sources):  # unknown sizes: full rows assumed, so every position is drawn
        assert drawn == pytest.approx(total, rel=1e-6)
    else:
        assert 0.5 * total < drawn <= total
    assert out.stat().st_size > 10_000


def test_budget_warns_when_a_small_source_passes_four_epochs(tmp_path, capsys):
    general = write_jsonl(str(tmp_path / "general.jsonl"), make_texts(2000, seed=1))
    domain = write_jsonl(str(tmp_path / "domain.jsonl"), make_texts(40, seed=2, tag="dom"))
    config = write_config(tmp_path / "c.yaml", [
        {"name": "domain", "paths": [domain], "weight": 0.5},
        {"name": "general", "paths": [general], "weight": 0.5}], steps=200, tokenizer=sp_model())
    assert main(["plan", "budget", "--config", config, "--out", str(tmp_path / "b.png"),
                 "--json", str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    plan = {s["name"]: s for s in json.loads((tmp_path / "b.json").read_text())["sources"]}
    assert plan["domain"]["epochs"] > 4
    assert 0 < plan["domain"]["repeat_step"] < plan["domain"]["four_epoch_step"] < 200
    assert "WARNING: source 'domain' is planned for" in text and "Muennighoff" in text
    assert plan["general"]["epochs"] < 4 and "source 'general'" not in text.split("WARNING")[-1]


def test_budget_warns_that_a_read_once_source_ends_the_run(tmp_path, capsys):
    domain = write_jsonl(str(tmp_path / "domain.jsonl"), make_texts(40, seed=2))
    config = write_config(tmp_path / "c.yaml", [{"name": "domain", "paths": [domain], "repeat": False}],
                          steps=100, tokenizer=sp_model())
    assert main(["plan", "budget", "--config", config, "--out", str(tmp_path / "b.png")]) == 0
    assert "has repeat: false and runs out at step" in capsys.readouterr().out


def test_pretokenized_source_is_counted_exactly_with_its_held_out_split(tmp_path):
    docs = random_token_docs(40, seed=3)
    shards = write_token_shards(str(tmp_path / "tok"), docs, docs_per_shard=15)
    cfg = load_train_config(write_config(tmp_path / "c.yaml", [
        {"name": "domain", "paths": [shards], "eval_documents": 5}]))
    count = count_source(cfg.data.sources[0], cfg.data, lambda: None, seq_len=64)
    # BOS + document + EOS, as next-token pairs: len + 1 positions per document; the first 5 held out
    assert count.exact and count.positions == sum(len(d) + 1 for d in docs[5:])
    assert count.documents == 35


def test_text_size_estimate_from_a_sample_is_within_3_percent(tmp_path):
    import sentencepiece as spm

    texts = make_texts(1500, seed=4, max_words=120)
    paths = [write_jsonl(str(tmp_path / "a.jsonl.gz"), texts[:700]), write_jsonl(str(tmp_path / "b.jsonl"), texts[700:])]
    cfg = load_train_config(write_config(tmp_path / "c.yaml", [{"name": "d", "paths": paths}], tokenizer=sp_model()))
    from jaxcpt.data.tokenize import load_tokenizer

    count = count_source(cfg.data.sources[0], cfg.data, lambda: load_tokenizer(sp_model()), seq_len=64,
                         sample_documents=200)
    exact = sum(len(ids) + 1 for ids in spm.SentencePieceProcessor(model_file=sp_model()).encode(texts))
    assert not count.exact and count.how.startswith("estimated")
    assert count.positions == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("packing, rel", [("concat_split", 0.01), ("first_fit", 0.05)])
def test_planned_draws_match_the_real_mixer(tmp_path, packing, rel):
    from jaxcpt.data.pipeline import build_train_iterator
    from jaxcpt.optim.schedules import build_schedule

    a = write_token_shards(str(tmp_path / "a"), random_token_docs(300, seed=5, max_len=60))
    b = write_token_shards(str(tmp_path / "b"), random_token_docs(300, seed=6, min_len=20, max_len=200))
    steps, batch, seq_len = 30, 8, 64
    stages = [{"step": 10, "weights": {"a": 0.8, "b": 0.2}},
              {"lr_below": 0.5, "ramp_steps": 6, "weights": {"a": 0.1, "b": 0.9}}]
    cfg = load_train_config(write_config(tmp_path / "c.yaml", [
        {"name": "a", "paths": [a], "weight": 0.3}, {"name": "b", "paths": [b], "weight": 0.7}],
        steps=steps, batch=batch, seq_len=seq_len, stages=stages, packing=packing))
    plan = plan_budget(cfg)

    schedule = build_schedule(cfg.optim.schedule, steps)
    it = build_train_iterator(cfg.data, batch_size=batch, lr_schedule=schedule, total_steps=steps)
    assert plan.stage_starts == it.stage_steps
    real = np.zeros((steps, 2))  # [steps, sources] non-padding tokens per step
    for step in range(steps):
        rows = next(it)
        for i in range(2):
            real[step, i] = rows["loss_mask"][rows["source"] == i].sum()
    it.close()
    for i in range(2):
        assert plan.tokens[:, i].sum() == pytest.approx(real[:, i].sum(), rel=rel)
        # step by step the cumulative draws stay within two rows of the real mixer's
        assert np.abs(np.cumsum(plan.tokens[:, i]) - np.cumsum(real[:, i])).max() <= 2 * seq_len / (1 - rel)

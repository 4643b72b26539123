"""``jaxcpt plan sweep`` and ``plan fit``: the runs' configs, resuming, fitting, the written config.

Most tests give the sweep a stand-in trainer that writes a run directory as ``train`` does
(metrics.jsonl eval records, summary.json) with losses from a known law, so they run in
seconds; one slow test trains real tiny runs and kills the sweep midway.
"""

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_data_fixtures import sp_model
from train_helpers import make_corpora, run_cli, tiny_overrides

from jaxcpt.cli import main
from jaxcpt.config import apply_overrides
from jaxcpt.errors import UserError
from jaxcpt.plan.laws import dcpt_loss
from jaxcpt.plan.sweep import SweepSpec, collect, run_sweep
from jaxcpt.train.config import load_train_config


def write_config(path: Path, *, extra_source=False, stages=None, eval_documents=16) -> str:
    sources = [{"name": "domain", "paths": ["d.jsonl"], "weight": 0.75, "eval_documents": eval_documents},
               {"name": "general", "paths": ["g.jsonl"], "weight": 0.25, "eval_documents": eval_documents}]
    if extra_source:
        sources.append({"name": "code", "paths": ["c.jsonl"], "weight": 0.1})
    config = {"model": {"vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
                        "num_heads": 4, "num_kv_heads": 2},
              "data": {"tokenizer": sp_model(), "seq_len": 32, "sources": sources, **({"stages": stages} if stages else {})},
              "train": {"steps": 1000, "batch_size": 8}, "checkpoint": {"directory": "gs://bucket/ckpt"}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def cmr_losses(replay: float, steps: int) -> tuple[float, float]:
    """A CMR-form truth: general 3.7 + 0.6 R^4, domain 1.8 + 0.4 / R, R = 1 - replay (independent of steps)."""
    ratio = 1.0 - replay
    return 3.7 + 0.6 * ratio**4, 1.8 + 0.4 / ratio


def dcpt_losses(replay: float, steps: int) -> tuple[float, float]:
    """A D-CPT-form truth over tokens D = steps * 8 * 32 (one model size)."""
    d = steps * 8 * 32
    general = dcpt_loss(1.0, d, replay, E=3.5, A=0.0, alpha=0.0, B=30.0, beta=0.4, eta=0.6, C=0.1, gamma=0.8, eps=0.02)
    domain = dcpt_loss(1.0, d, 1 - replay, E=1.5, A=0.0, alpha=0.0, B=20.0, beta=0.35, eta=0.5, C=0.1, gamma=0.6,
                       eps=0.05)
    return float(general), float(domain)


class FakeTrainer:
    """Writes what ``train(cfg)`` leaves in a run directory, with losses from ``law``."""

    def __init__(self, law=cmr_losses):
        self.law = law
        self.calls: list[str] = []

    def __call__(self, cfg) -> dict:
        self.calls.append(Path(cfg.run_dir).name)
        weights = {s.name: s.weight for s in cfg.data.sources}
        replay = weights["general"] / (weights["general"] + weights["domain"])
        general, domain = self.law(replay, cfg.train.steps)
        run = Path(cfg.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        records = [{"kind": "eval", "step": 0, "sources": {"general": {"loss": 3.7}, "domain": {"loss": 3.0}}},
                   {"kind": "eval", "step": cfg.train.steps,
                    "sources": {"general": {"loss": general}, "domain": {"loss": domain}}}]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        summary = {"run_dir": str(run), "step": cfg.train.steps, "exports": [], "stopped_by_signal": False}
        (run / "summary.json").write_text(json.dumps(summary))
        return summary


def spec(config, ratios=(0.0, 0.1, 0.25, 0.5), steps=(100,), **kw) -> SweepSpec:
    return SweepSpec(config=config, overrides=kw.pop("overrides", []), ratios=list(ratios), steps=list(steps),
                     sizes=kw.pop("sizes", {"base": []}), **kw)


def test_sweep_writes_one_loadable_config_per_run_with_its_mixture(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", extra_source=True)
    manifest = run_sweep(spec(config, ratios=(0.0, 0.3, 0.6), steps=(10, 20),
                              sizes={"base": [], "wide": ["model.hidden_size=64"]}), tmp_path / "sweep", dry_run=True)
    assert sorted(manifest["runs"]) == sorted(f"{size}-s{s}-r{r:g}" for size in ("base", "wide") for s in (10, 20)
                                              for r in (0.0, 0.3, 0.6))
    notes = capsys.readouterr().out
    assert "source 'code' gets weight 0" in notes and "checkpoint.directory is cleared" in notes
    for name, run in manifest["runs"].items():
        cfg = load_train_config(run["config"])
        weights = {s.name: s.weight for s in cfg.data.sources}
        assert weights == {"domain": pytest.approx(1 - run["replay"]), "general": run["replay"], "code": 0.0}
        assert cfg.train.steps == run["steps"] and cfg.run_dir == str(tmp_path / "sweep" / "runs" / name)
        assert cfg.checkpoint.directory == "" and not cfg.export.final  # proxies keep local checkpoints, no export
        assert cfg.model.hidden_size == (64 if name.startswith("wide") else 32)
        assert run["params"] == cfg.model.num_params() and run["tokens"] == run["steps"] * 8 * 32


def test_sweep_skips_finished_runs_and_reruns_unfinished_ones(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    trainer = FakeTrainer()
    run_sweep(spec(config), tmp_path / "sweep", train_fn=trainer)
    assert trainer.calls == ["base-s100-r0", "base-s100-r0.1", "base-s100-r0.25", "base-s100-r0.5"]
    (tmp_path / "sweep" / "runs" / "base-s100-r0.25" / "summary.json").unlink()  # as if killed before the end
    trainer.calls.clear()
    run_sweep(spec(config, ratios=(0.0, 0.1, 0.25, 0.5, 0.75)), tmp_path / "sweep", train_fn=trainer)
    assert trainer.calls == ["base-s100-r0.25", "base-s100-r0.75"]
    assert capsys.readouterr().out.count("done, skipped") == 3
    observations, unfinished = collect(tmp_path / "sweep")
    assert len(observations) == 5 and not unfinished


def test_sweep_refuses_what_it_cannot_measure(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(UserError, match="--general NAME"):
        run_sweep(spec(config, general="replay"), tmp_path / "s1", dry_run=True)
    with pytest.raises(UserError, match=r"data.stages=\[\]"):
        run_sweep(spec(write_config(tmp_path / "st.yaml", stages=[[10, {"domain": 1.0}]])), tmp_path / "s2",
                  dry_run=True)
    with pytest.raises(UserError, match="eval_documents"):
        run_sweep(spec(write_config(tmp_path / "ne.yaml", eval_documents=0)), tmp_path / "s3", dry_run=True)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        run_sweep(spec(config, ratios=(0.0, 1.5)), tmp_path / "s4", dry_run=True)
    run_sweep(spec(config), tmp_path / "s5", dry_run=True)
    with pytest.raises(UserError, match="another setup"):
        run_sweep(spec(config, overrides=["optim.schedule.peak_lr=1e-3"]), tmp_path / "s5", dry_run=True)


def test_fit_recommends_the_ratio_and_writes_a_config_train_accepts(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run_sweep(spec(config, ratios=(0.0, 0.1, 0.2, 0.3, 0.5)), tmp_path / "sweep", train_fn=FakeTrainer())
    out_yaml = tmp_path / "recommended.yaml"
    assert main(["plan", "fit", str(tmp_path / "sweep"), "--law", "cmr", "--tolerance", "0.1", "--bootstrap", "20",
                 "--write-config", str(out_yaml)]) == 0
    text = capsys.readouterr().out
    assert "recommended replay ratio" in text and "EXTRAPOLATED" not in text
    result = json.loads((tmp_path / "sweep" / "fit_cmr.json").read_text())
    truth = 1 - (0.1 / 0.6) ** 0.25  # where 0.6 R^4 = 0.1: the smallest replay within 0.1 nats
    assert result["recommendation"]["replay"] == pytest.approx(truth, abs=0.002)
    coefficients = next(iter(result["coefficients"].values()))
    assert coefficients["general"]["s"] == pytest.approx(4.0, rel=1e-3)
    assert (tmp_path / "sweep" / "fit_cmr.png").stat().st_size > 10_000
    cfg = load_train_config(str(out_yaml))  # the chosen mixture is what trains
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert weights["general"] == pytest.approx(result["recommendation"]["replay"], abs=1e-4)
    assert weights["domain"] == pytest.approx(1 - weights["general"])
    assert cfg.train.steps == 1000  # the config's own budget, not the proxies'


def test_fit_marks_a_larger_budget_as_extrapolated(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run_sweep(spec(config, ratios=(0.0, 0.05, 0.1, 0.25, 0.5), steps=(100, 200, 400)), tmp_path / "sweep",
              train_fn=FakeTrainer(dcpt_losses))
    out_yaml = tmp_path / "long.yaml"
    assert main(["plan", "fit", str(tmp_path / "sweep"), "--law", "dcpt", "--tolerance", "3%", "--bootstrap", "0",
                 "--at-steps", "1600", "--write-config", str(out_yaml)]) == 0
    text = capsys.readouterr().out
    assert "EXTRAPOLATED beyond the sweep" in text
    rec = json.loads((tmp_path / "sweep" / "fit_dcpt.json").read_text())["recommendation"]
    assert rec["extrapolated"] and rec["tokens"] == 1600 * 8 * 32
    replay = np.linspace(0, 1, 1001)
    general, domain = zip(*(dcpt_losses(r, 1600) for r in replay))
    ok = np.array(general) - 3.7 <= 0.03 * 3.7
    truth = replay[ok][np.argmin(np.array(domain)[ok])]
    assert rec["replay"] == pytest.approx(truth, abs=0.02)
    assert load_train_config(str(out_yaml)).train.steps == 1600
    assert "(extrapolated)" in out_yaml.read_text().splitlines()[0]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


@pytest.mark.slow
def test_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    raw = apply_overrides({}, tiny_overrides(tmp_path / "unused", corpora, steps=40) + ["checkpoint.every_steps=4"])
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    sweep = tmp_path / "sweep"
    args = ["plan", "sweep", "--config", str(config), "--out", str(sweep), "--ratios", "0.1,0.25,0.5", "--steps", "40"]
    first, second = sweep / "runs" / "base-s40-r0.1", sweep / "runs" / "base-s40-r0.25"

    proc = run_cli(args)
    deadline = time.monotonic() + 600
    while not _checkpoint_steps(second):  # kill the sweep once its second run has a checkpoint
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    first_metrics = (first / "metrics.jsonl").read_bytes()

    proc = run_cli(args)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "base-s40-r0.1: done, skipped" in out
    assert "base-s40-r0.25: replay 0.25, 40 steps (resuming)" in out and "resuming from" in out
    assert (first / "metrics.jsonl").read_bytes() == first_metrics  # the finished run was not touched
    steps = [json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 41))  # resumed from the checkpoint: each step once, none lost
    observations, unfinished = collect(sweep)
    assert len(observations) == 3 and not unfinished

    proc = run_cli(["plan", "fit", str(sweep), "--law", "cmr", "--tolerance", "0.5", "--bootstrap", "10"])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "replay ratio" in out and (sweep / "fit_cmr.png").is_file()

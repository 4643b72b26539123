"""The built-in demo and the tiny config: the whole CPT idea, end to end, on a CPU."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxcpt.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_fast_mode_shows_learning_and_less_forgetting_with_replay(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli(["demo", "--fast", "--out", str(out)])
    output = proc.communicate(timeout=1200)[0]
    assert proc.returncode == 0, output[-5000:]
    from jaxcpt.report.forgetting import summarize

    no_replay, replay = summarize(out / "cpt_no_replay"), summarize(out / "cpt_replay")
    assert no_replay["domain"]["change"] < 0 and replay["domain"]["change"] < 0  # both learn the domain
    assert no_replay["general"]["change"] > 0  # continuing on code alone forgets prose
    assert replay["general"]["change"] < no_replay["general"]["change"]  # replay forgets less
    result = json.loads((out / "demo_result.json").read_text())
    assert result["forgetting_removed"]["general"] > 0
    assert result["generated"].startswith("def __init__(self")
    assert (out / "forgetting.png").stat().st_size > 10_000
    assert "forgetting removed by B" in output and "transformers loaded" in output
    assert "general (ema)" in output and "merge sweep (linear" in output and "<- recommended" in output


def test_tiny_config_trains_and_writes_everything_a_run_should(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--data-only", "--fast"]) == 0  # runs/demo/data, as the config's comment says
    shutil.copy(ROOT / "configs" / "tiny.yaml", tmp_path / "tiny.yaml")
    proc = run_cli(["train", "--config", "tiny.yaml"], cwd=tmp_path)
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, output[-5000:]
    run = tmp_path / "runs" / "tiny"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 41))
    assert {r["step"] for r in records if r["kind"] == "eval"} == {0, 20, 40}
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["20", "40"]
    assert "forgetting report" in (run / "report.txt").read_text() and (run / "eval_loss.png").is_file()
    assert main(["report", str(run)]) == 0 and main(["report", str(run), str(run)]) == 0
    assert (run / "compare_eval_loss.png").is_file()
    assert main(["report", str(tmp_path / "nope")]) == 2
    export = run / "hf" / "step_40"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("def f(x):", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == 1024

"""MoE continual pretraining end to end: routing metrics in metrics.jsonl, per source at evaluation, and the report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from train_helpers import make_corpora, tiny_overrides

from jaxcpt.train.routing import expert_load, routing_summary

MOE = ["model.family=qwen3_moe", "model.qk_norm=true", "model.moe.num_experts=4", "model.moe.top_k=2",
       "model.moe.expert_intermediate_size=32", "model.moe.router_aux_loss_coef=0.01"]


def test_routing_summary_of_known_counts():
    counts = np.array([[2.0, 2.0, 2.0, 2.0], [8.0, 0.0, 0.0, 0.0]])  # balanced; all on one expert
    summary = routing_summary(counts)
    np.testing.assert_allclose(summary["load"], [[1, 1, 1, 1], [4, 0, 0, 0]])
    assert summary["layers"]["layer_0"]["entropy"] == pytest.approx(np.log(4))
    assert summary["layers"]["layer_1"] == {"entropy": 0.0, "max_load": 4.0, "min_load": 0.0}
    np.testing.assert_array_equal(expert_load(np.zeros((1, 3))), np.zeros((1, 3)))  # no tokens: no division by 0


@pytest.mark.slow
def test_moe_cpt_run_with_replay_records_and_reports_routing_per_source(tmp_path):
    corpora = make_corpora(tmp_path / "data")
    args = [a for a in tiny_overrides(tmp_path / "run", corpora, steps=6, mesh="{expert: 2, data: 4}")
            if not a.startswith(("eval.every", "train.log_every"))]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-m", "jaxcpt.cli", "train", *args, "eval.every=3", "train.log_every=3",
                             *MOE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "active per token" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    assert "routing" in train[3] and "routing" not in train[2]  # every log_every steps
    assert np.asarray(train[3]["routing"]["load"]).shape == (2, 4)
    assert train[3]["routing"]["aux_loss"] >= 1.0  # X * sum f P >= 1 (its minimum is perfect balance)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for source in ("general", "domain"):
        load = np.asarray(evals[-1]["sources"][source]["routing"]["load"])
        np.testing.assert_allclose(load.mean(-1), 1.0, rtol=1e-4)  # load is per layer over its mean
    report = (tmp_path / "run" / "report.txt").read_text()
    assert "expert routing" in report and "domain - general at step 6" in report
    assert (tmp_path / "run" / "routing_shift.png").stat().st_size > 0

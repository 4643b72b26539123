"""jaxcpt merge --sweep: the coefficient list, the tolerance rule, and a sweep over a tiny run's held-out data."""

import json
import os

import numpy as np
import pytest
import torch
from hf_models import make_hf_model
from merge_helpers import read_tensors, rewrite_tensors
from train_helpers import make_corpora, tiny_overrides
from transformers import AutoModelForCausalLM, LlamaConfig

from jaxcpt.cli import main
from jaxcpt.errors import UserError
from jaxcpt.merge.inputs import open_input
from jaxcpt.merge.sweep import build_rows, check_roles, parse_coefficients, recommend, run_sweep


def test_sweep_lists_accept_an_ellipsis_and_always_include_zero():
    assert parse_coefficients("0,0.1,...,1") == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert parse_coefficients("1,0.5") == [0.0, 0.5, 1.0]
    for bad in ("0,0.3,...,1", "0,...,1", "a,b", "0,1.5"):
        with pytest.raises(UserError, match="--sweep"):
            parse_coefficients(bad)


def test_the_recommendation_keeps_the_most_domain_gain_within_the_tolerance():
    # general rises 0, 0.01, 0.05, 0.08, 0.3; domain falls by 0, 0.2, 0.5, 0.6, 0.9 (t = 0 .. 1)
    losses = {0.0: (3.0, 2.0), 0.25: (3.01, 1.8), 0.5: (3.05, 1.5), 0.75: (3.08, 1.4), 1.0: (3.3, 1.1)}
    results = {t: {"general": g, "domain": d, "other": 7.0} for t, (g, d) in losses.items()}
    rows = build_rows(results, "general", "domain", tolerance=0.05)
    assert [r["within_tolerance"] for r in rows] == [True, True, True, False, False]  # the bound is inclusive
    assert recommend(rows, 0.05)["coefficient"] == 0.5
    assert recommend(build_rows(results, "general", "domain", tolerance=0.1), 0.1)["coefficient"] == 0.75
    assert recommend(build_rows(results, "general", "domain", tolerance=0.0), 0.0)["coefficient"] == 0.0
    flat = {t: {"general": 3.0, "domain": 2.0} for t in (0.0, 0.5, 1.0)}  # no gain anywhere: stay at the base
    assert recommend(build_rows(flat, "general", "domain", 0.05), 0.05)["coefficient"] == 0.0


def test_source_roles_must_name_held_out_sources():
    with pytest.raises(UserError, match=r"held-out sources are web, code.*'general' \(--general\).*--domain"):
        check_roles(["web", "code"], "general", "domain")
    check_roles(["web", "code"], "web", "code")


class NormMeanLosses:
    """A stand-in evaluator with known answers: t is read back from the merged model itself.

    The base's final-norm weight is all 0 and the model's all 1, so the merged one is t
    everywhere (linear: exactly; SLERP: a zero tensor falls back to linear). Losses are
    then general = 1 + t^2 and domain = 2 - t.
    """

    sources = ["replayed", "new"]

    def __call__(self, directory):
        t = float(read_tensors(directory)["model.norm.weight"].astype(np.float64).mean())
        return {"replayed": {"loss": 1.0 + t * t, "tokens": 10}, "new": {"loss": 2.0 - t, "tokens": 10}}


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_the_sweep_picks_the_known_coefficient_in_a_constructed_case(tmp_path, method):
    for name, seed, norm in (("base", 0, 0.0), ("model", 1, 1.0)):
        make_hf_model("llama_gqa", tmp_path / name, seed=seed)
        rewrite_tensors(tmp_path / name, lambda n, v, norm=norm: np.full_like(v, norm) if n == "model.norm.weight" else v)
    # general rise t^2 <= 0.3 allows t <= 0.547; of 0, 0.1, ..., 1 the most domain gain (t) is at 0.5
    result = run_sweep(open_input(tmp_path / "base"), open_input(tmp_path / "model"), method,
                       parse_coefficients("0,0.1,...,1"), NormMeanLosses(), tmp_path / "sweep",
                       general="replayed", domain="new", tolerance=0.3, log=lambda _: None)
    assert result["recommended"]["coefficient"] == 0.5
    assert result["recommended"]["general_rise"] == pytest.approx(0.25, abs=1e-6)
    assert result["recommended"]["kept_share"] == pytest.approx(0.5, abs=1e-6)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text()) == result
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0
    assert sorted(os.listdir(tmp_path / "sweep")) == ["sweep.json", "sweep.png"]  # merged models were temporary


@pytest.mark.slow
def test_a_sweep_over_a_tiny_run_reproduces_the_runs_own_evals_at_0_and_1(tmp_path, capsys):
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(hf).save_pretrained(tmp_path / "hf")
    assert main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "base")]) == 0
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_overrides(run_dir, make_corpora(tmp_path / "data"), steps=8)
                 if not o.startswith("model.") or o.startswith("model.dtype")]
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    train(load_train_config(None, [*overrides, "init.source=checkpoint", f"init.path={tmp_path / 'base'}"]))
    capsys.readouterr()
    assert main(["merge", "--run", str(run_dir), "--sweep", "0,0.5,1", "--tolerance", "1e9", "--keep"]) == 0
    out = capsys.readouterr().out
    assert "recommended: t=" in out and "the run's own eval (step 0 and step 8)" in out
    result = json.loads((run_dir / "merge_sweep_linear" / "sweep.json").read_text())
    rows = {r["coefficient"]: r for r in result["rows"]}
    assert sorted(rows) == [0.0, 0.5, 1.0] and result["sources"] == ["general", "domain"]
    for source, own in result["run_eval"].items():
        assert rows[0.0]["loss"][source] == pytest.approx(own["step0"], rel=1e-6)
        assert rows[1.0]["loss"][source] == pytest.approx(own["last"], rel=1e-6)
    assert result["recommended"]["coefficient"] == max(rows.values(), key=lambda r: r["domain_gain"])["coefficient"]
    assert all(os.path.isfile(os.path.join(r["merged_dir"], "config.json")) for r in rows.values())

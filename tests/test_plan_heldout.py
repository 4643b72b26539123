"""The planner's honesty: exactly determined fits say so, leave-one-out error, --law auto, plan check, --ratios auto.

Sweeps are synthetic (tests/test_plan_sweep.py's FakeTrainer writes what a run leaves, with
losses from a known law), so the arithmetic can be checked against the truth.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxcpt.cli import main
from jaxcpt.errors import UserError
from jaxcpt.plan.fitted import fit_law
from jaxcpt.plan.heldout import determination, leave_one_out
from jaxcpt.plan.laws import FitError, Observation, fit_power_law, power_law
from jaxcpt.plan.sweep import collect, run_sweep
from jaxcpt.train.config import config_as_yaml_dict, load_train_config
from test_plan_sweep import FakeTrainer, spec, write_config


class RunWritingTrainer(FakeTrainer):
    """FakeTrainer that also leaves RUN/config.yaml, as jaxcpt train does (plan check reads it)."""

    def __call__(self, cfg) -> dict:
        summary = super().__call__(cfg)
        (Path(cfg.run_dir) / "config.yaml").write_text(yaml.safe_dump(config_as_yaml_dict(cfg), sort_keys=False))
        return summary


def bent_losses(replay: float, steps: int) -> tuple[float, float]:
    """Not of any law's form: the general loss falls steeply to replay 0.2, then slowly (a kink)."""
    general = 3.7 + 1.5 * max(0.2 - replay, 0.0) + 0.1 * (1 - replay)
    return general, 1.8 + 0.5 * replay


def _obs(replay, general, domain, tokens=1e6) -> Observation:
    return Observation(run=f"r{replay:g}-D{tokens:g}", replay=replay, tokens=tokens, params=1e6, general_loss=general,
                       domain_loss=domain, base_general_loss=3.7, base_domain_loss=3.0)


def test_exactly_determined_fit_prints_no_interval_and_says_why(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run_sweep(spec(config, ratios=(0.0, 0.1, 0.25, 0.5)), tmp_path / "sweep", train_fn=FakeTrainer())
    assert main(["plan", "fit", str(tmp_path / "sweep"), "--law", "cmr", "--tolerance", "0.1",
                 "--bootstrap", "50"]) == 0
    text = capsys.readouterr().out
    assert "EXACTLY DETERMINED: 3 runs for 3 parameters" in text
    assert "Sweep 1 more interior ratio(s) (e.g. 0.36" in text  # where the tolerance binds (truth 0.361)
    assert "bootstrap 90% interval" not in text and "NO uncertainty can be given" in text
    result = json.loads((tmp_path / "sweep" / "fit_cmr.json").read_text())
    assert result["bootstrap"] is None and "exactly determined" in result["bootstrap_skipped"]
    assert result["uncertainty"] == {"general_rise": None, "domain_loss": None}
    assert result["leave_one_out"]["failed"] == 3  # no run can be predicted by a fit of the other two


def test_leave_one_out_refits_without_each_interior_run_and_predicts_it():
    truth_general = {"alpha": 0.6, "s": 4.0, "beta": 3.7}
    rng = np.random.default_rng(0)
    ratios = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5]
    obs = [_obs(r, float(power_law(1 - r, **truth_general) + rng.normal(0, 0.01)), 1.8 + 0.4 / (1 - r))
           for r in ratios]
    loo = leave_one_out("cmr", obs, 1e6, 1e6)
    assert [row["replay"] for row in loo.rows] == ratios[1:] and loo.failed == 0  # interior runs only
    held = obs[3]  # replay 0.2: refit on the other interior runs by hand
    rest = [o for o in obs[1:] if o is not held]
    by_hand = fit_power_law([1 - o.replay for o in rest], [o.general_loss for o in rest])
    predicted_rise = float(power_law(1 - held.replay, **by_hand)) - held.base_general_loss
    row = next(r for r in loo.rows if r["replay"] == 0.2)
    assert row["general_error"] == pytest.approx(predicted_rise - (held.general_loss - held.base_general_loss), abs=1e-9)
    assert loo.largest("general_error") == max(abs(r["general_error"]) for r in loo.rows)
    assert 0.0 < loo.largest("general_error") < 0.1  # noise 0.01: small but not zero
    assert not determination(fit_law("cmr", obs), obs, 1e6, 1e6).exact


def test_law_auto_chooses_the_law_with_the_smallest_held_out_error_and_shows_all(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    run_sweep(spec(config, ratios=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)), tmp_path / "sweep",
              train_fn=FakeTrainer(bent_losses))
    assert main(["plan", "fit", str(tmp_path / "sweep"), "--law", "auto", "--tolerance", "0.1",
                 "--bootstrap", "0"]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep" / "fit_auto.json").read_text())
    errors = {law["law"]: law["leave_one_out"]["general_rise_max_abs"] for law in result["laws"]}
    assert set(errors) == {"cmr", "dcpt", "interp"} and result["law"] == min(errors, key=errors.get)
    assert result["law"] == "interp"  # the kink is no power law: the baseline predicts held-out runs best
    for name in ("CMR", "D-CPT", "monotone interpolation"):
        assert name in text
    assert "--law auto: monotone interpolation predicts held-out runs best" in text
    assert (tmp_path / "sweep" / "fit_auto.png").stat().st_size > 10_000


def test_plan_check_compares_with_the_prediction_and_the_next_fit_uses_the_run(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    trainer = RunWritingTrainer()
    sweep = tmp_path / "sweep"
    run_sweep(spec(config, ratios=(0.0, 0.05, 0.1, 0.25, 0.5)), sweep, train_fn=trainer)
    planned = tmp_path / "planned.yaml"
    assert main(["plan", "fit", str(sweep), "--law", "cmr", "--tolerance", "0.1", "--bootstrap", "0",
                 "--at-steps", "100", "--write-config", str(planned)]) == 0
    header = planned.read_text().splitlines()[1:3]
    assert "planned from:" in header[0] and "fit_cmr.json" in header[0] and "predicted: general rise +0.0994 +/- 0.0000" in header[1]
    runs_before = len(collect(sweep)[0])
    trainer(load_train_config(str(planned), [f"run_dir={tmp_path / 'planned_run'}"]))
    capsys.readouterr()
    assert main(["plan", "check", str(sweep), str(tmp_path / "planned_run")]) == 0
    text = capsys.readouterr().out
    assert "general rise: predicted +0.0994, measured +0.0994" in text  # the truth is of CMR's form, noise-free
    assert "the reported uncertainty (+/- " in text and "added to" in text
    observations, _ = collect(sweep)
    assert len(observations) == runs_before + 1
    replay = json.loads(Path(sweep / "predictions.json").read_text())[-1]["replay"]
    assert main(["plan", "fit", str(sweep), "--law", "cmr", "--tolerance", "0.1", "--bootstrap", "0"]) == 0
    fitted_runs = [r["run"] for r in json.loads((sweep / "fit_cmr.json").read_text())["runs"]]
    assert f"checked-s100-r{replay:g}" in fitted_runs


def test_plan_check_refuses_a_run_not_trained_from_the_sweep_config(tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml")
    trainer = RunWritingTrainer()
    run_sweep(spec(config, ratios=(0.0, 0.1, 0.25, 0.5)), tmp_path / "sweep", train_fn=trainer)
    trainer(load_train_config(config, [f"run_dir={tmp_path / 'other'}", "model.hidden_size=64", "train.steps=100"]))
    capsys.readouterr()
    assert main(["plan", "check", str(tmp_path / "sweep"), str(tmp_path / "other")]) != 0
    error = capsys.readouterr().err
    assert "was not trained from the sweep's config" in error
    assert "model.hidden_size is 32 in the sweep's config and 64 in the run" in error
    assert "checked" not in json.loads((tmp_path / "sweep" / "sweep.json").read_text())["runs"]


def test_fewer_than_two_interior_ratios_and_mixed_budgets_are_refused_with_the_fix(tmp_path):
    config = write_config(tmp_path / "c.yaml")
    with pytest.raises(UserError, match=r"--ratios has 1 ratio\(s\) strictly between 0 and 1.*--ratios auto"):
        run_sweep(spec(config, ratios=(0.0, 0.5, 1.0)), tmp_path / "s", dry_run=True)
    obs = [_obs(r, 3.7 + 0.6 * (1 - r) ** 4, 1.8 + 0.4 / (1 - r)) for r in (0.1, 0.2, 0.3, 0.5)]
    obs.append(_obs(0.3, 3.8, 1.9, tokens=4e6))  # one run at a longer budget (plan check of an --at-steps config)
    fitted = fit_law("cmr", obs)  # the budget it can fit is fitted; the lone run is left out, not a crash
    assert "r0.3-D4e+06" in fitted.left_out
    with pytest.raises(FitError, match="mixes budgets, and the CMR law has no budget term.*--law dcpt"):
        fitted.predict([0.3], 4e6, 1e6)


def test_ratios_auto_spends_the_second_pass_where_the_tolerance_binds(tmp_path, monkeypatch, capsys):
    import jaxcpt.train.loop

    monkeypatch.setattr(jaxcpt.train.loop, "train", FakeTrainer())
    config = write_config(tmp_path / "c.yaml")
    assert main(["plan", "sweep", "--config", config, "--ratios", "auto", "--tolerance", "0.1", "--steps", "100",
                 "--out", str(tmp_path / "sweep")]) == 0
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    ratios = sorted(run["replay"] for run in manifest["runs"].values())
    added = manifest["auto_ratios"]["added"]
    assert len(ratios) == 7 and set(added) <= set(ratios) and len(added) == 3
    truth = 1 - (0.1 / 0.6) ** 0.25  # 0.361: where the CMR-form truth's rise meets 0.1
    assert min(abs(r - truth) for r in added) < 0.05 and all(0.25 < r < 0.5 for r in added)
    assert "coarse pass at 0, 0.1, 0.25, 0.5" in capsys.readouterr().out

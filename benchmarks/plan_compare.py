"""Every law on one finished sweep, and a run at each law's recommendation: shared by plan_demo.py and plan_realtext.py.

For each of CMR, D-CPT, the monotone interpolation and ``--law auto``: ``plan fit`` (with the
leave-one-out error and, where not degenerate, the bootstrap) and ``--write-config``; then the
written config of each distinct recommended ratio is trained exactly as written (only its run
directory chosen here), and its measured general-loss rise and domain loss are set against
each law's prediction and its leave-one-out uncertainty. Last, ``plan check`` of the auto law's
run on a copy of the sweep (so a rerun of the benchmark fits the same runs) and the refit with it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

LAWS = ("cmr", "dcpt", "interp", "auto")


def _finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    return summary.is_file() and json.loads(summary.read_text()).get("step") == steps


def _fit(sweep: Path, law: str, tolerance: str, plot: Path, bootstrap: int) -> dict:
    from jaxcpt.plan.report import run_fit

    return run_fit(argparse.Namespace(sweep_dir=str(sweep), law=law, tolerance=tolerance, at_steps=None, at_params=None,
                                      base_general_loss=None, bootstrap=bootstrap, seed=0, plot=str(plot),
                                      write_config=None))


def compare_laws(out: Path, *, tolerance: str, steps: int, plot: Path, title: str, bootstrap: int = 200) -> dict:
    from jaxcpt.errors import UserError
    from jaxcpt.plan.assess import AUTO_LAWS, assess, choose, plot_laws
    from jaxcpt.plan.check import check_run
    from jaxcpt.plan.laws import Recommendation, Tolerance
    from jaxcpt.plan.report import write_config
    from jaxcpt.plan.sweep import _observation, collect, load_manifest
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train

    sweep = out / "sweep"
    manifest = load_manifest(sweep)
    (sweep / "predictions.json").unlink(missing_ok=True)  # this invocation's predictions only
    timings, fits, planned = {}, {}, {}
    t0 = time.monotonic()
    errors = {}
    for law in LAWS:
        try:
            fits[law] = _fit(sweep, law, tolerance, out / f"fit_{law}.png", bootstrap)
        except UserError as e:  # e.g. D-CPT with fewer runs than parameters: reported, not fatal
            print(f"{law}: not fitted: {e}", flush=True)
            errors[law] = str(e)
            continue
        rec = fits[law]["recommendation"]
        if rec["replay"] is not None:
            planned[law] = out / f"planned_{law}.yaml"
            json_path = sweep / f"fit_{law}.json"
            write_config(manifest, Recommendation(**rec), planned[law],
                         source={"sweep": str(sweep.resolve()), "fit_json": str(json_path.resolve()), **fits[law]})
    timings["fits_s"] = time.monotonic() - t0

    # One run per distinct recommended ratio, of the written config as a user would train it.
    measured: dict[float, dict] = {}
    t0 = time.monotonic()
    for law, path in planned.items():
        replay = round(fits[law]["recommendation"]["replay"], 4)
        if replay in measured:
            continue
        run_dir = out / f"planned_r{replay:g}"
        if not _finished(run_dir, steps):
            if run_dir.exists():
                shutil.rmtree(run_dir)
            train(load_train_config(str(path), [f"run_dir={run_dir}"]))
        run = {"replay": replay, "tokens": 0, "params": 0}
        obs = _observation(run_dir.name, run, manifest["general"], manifest["domain"], run_dir)
        measured[replay] = {"run_dir": str(run_dir), "general_loss": obs.general_loss, "domain_loss": obs.domain_loss,
                            "general_rise": obs.general_loss - obs.base_general_loss}
    timings["planned_runs_s"] = time.monotonic() - t0

    rows = [{"law": law, "error": error} for law, error in errors.items()]
    for law in (law for law in LAWS if law in fits):
        fit, rec = fits[law], fits[law]["recommendation"]
        loo = fit["leave_one_out"] or {}
        row = {"law": law, "chosen": fit["law"], "recommended_replay": rec["replay"],
               "predicted_general_rise": rec["general_rise"], "predicted_domain_loss": rec["domain_loss"],
               "uncertainty": fit["uncertainty"], "exactly_determined": (fit["determination"] or {}).get("exact"),
               "loo_general_rise_max_abs": loo.get("general_rise_max_abs"),
               "loo_domain_loss_max_abs": loo.get("domain_loss_max_abs"), "loo_failed": loo.get("failed"),
               "bootstrap_replay_90": (fit["bootstrap"] or {}).get("replay") if (fit["bootstrap"] or {}).get("enough")
               else None, "bootstrap_skipped": fit["bootstrap_skipped"]}
        if rec["replay"] is not None and rec["general_rise"] is not None:
            m = measured[round(rec["replay"], 4)]
            err_g, err_d = m["general_rise"] - rec["general_rise"], m["domain_loss"] - rec["domain_loss"]
            unc = fit["uncertainty"]
            row.update(measured_general_rise=m["general_rise"], measured_domain_loss=m["domain_loss"],
                       error_general_rise=err_g, error_domain_loss=err_d,
                       within_uncertainty_general=None if unc["general_rise"] is None else abs(err_g) <= unc["general_rise"],
                       within_uncertainty_domain=None if unc["domain_loss"] is None else abs(err_d) <= unc["domain_loss"],
                       within_tolerance=m["general_rise"] <= rec["allowed_rise"])
        rows.append(row)

    # The comparison plot: every law, the runs at their recommendations as stars.
    observations, _ = collect(sweep)
    tol = Tolerance.parse(tolerance)
    rec0 = fits["auto"]["recommendation"]
    assessments = [assess(law, observations, tokens=rec0["tokens"], params=rec0["params"], tolerance=tol,
                          base_general=None, samples=0) for law in AUTO_LAWS]
    chosen, _ = choose(assessments)
    stars = {law: (round(fits[law]["recommendation"]["replay"], 4),
                   measured[round(fits[law]["recommendation"]["replay"], 4)]["general_loss"],
                   measured[round(fits[law]["recommendation"]["replay"], 4)]["domain_loss"])
             for law in AUTO_LAWS if law in planned}
    plot_laws(assessments, observations, chosen, fits["auto"]["base_general_loss"], plot, title=title, measured=stars)

    # plan check of the auto law's run, on a copy of the sweep; then the refit that uses it.
    checked = out / "sweep_checked"
    if checked.exists():
        shutil.rmtree(checked)
    checked.mkdir()
    for name in ("sweep.json", "predictions.json"):
        shutil.copy2(sweep / name, checked / name)
    check = None
    if "auto" in planned:
        check = check_run(checked, Path(measured[round(rec0["replay"], 4)]["run_dir"]), law=fits["auto"]["law"])
    refit = _fit(checked, "auto", tolerance, out / "fit_auto_after_check.png", bootstrap)

    header = ["law", "LOO rise err", "replay", "predicted rise", "measured rise", "error", "within", "domain pred/meas"]
    lines = []
    for r in rows:
        if r.get("error"):
            lines.append([r["law"], "-", "-", "not fitted", "-", "-", "-", "-"])
            continue
        unc = r["uncertainty"]["general_rise"]
        pred = "-" if r["predicted_general_rise"] is None else (
            f"{r['predicted_general_rise']:+.4f}" + ("" if unc is None else f" +/- {unc:.4f}"))
        lines.append([r["law"] + (f" ({r['chosen']})" if r["law"] == "auto" else ""),
                      "-" if r["loo_general_rise_max_abs"] is None else f"{r['loo_general_rise_max_abs']:.4f}",
                      "-" if r["recommended_replay"] is None else f"{r['recommended_replay']:.3f}", pred,
                      f"{r.get('measured_general_rise', float('nan')):+.4f}", f"{r.get('error_general_rise', float('nan')):+.4f}",
                      {True: "yes", False: "NO", None: "no interval"}[r.get("within_uncertainty_general")],
                      f"{r['predicted_domain_loss'] or float('nan'):.4f} / {r.get('measured_domain_loss', float('nan')):.4f}"])
    from jaxcpt.plan.text import format_table

    print("\n" + format_table(header, lines))
    return {"tolerance": tolerance, "laws": rows, "measured_runs": {str(k): v for k, v in measured.items()},
            "sweep": [{k: o[k] for k in ("run", "replay", "general_loss", "domain_loss", "base_general_loss",
                                          "base_domain_loss")} for o in fits["auto"]["runs"]],
            "fits": {law: {k: fits[law][k] for k in ("law", "chosen_because", "coefficients", "recommendation",
                                                     "leave_one_out", "uncertainty", "determination", "bootstrap",
                                                     "bootstrap_skipped", "left_out_of_fit")} for law in fits},
            "not_fitted": errors,
            "plan_check": check, "after_check": {"law": refit["law"], "recommendation": refit["recommendation"],
                                                 "uncertainty": refit["uncertainty"], "runs": len(refit["runs"])},
            "timings_s": timings, "plot": str(plot)}

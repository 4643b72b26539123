"""The planner end to end on the built-in demo data: sweep, fit, train at the recommended ratio, compare.

    python benchmarks/plan_demo.py [--law cmr] [--tolerance 0.15] [--ratios 0,0.1,0.2,0.35,0.5] [--steps 60]

1. the demo corpora (``jaxcpt demo --data-only``: runs/demo/data) and a small base model
   pretrained on 'general' (``jaxcpt.demo.pretrain_base``; reused when already there);
2. ``plan sweep``: short CPT runs from that base on 'domain' with 'general' replay at each ratio;
3. ``plan fit``: the law, a bootstrap over runs, the recommended replay ratio, a config with it;
4. a run of that written config (the chosen mixture is what trains), whose measured
   general-loss rise is compared with the prediction.

Prints a table and writes benchmarks/results/plan_demo.json and docs/plan_demo_fit.png, with
the machine and the other processes' CPU load recorded (the runs' wall times depend on it).
Rerunning reuses the base and the finished sweep runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train_throughput import CpuLoad, machine_info  # noqa: E402  (benchmarks/ is a directory of scripts)

from jaxcpt import demo  # noqa: E402
from jaxcpt.config import apply_overrides  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/plan_demo", help="working directory (default: %(default)s)")
    parser.add_argument("--law", default="cmr", choices=["cmr", "dcpt"])
    parser.add_argument("--tolerance", default="0.15", help="allowed general-loss rise (default: %(default)s nats)")
    parser.add_argument("--ratios", default="0,0.1,0.2,0.35,0.5", help="replay ratios swept")
    parser.add_argument("--steps", type=int, default=60, help="CPT steps of every run (default: %(default)s)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="base model pretraining steps")
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "plan_demo.json"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "plan_demo_fit.png"))
    args = parser.parse_args()

    from jaxcpt.plan.fitted import fit_law
    from jaxcpt.plan.laws import Tolerance
    from jaxcpt.plan.report import LAW_NAMES, plot_fit, run_fit
    from jaxcpt.plan.sweep import SweepSpec, collect, run_sweep
    from jaxcpt.train.config import load_train_config
    from jaxcpt.train.loop import train
    from jaxcpt.report.forgetting import summarize

    out = Path(args.out)
    load = CpuLoad()
    load.start()
    timings = {}
    t0 = time.monotonic()
    data_dir = demo.prepare_data(Path("runs/demo"), demo.SCALES["full"], fresh=False)  # as `jaxcpt demo --data-only`
    scale = demo.DemoScale(documents=demo.SCALES["full"].documents, pretrain_steps=args.pretrain_steps,
                           cpt_steps=args.steps, eval_every=args.steps)
    reused = {"base": (out / "base" / "summary.json").is_file()}
    base = demo.pretrain_base(out, data_dir, scale)
    timings["data_and_base_s"] = time.monotonic() - t0

    # The sweep's config: the demo's CPT run, evaluated only at step 0 and at the end.
    raw = apply_overrides({}, demo.cpt_overrides(out / "cpt", data_dir, base, 0.25, scale)
                          + ["eval.every=0", "eval.dense_every=0", "checkpoint.every_steps=1000"])
    config = out / "sweep_config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    ratios = [float(r) for r in args.ratios.split(",")]
    reused["sweep_runs"] = sum((out / "sweep" / "runs" / f"base-s{args.steps}-r{r:g}" / "summary.json").is_file()
                               for r in ratios)
    t0 = time.monotonic()
    run_sweep(SweepSpec(config=str(config), overrides=[], ratios=ratios, steps=[args.steps], sizes={"base": []}),
              out / "sweep")
    timings["sweep_s"] = time.monotonic() - t0

    recommended_yaml = out / "recommended.yaml"
    fit = run_fit(argparse.Namespace(sweep_dir=str(out / "sweep"), law=args.law, tolerance=args.tolerance,
                                     at_steps=None, at_params=None, base_general_loss=None, bootstrap=args.bootstrap,
                                     seed=0, plot=args.plot, write_config=str(recommended_yaml)))
    rec = fit["recommendation"]

    # Train exactly the written config (only its run directory moved), as a user would.
    run_dir = out / f"recommended_r{rec['replay']:g}"
    cfg = load_train_config(str(recommended_yaml), [f"run_dir={run_dir}"])
    t0 = time.monotonic()
    summary_path = run_dir / "summary.json"
    reused["recommended_run"] = summary_path.is_file()
    if not (summary_path.is_file() and json.loads(summary_path.read_text()).get("step") == args.steps):
        if run_dir.exists():
            shutil.rmtree(run_dir)
        train(cfg)
    timings["recommended_run_s"] = time.monotonic() - t0
    measured = summarize(run_dir)
    general, domain = measured[fit_manifest_name(out, "general")], measured[fit_manifest_name(out, "domain")]
    load_info = load.stop()
    # The fit's plot again, with the run at the recommendation as a star: the picture in the README.
    observations, _ = collect(out / "sweep")
    fitted = fit_law(args.law, observations)
    plot_fit(fitted, observations, fitted.recommend(rec["tokens"], rec["params"], Tolerance.parse(args.tolerance)),
             fit["base_general_loss"], Path(args.plot), title=f"{LAW_NAMES[args.law]}: the demo sweep",
             measured=(rec["replay"], general["last"], domain["last"]))

    result = {
        "what": "plan sweep + fit + a run at the recommended replay ratio, on the demo corpora",
        "law": args.law, "tolerance": args.tolerance, "ratios": ratios, "cpt_steps": args.steps,
        "pretrain_steps": args.pretrain_steps, "model_params": rec["params"], "cpt_tokens": rec["tokens"],
        "sweep": [{k: r[k] for k in ("run", "replay", "general_loss", "domain_loss", "base_general_loss",
                                     "base_domain_loss")} for r in fit["runs"]],
        "left_out_of_fit": fit["left_out_of_fit"], "coefficients": fit["coefficients"], "bootstrap": fit["bootstrap"],
        "recommended_replay": rec["replay"], "allowed_rise": rec["allowed_rise"],
        "predicted": {"general_loss": rec["general_loss"], "general_rise": rec["general_rise"],
                      "domain_loss": rec["domain_loss"]},
        "measured": {"replay_trained": next(s.weight for s in cfg.data.sources if s.name == "general"),
                     "general_loss": general["last"], "general_rise": general["change"],
                     "domain_loss": domain["last"], "domain_change": domain["change"]},
        "prediction_error": {"general_rise": general["change"] - rec["general_rise"],
                             "general_loss": general["last"] - rec["general_loss"],
                             "domain_loss": domain["last"] - rec["domain_loss"]},
        "within_tolerance": general["change"] <= rec["allowed_rise"],
        "timings_s": timings, "reused_from_an_earlier_invocation": reused,
        "machine": machine_info(), "cpu_load": load_info,
        "plot": str(Path(args.plot).relative_to(REPO)) if Path(args.plot).is_relative_to(REPO) else args.plot,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    rows = [("recommended replay ratio", f"{rec['replay']:.3f}" + (
                f" (bootstrap 90%: {fit['bootstrap']['replay'][0]:.3f}-{fit['bootstrap']['replay'][2]:.3f})"
                if fit["bootstrap"] and fit["bootstrap"]["replay"] else "")),
            ("general-loss rise, predicted", f"{rec['general_rise']:+.4f}"),
            ("general-loss rise, measured", f"{general['change']:+.4f}"),
            ("prediction error (measured - predicted)", f"{general['change'] - rec['general_rise']:+.4f}"),
            ("domain loss, predicted / measured", f"{rec['domain_loss']:.4f} / {domain['last']:.4f}"),
            ("tolerance (allowed rise)", f"{rec['allowed_rise']:.4f}"),
            ("other processes' CPU load", f"{load_info['other_processes_cores']:.2f} of {load_info['cores']} cores")]
    width = max(len(k) for k, _ in rows)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(f"wrote {args.json} and {args.plot}")
    return 0


def fit_manifest_name(out: Path, role: str) -> str:
    return json.loads((out / "sweep" / "sweep.json").read_text())[role]


if __name__ == "__main__":
    sys.exit(main())

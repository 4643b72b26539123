"""``jaxcpt plan``: choose the budget and the replay ratio before the pod-days.

    jaxcpt plan budget --config C [--out budget.png] [overrides ...]
        tokens drawn per source, epochs, the step each source starts repeating, warnings past
        ~4 epochs; the planned mixture over steps next to the LR schedule (no accelerator needed)
    jaxcpt plan sweep --config C --ratios 0,0.05,0.1,0.25,0.5 --steps 200,400 --out SWEEP [overrides ...]
        short proxy runs, one ordinary run directory each, resumable; per-source held-out loss
    jaxcpt plan fit SWEEP --law cmr|dcpt|interp|auto --tolerance 0.05 [--at-steps N] [--write-config OUT.yaml]
        fit the law (or every law, choosing by leave-one-out error), print coefficients, the held-out
        error of each interior run, predicted losses and the replay ratio that keeps the general-loss
        rise within the tolerance while gaining most on the domain
    jaxcpt plan check SWEEP RUN_DIR
        the planned run against its prediction (within the reported uncertainty or not); adds it to the sweep
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxcpt.errors import UserError

DEFAULT_RATIOS = "0,0.05,0.1,0.25,0.5"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="plan_command", metavar="SUBCOMMAND", required=True)

    budget = sub.add_parser("budget", help="token budget per source, epochs, repeats; mixture and LR plotted")
    budget.add_argument("--config", required=True, help="training YAML (as for jaxcpt train)")
    budget.add_argument("--out", default="budget.png", help="PNG of the planned mixture and LR (default: %(default)s)")
    budget.add_argument("--json", help="also write the plan as JSON here")
    budget.add_argument("--sample-documents", type=int, default=2000,
                        help="documents tokenized per text source to estimate its size (default: %(default)s)")
    budget.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20000")

    sweep = sub.add_parser("sweep", help="run short proxy runs over replay ratios, budgets and model sizes")
    sweep.add_argument("--config", required=True, help="training YAML of the CPT run to plan")
    sweep.add_argument("--out", required=True, help="sweep directory (runs/, sweep.json); rerun to resume")
    sweep.add_argument("--ratios", default=DEFAULT_RATIOS, help="replay (general) shares, comma-separated, or "
                       "'auto': a coarse pass (0,0.1,0.25,0.5), then --auto-runs ratios where the --tolerance binds "
                       "(default: %(default)s)")
    sweep.add_argument("--tolerance", default="0.05", help="with --ratios auto: the general-loss rise the plan will "
                       "allow, as for plan fit (default: %(default)s)")
    sweep.add_argument("--auto-runs", type=int, default=3, help="with --ratios auto: ratios added by the second "
                       "pass (default: %(default)s)")
    sweep.add_argument("--steps", required=True, help="budgets in optimizer steps, comma-separated, e.g. 200,400")
    sweep.add_argument("--size", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                       help="a model size as dotted overrides, e.g. small:model.hidden_size=256,model.num_layers=4 "
                            "(repeatable; default: the config's model)")
    sweep.add_argument("--general", default="general", help="name of the general (replay) source (default: general)")
    sweep.add_argument("--domain", default="domain", help="name of the domain source (default: domain)")
    sweep.add_argument("--dry-run", action="store_true", help="write the runs' configs and list them; train nothing")
    sweep.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")

    fit = sub.add_parser("fit", help="fit a mixture law to a sweep and recommend the replay ratio")
    fit.add_argument("sweep_dir", help="directory written by jaxcpt plan sweep")
    fit.add_argument("--law", choices=["cmr", "dcpt", "interp", "auto"], default="cmr",
                     help="CMR (Gu et al. 2024), D-CPT (Que et al. 2024), interp (monotone interpolation in the ratio: "
                     "the baseline), or auto (fit all three, recommend with the one whose leave-one-out error is "
                     "smallest) (default: %(default)s)")
    fit.add_argument("--tolerance", default="0.05", help="allowed general-loss rise over the base model: nats "
                     "(0.05) or a percentage of the base loss (3%%) (default: %(default)s)")
    fit.add_argument("--at-steps", type=int, help="recommend for this budget in steps (default: the largest swept)")
    fit.add_argument("--at-params", type=float, help="recommend for this model size in parameters "
                     "(default: the largest swept; needs --law dcpt and 2+ swept sizes to move)")
    fit.add_argument("--base-general-loss", type=float,
                     help="base model's held-out general loss, for a model size the sweep did not run")
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over runs (0: none; "
                     "default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    fit.add_argument("--plot", help="PNG of data and fit (default: SWEEP/fit_LAW.png)")
    fit.add_argument("--write-config", metavar="OUT_YAML",
                     help="write the sweep's config with the recommended mixture (and --at-steps) as a YAML "
                          "that jaxcpt train --config accepts; the prediction is recorded for plan check")

    check = sub.add_parser("check", help="compare a finished planned run with its prediction; add it to the sweep")
    check.add_argument("sweep_dir", help="directory written by jaxcpt plan sweep")
    check.add_argument("run_dir", help="run directory of the config plan fit --write-config wrote, trained")
    check.add_argument("--law", default=None, help="use the prediction of this law when several match the run")
    check.add_argument("--no-add", action="store_true", help="compare only; leave the sweep as it is")


def run(args: argparse.Namespace) -> int:
    if args.plan_command == "budget":
        return _budget(args)
    if args.plan_command == "sweep":
        return _sweep(args)
    if args.plan_command == "check":
        from jaxcpt.plan.check import check_run

        check_run(Path(args.sweep_dir), Path(args.run_dir), add=not args.no_add, law=args.law)
        return 0
    return _fit(args)


def _budget(args) -> int:
    from jaxcpt.plan.budget import format_plan, plan_budget, plan_json, plot_plan
    from jaxcpt.train.config import load_train_config

    cfg = load_train_config(args.config, list(args.overrides))
    plan = plan_budget(cfg, sample_documents=args.sample_documents)
    print(format_plan(plan))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_plan(plan, out, title=f"{Path(args.config).name}: planned mixture and learning rate")
    print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(plan_json(plan), indent=1))
        print(f"wrote {args.json}")
    return 0


def _parse_list(text: str, kind, what: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} {text!r} must be comma-separated numbers") from None
    if not values:
        raise UserError(f"{what} is empty")
    return values


def _sweep(args) -> int:
    import dataclasses

    from jaxcpt.plan.sweep import SweepSpec, parse_size, run_sweep

    auto = args.ratios.strip() == "auto"
    if auto:
        from jaxcpt.plan.design import COARSE
    spec = SweepSpec(config=args.config, overrides=list(args.overrides),
                     ratios=list(COARSE) if auto else _parse_list(args.ratios, float, "--ratios"),
                     steps=_parse_list(args.steps, int, "--steps"),
                     sizes=dict(parse_size(s) for s in args.size) or {"base": []},
                     general=args.general, domain=args.domain)
    if auto:
        from jaxcpt.plan.laws import Tolerance

        Tolerance.parse(args.tolerance)  # a bad tolerance fails before the coarse pass trains
        print(f"--ratios auto: coarse pass at {', '.join(f'{r:g}' for r in COARSE)}", flush=True)
    manifest = run_sweep(spec, Path(args.out), dry_run=args.dry_run)
    if not auto:
        return 0
    if args.dry_run:
        print(f"--ratios auto: the second pass ({args.auto_runs} ratios) is chosen from the coarse runs' losses, "
              "so a dry run cannot list it", flush=True)
        return 0
    added = _auto_ratios(Path(args.out), manifest, args)
    if added is None:
        return 0
    run_sweep(dataclasses.replace(spec, ratios=sorted(set(COARSE) | set(added))), Path(args.out))
    return 0


def _auto_ratios(out: Path, manifest: dict, args) -> list[float] | None:
    from jaxcpt.plan.design import refine_ratios
    from jaxcpt.plan.laws import Tolerance
    from jaxcpt.plan.sweep import collect

    observations, unfinished = collect(out)
    if unfinished:  # stopped by a signal: the coarse pass resumes first on the next invocation
        return None
    params = max(o.params for o in observations)
    tokens = max(o.tokens for o in observations if o.params == params)
    added, why = refine_ratios(observations, tokens, params, Tolerance.parse(args.tolerance), args.auto_runs)
    print(f"--ratios auto: {why}: adding {', '.join(f'{r:g}' for r in added) or 'nothing'}", flush=True)
    manifest = json.loads((out / "sweep.json").read_text())
    manifest["auto_ratios"] = {"added": added, "why": why}  # a record of what the second pass chose, and why
    (out / "sweep.json").write_text(json.dumps(manifest, indent=1))
    return added


def _fit(args) -> int:
    from jaxcpt.plan.report import run_fit

    run_fit(args)
    return 0

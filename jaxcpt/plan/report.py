"""``jaxcpt plan fit``: fit a law to a sweep, print and plot it, recommend the replay ratio, write the config.

Everything printed is also written to SWEEP/fit_LAW.json; the plot (SWEEP/fit_LAW.png) shows
the runs' final held-out losses against the replay ratio with the fitted curves, the
tolerance line and the recommended ratio. A recommendation outside the swept budgets or
model sizes is marked EXTRAPOLATED, in the table, the JSON and the plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from jaxcpt.config import apply_overrides, read_yaml
from jaxcpt.errors import UserError
from jaxcpt.plan.fitted import Bootstrap, group_label
from jaxcpt.plan.laws import Recommendation, Tolerance
from jaxcpt.plan.sweep import SweepSpec, collect, load_manifest, set_mixture
from jaxcpt.plan.text import format_table, short

LAW_NAMES = {"cmr": "CMR scaling law (Gu et al. 2024, arXiv:2407.17467)",
             "dcpt": "D-CPT law (Que et al. 2024, arXiv:2406.01375)",
             "interp": "monotone interpolation in the replay ratio (the baseline; jaxcpt.plan.monotone)"}
TABLE_RATIOS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def _target(manifest: dict, observations, at_steps: int | None, at_params: float | None) -> tuple[float, float]:
    params = at_params if at_params is not None else max(o.params for o in observations)
    if at_steps is None:
        same = [o for o in observations if o.params == params] or observations
        # The largest budget the sweep ran over ratios, not one that holds a single added run (plan check of a
        # longer --at-steps config): that budget has no curve of its own.
        swept = [t for t in {o.tokens for o in same} if len({o.replay for o in same if o.tokens == t
                                                             and 0.0 < o.replay < 1.0}) >= 2]
        return max(swept or [o.tokens for o in same]), params
    per_step = {r["tokens_per_step"] for r in manifest["runs"].values()}
    if len(per_step) != 1:
        raise UserError(f"the sweep's runs differ in tokens per step {sorted(per_step)}; --at-steps is ambiguous")
    return at_steps * per_step.pop(), params


_NOT_IDENTIFIED = {"A/N^alpha": (("A", "alpha"), "the sweep ran one model size"),
                   "D^beta": (("beta",), "the sweep ran one budget")}


def _coefficient_rows(coefficients: dict, boot: Bootstrap | None) -> list[list[str]]:
    rows = []

    def walk(tree: dict, prefix: str) -> None:
        hidden = {}
        for term in tree.get("not_identified", []):
            keys, why = _NOT_IDENTIFIED[term]
            hidden.update(dict.fromkeys(keys, why))
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif key in hidden:
                rows.append([prefix + key, "-", f"not identified: {hidden[key]}"])
            elif isinstance(value, (int, float)):
                ci = boot.coefficients.get(prefix + key) if boot else None
                rows.append([prefix + key, f"{value:.6g}", "-" if ci is None else f"[{ci[0]:.4g}, {ci[2]:.4g}]"])

    walk(coefficients, "")
    return rows


def _prediction_rows(fitted, rec: Recommendation, base_general: float) -> list[list[str]] | None:
    ratios = sorted(set(TABLE_RATIOS) | ({round(rec.replay, 3)} if rec.replay is not None else set()))
    try:
        general, domain = fitted.predict(np.array(ratios), rec.tokens, rec.params)
    except UserError:
        return None
    rows = []
    for r, g, d in zip(ratios, general, domain):
        mark = "<- recommended" if rec.replay is not None and abs(r - rec.replay) < 5e-4 else (
            "" if g - base_general <= rec.allowed_rise + 1e-12 else "over tolerance")
        rows.append([f"{r:.3g}", f"{g:.4f}", f"{g - base_general:+.4f}", f"{d:.4f}" if np.isfinite(d) else "-", mark])
    return rows


def _base_general(observations, params: float, given: float | None) -> float:
    if given is not None:
        return given
    same = [o.base_general_loss for o in observations if o.params == params]
    if not same:
        raise UserError(f"no swept run has N={params:.4g}; pass --base-general-loss")
    return float(np.mean(same))


def _loo_rows(loo) -> list[list[str]]:
    rows = []
    for r in loo.rows:
        if "failed" in r:
            rows.append([r["run"], f"{r['replay']:g}", "-", "-", "-", "-", "-", "-", "cannot refit without it"])
            continue
        rows.append([r["run"], f"{r['replay']:g}", f"{r['general_rise']:+.4f}", f"{r['predicted_rise']:+.4f}",
                     f"{r['general_error']:+.4f}", f"{r['domain_loss']:.4f}", f"{r['predicted_domain']:.4f}",
                     f"{r['domain_error']:+.4f}", ""])
    return rows


def _bootstrap_line(a) -> str:
    if a.boot is None:
        return f"bootstrap: none ({a.boot_skipped})"
    boot = a.boot
    line = (f"bootstrap: {boot.samples} of {boot.requested} resamples refitted"
            + (f"; {boot.degenerate} skipped as degenerate (no more distinct runs than parameters: they would fit "
               "exactly)" if boot.degenerate else "")
            + (f"; {boot.failed} failed to fit" if boot.failed else "")
            + (f"; {boot.infeasible} with no feasible ratio" if boot.infeasible else ""))
    if not boot.enough:
        line += f". Too few refits for an interval (needs {max(20, boot.requested // 5)}): none printed"
    return line


def _recommendation_line(a, where: str, tolerance: Tolerance) -> str:
    rec, boot = a.rec, a.boot
    if rec.replay is None:
        return f"no replay ratio keeps the general-loss rise within {tolerance} at {where}"
    line = f"recommended replay ratio: {rec.replay:.3f} at {where}"
    if boot is not None and boot.enough and boot.replay:
        line += f" (bootstrap 90% interval {boot.replay[0]:.3f}-{boot.replay[2]:.3f})"
    if rec.general_rise is None:
        return line
    g, d = a.bound("general_error"), a.bound("domain_error")
    if g is not None:
        n = len(a.loo.computed)
        return (line + f"\n  predicted general rise {rec.general_rise:+.4f} +/- {g:.4f}, domain loss "
                f"{rec.domain_loss:.4f} +/- {d:.4f} (+/-: the largest leave-one-out error over {n} interior runs)")
    why = ("the fit is exactly determined (above)" if a.det.exact
           else "no interior run could be predicted without it")
    return line + (f"\n  predicted general rise {rec.general_rise:+.4f}, domain loss {rec.domain_loss:.4f}: "
                   f"NO uncertainty can be given, {why}")


def run_fit(args) -> dict:
    from jaxcpt.plan.assess import AUTO_LAWS, LAW_SHORT, assess, choose, laws_table, plot_laws
    from jaxcpt.plan.heldout import check_sweep

    sweep_dir = Path(args.sweep_dir)
    manifest = load_manifest(sweep_dir)
    observations, unfinished = collect(sweep_dir)
    if not observations:
        raise UserError(f"no finished runs in '{sweep_dir}' to fit; run `jaxcpt plan sweep` first")
    tolerance = Tolerance.parse(args.tolerance)
    tokens, params = _target(manifest, observations, args.at_steps, args.at_params)
    if args.at_steps is None and args.at_params is None:
        check_sweep(observations, tokens, params)
    laws = AUTO_LAWS if args.law == "auto" else (args.law,)
    assessments = [assess(law, observations, tokens=tokens, params=params, tolerance=tolerance,
                          base_general=args.base_general_loss, samples=args.bootstrap, seed=args.seed) for law in laws]
    if args.law == "auto":
        chosen, why = choose(assessments)
    else:
        chosen, why = assessments[0], None
        if chosen.error is not None:
            raise UserError(chosen.error)
    fitted, rec, boot = chosen.fitted, chosen.rec, chosen.boot
    base_general = _base_general(observations, params, args.base_general_loss)

    lines = [f"{LAW_NAMES[chosen.law]} fitted to {len(observations)} runs of {sweep_dir}"
             + (f" ({len(unfinished)} unfinished left out: {', '.join(unfinished)})" if unfinished else ""),
             f"general source '{manifest['general']}' (replay ratio r = its share), domain source "
             f"'{manifest['domain']}' (1 - r)", ""]
    show_ci = boot if boot is not None and boot.enough else None
    if chosen.law != "interp":  # the interpolation's "coefficients" are its knots: the runs' column 'fit' below
        lines.append(format_table(["coefficient", "fit", "bootstrap 90%"],
                                  _coefficient_rows(fitted.coefficients, show_ci), right={1, 2}))
    lines.append(_bootstrap_line(chosen))
    lines.append(chosen.det.message(LAW_SHORT[chosen.law]))
    if getattr(fitted, "left_out", None):
        lines.append(f"left out of the fit: {', '.join(fitted.left_out)} (CMR fits ratios strictly between 0 and 1, "
                     "Gu et al. Sec. 5.1, and one budget at a time)")
    run_rows = []
    for o in observations:
        try:
            g, d = fitted.predict(np.array([o.replay]), o.tokens, o.params)
            pred = [f"{g[0]:.4f}", f"{d[0]:.4f}"]
        except UserError:
            pred = ["-", "-"]
        run_rows.append([o.run, f"{o.replay:g}", f"{o.general_loss:.4f}", f"{o.general_loss - o.base_general_loss:+.4f}",
                         pred[0], f"{o.domain_loss:.4f}", pred[1]])
    lines += ["", format_table(["run", "replay", "general", "rise", "fit", "domain", "fit"], run_rows)]
    lines += ["", "leave-one-out: each interior run predicted by a fit without it (error = predicted - measured)",
              format_table(["run", "replay", "rise", "predicted", "error", "domain", "predicted", "error", ""],
                           _loo_rows(chosen.loo))]
    if chosen.loo.computed:
        lines.append(f"largest leave-one-out error: general rise {chosen.loo.largest('general_error'):.4f} nats, domain "
                     f"loss {chosen.loo.largest('domain_error'):.4f} nats ({len(chosen.loo.computed)} of "
                     f"{len(chosen.loo.rows)} runs predicted)")
    if args.law == "auto":
        lines += ["", "every law at the target (LOO = leave-one-out, largest absolute error in nats):",
                  laws_table(assessments, chosen), f"--law auto: {why}"]
    where = group_label(tokens, params) + (" EXTRAPOLATED beyond the sweep" if rec.extrapolated else "")
    table = _prediction_rows(fitted, rec, base_general)
    lines.append("")
    if table is not None:
        lines += [f"predicted by {LAW_SHORT[chosen.law]} at {where} (base general loss {base_general:.4f}, tolerance "
                  f"{tolerance}: rise <= {rec.allowed_rise:.4f})",
                  format_table(["replay", "general", "rise", "domain", ""], table, right={1, 2, 3})]
    else:
        lines.append(f"at {where} the {chosen.law} law gives the critical ratio only ({rec.how})")
    lines += ["", _recommendation_line(chosen, where, tolerance)]
    print("\n".join(lines), flush=True)

    tag = args.law
    plot_path = Path(args.plot) if args.plot else sweep_dir / f"fit_{tag}.png"
    if args.law == "auto":
        plot_laws(assessments, observations, chosen, base_general, plot_path, title=str(sweep_dir))
    else:
        plot_fit(fitted, observations, rec, base_general, plot_path, title=f"{LAW_NAMES[chosen.law]}: {sweep_dir}")
    summary = chosen.summary()
    result = {"law": chosen.law, "law_asked": args.law, "chosen_because": why,
              "tolerance": {"value": tolerance.value, "relative": tolerance.relative},
              "coefficients": fitted.coefficients, "runs": [o.__dict__ for o in observations], "unfinished": unfinished,
              "left_out_of_fit": getattr(fitted, "left_out", []),
              "recommendation": rec.__dict__, "base_general_loss": base_general,
              "bootstrap": summary["bootstrap"], "bootstrap_skipped": summary["bootstrap_skipped"],
              "determination": summary["determination"], "leave_one_out": summary["leave_one_out"],
              "uncertainty": summary["uncertainty"],
              "laws": [a.summary() for a in assessments] if args.law == "auto" else None,
              "predictions": None if table is None else [dict(zip(["replay", "general", "rise", "domain", "mark"], r))
                                                         for r in table]}
    json_path = sweep_dir / f"fit_{tag}.json"
    json_path.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {plot_path} and {json_path}", flush=True)
    if args.write_config:
        write_config(manifest, rec, Path(args.write_config), steps=args.at_steps,
                     source={"sweep": str(sweep_dir.resolve()), "fit_json": str(json_path.resolve()), **result})
    return result


def write_config(manifest: dict, rec: Recommendation, out: Path, steps: int | None = None,
                 source: dict | None = None) -> None:
    """The sweep's config with the recommended mixture (and budget), as a YAML ``jaxcpt train`` loads.

    ``source`` (the fit's result) is recorded twice: in the YAML's header comments, for a reader, and in
    SWEEP/predictions.json, which ``jaxcpt plan check`` reads to find the prediction a run was planned from.
    """
    from jaxcpt.train.config import load_train_config

    if rec.replay is None:
        raise UserError("no feasible replay ratio to write; raise --tolerance or sweep more ratios")
    spec = SweepSpec(config=manifest["config"], overrides=manifest["overrides"], ratios=[], steps=[], sizes={},
                     general=manifest["general"], domain=manifest["domain"])
    raw = apply_overrides(read_yaml(spec.config), spec.overrides)
    set_mixture(raw, spec, round(rec.replay, 4))
    if steps is not None:
        raw = apply_overrides(raw, [f"train.steps={steps}"])
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# written by jaxcpt plan fit: replay ratio {rec.replay:.4f} ({spec.general} weight), "
              f"{group_label(rec.tokens, rec.params)}{' (extrapolated)' if rec.extrapolated else ''}\n")
    record = None
    if source is not None:
        from jaxcpt.plan.check import record_prediction

        record = record_prediction(Path(source["sweep"]), source, rec, out, steps)
        unc = record["uncertainty"]
        header += (f"# planned from: {source['fit_json']} (law {source['law']}, asked {source['law_asked']}), "
                   f"prediction {record['id']} in {Path(source['sweep']) / 'predictions.json'}\n"
                   f"# predicted: general rise {_fmt_pm(rec.general_rise, unc['general_rise'])}, domain loss "
                   f"{_fmt_pm(rec.domain_loss, unc['domain_loss'], signed=False)}; check the finished run with "
                   f"`jaxcpt plan check {source['sweep']} RUN_DIR`\n")
    out.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    cfg = load_train_config(str(out))  # what train will do with it: fail here, not on the pod
    trained = cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len
    if abs(trained - rec.tokens) > 1e-9 * rec.tokens:
        print(f"note: the prediction is for {group_label(rec.tokens, rec.params)} (the swept budget), but this config "
              f"trains {cfg.train.steps} steps = {trained:.4g} tokens; pass --at-steps {cfg.train.steps} to predict "
              "at its own budget (plan check compares a run only with a prediction at its budget)", flush=True)
    print(f"wrote {out}: {spec.general} weight {round(rec.replay, 4):g}, {spec.domain} weight "
          f"{round(1 - round(rec.replay, 4), 4):g}; train it with `jaxcpt train --config {out}`"
          + (f", then `jaxcpt plan check {source['sweep']} RUN_DIR`" if source else ""), flush=True)


def _fmt_pm(value: float | None, bound: float | None, signed: bool = True) -> str:
    if value is None:
        return "-"
    return (f"{value:+.4f}" if signed else f"{value:.4f}") + (" (no uncertainty: untested fit)" if bound is None else f" +/- {bound:.4f}")


def plot_fit(fitted, observations, rec: Recommendation, base_general: float, out: Path, title: str = "",
             measured: tuple[float, float, float] | None = None) -> None:
    """General and domain loss against the replay ratio: runs as points, the fit as curves.

    ``measured`` = (replay, general loss, domain loss) of a run trained at the recommendation, drawn
    as a star next to what was predicted for it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxcpt.plan.assess import label_loss_axes

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    grid = np.linspace(0.0, 1.0, 201)
    groups = sorted({(o.tokens, o.params) for o in observations})
    several_sizes = len({p for _, p in groups}) > 1
    left_out = set(getattr(fitted, "left_out", []))

    def label_of(tokens: float, params: float) -> str:
        return f"D={short(tokens)} tokens" + (f", N={short(params)}" if several_sizes else "")

    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (tokens, params) in enumerate(groups):
        color = colors[k % len(colors)]
        runs = [o for o in observations if (o.tokens, o.params) == (tokens, params)]
        label = label_of(tokens, params)
        for ax, attr in zip(axes, ("general_loss", "domain_loss")):
            fit_runs = [o for o in runs if o.run not in left_out]
            ax.plot([o.replay for o in fit_runs], [getattr(o, attr) for o in fit_runs], "o", color=color,
                    label=f"runs {label}")
            skipped = [o for o in runs if o.run in left_out]
            if skipped:
                ax.plot([o.replay for o in skipped], [getattr(o, attr) for o in skipped], "o", mfc="none",
                        color=color, label="run not fitted (endpoint)")
        x = grid[grid < 1.0] if fitted.law == "cmr" else grid
        g, d = fitted.predict(x, tokens, params)
        axes[0].plot(x, g, "-", color=color, label=f"fit {label}")
        axes[1].plot(x, d, "-", color=color)
    target = (rec.tokens, rec.params)
    if target not in groups:
        try:
            g, d = fitted.predict(grid, *target)
            tag = "extrapolated" if rec.extrapolated else "predicted"
            axes[0].plot(grid, g, "--", color="k", label=f"{tag} {label_of(*target)}")
            axes[1].plot(grid, d, "--", color="k")
        except UserError:
            pass
    if measured is not None:
        for ax, value in zip(axes, measured[1:]):
            ax.plot([measured[0]], [value], "*", color="tab:green", markersize=13, label="run at the recommendation")
    # Frame the measured points; curves running off towards r = 0 or 1 would flatten everything else.
    general_values = [o.general_loss for o in observations] + [base_general, base_general + rec.allowed_rise]
    domain_values = [o.domain_loss for o in observations]
    if measured is not None:
        general_values.append(measured[1])
        domain_values.append(measured[2])
    for ax, values in ((axes[0], general_values), (axes[1], domain_values)):
        pad = 0.15 * (max(values) - min(values)) + 0.01
        ax.set_ylim(min(values) - pad, max(values) + pad)
    axes[0].axhline(base_general + rec.allowed_rise, color="tab:red", linestyle=":", label="base + tolerance")
    axes[0].axhline(base_general, color="0.5", linestyle=":", label="base model")
    if rec.replay is not None:
        for ax in axes:
            ax.axvline(rec.replay, color="tab:green", linestyle="--", linewidth=1.5)
        axes[0].text(rec.replay, axes[0].get_ylim()[1], f" recommended {rec.replay:.3f}"
                     + (" (extrapolated)" if rec.extrapolated else ""), color="tab:green", va="top", fontsize=9)
    label_loss_axes(axes)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    plt.close(fig)

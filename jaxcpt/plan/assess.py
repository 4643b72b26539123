"""One law assessed on a sweep (fit, recommendation, determination, leave-one-out, bootstrap), and ``--law auto``.

``assess`` gathers everything ``plan fit`` prints about one law; ``choose`` picks, among laws
whose leave-one-out error could be measured on every interior run at the target budget, the
one with the smallest largest error of the general-loss rise (the quantity the tolerance
constrains; the domain loss breaks ties). ``laws_table`` and ``plot_laws`` show every law
side by side, so a user sees what the choice was between.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.plan.fitted import Bootstrap, bootstrap, fit_law
from jaxcpt.plan.heldout import Determination, LeaveOneOut, determination, leave_one_out
from jaxcpt.plan.laws import Observation, Recommendation, Tolerance
from jaxcpt.plan.text import format_table

AUTO_LAWS = ("cmr", "dcpt", "interp")
LAW_SHORT = {"cmr": "CMR", "dcpt": "D-CPT", "interp": "monotone interpolation"}


@dataclasses.dataclass
class Assessment:
    law: str
    fitted: object | None = None
    rec: Recommendation | None = None
    det: Determination | None = None
    loo: LeaveOneOut | None = None
    boot: Bootstrap | None = None
    error: str | None = None  # why the law could not be fitted or asked at the target
    boot_skipped: str | None = None  # why no bootstrap was run

    def bound(self, key: str) -> float | None:
        """The uncertainty printed beside a prediction: the largest leave-one-out error (None: untested)."""
        if self.loo is None or (self.det is not None and self.det.exact):
            return None
        return self.loo.largest(key)

    def summary(self) -> dict:
        return {"law": self.law, "error": self.error,
                "recommendation": None if self.rec is None else self.rec.__dict__,
                "determination": None if self.det is None else {**dataclasses.asdict(self.det),
                                                                "message": self.det.message(self.law)},
                "leave_one_out": None if self.loo is None else self.loo.summary(),
                "uncertainty": {"general_rise": self.bound("general_error"), "domain_loss": self.bound("domain_error")},
                "bootstrap": None if self.boot is None else {**self.boot.__dict__, "enough": self.boot.enough},
                "bootstrap_skipped": self.boot_skipped}


def assess(law: str, observations: list[Observation], *, tokens: float, params: float, tolerance: Tolerance,
           base_general: float | None, samples: int = 200, seed: int = 0) -> Assessment:
    """Fit ``law`` and measure it; a law that cannot be fitted comes back with ``error`` set (for --law auto)."""
    out = Assessment(law)
    try:
        out.fitted = fit_law(law, observations)
        out.rec = out.fitted.recommend(tokens, params, tolerance, base_general)
    except UserError as e:
        out.error = str(e)
        return out
    out.det = determination(out.fitted, observations, tokens, params, out.rec.replay)
    out.loo = leave_one_out(law, observations, tokens, params)  # each refit as the full fit is made (all starts)
    if samples <= 0:
        out.boot_skipped = "not asked for (--bootstrap 0)"
    elif out.det.parameters is None:
        out.boot_skipped = "the interpolation has no parameters to resample"
    elif out.det.exact:
        out.boot_skipped = "exactly determined: every resample that fits passes through its runs (zero width)"
    else:
        out.boot = bootstrap(law, observations, tokens=tokens, params=params, tolerance=tolerance,
                             base_general=base_general, samples=samples, seed=seed, full=out.fitted)
    return out


def choose(assessments: list[Assessment]) -> tuple[Assessment, str]:
    """The law ``--law auto`` recommends with, and why, in a sentence."""
    fitted = [a for a in assessments if a.error is None]
    if not fitted:
        raise UserError("no law could be fitted to this sweep: " + "; ".join(f"{a.law}: {a.error}" for a in assessments))

    def score(a: Assessment) -> tuple[float, float]:
        return (a.loo.largest("general_error"), a.loo.largest("domain_error") or 0.0)

    tested = [a for a in fitted if a.loo is not None and a.loo.complete and not a.det.exact]
    if tested:
        best = min(tested, key=score)
        others = ", ".join(f"{LAW_SHORT[a.law]} {score(a)[0]:.4f}" for a in tested if a is not best)
        return best, (f"{LAW_SHORT[best.law]} predicts held-out runs best: largest leave-one-out error of the general "
                      f"rise {score(best)[0]:.4f} nats" + (f" (against {others})" if others else ""))
    fallback = next((a for a in fitted if a.law == "interp"), fitted[0])
    return fallback, ("no law's leave-one-out error could be measured on every interior run; recommending with "
                      f"{LAW_SHORT[fallback.law]}, untested: sweep more ratios")


def _pm(value: float | None, bound: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt) + ("" if bound is None else f" +/- {bound:.4f}")


def laws_table(assessments: list[Assessment], chosen: Assessment | None) -> str:
    rows = []
    for a in assessments:
        if a.error is not None:
            rows.append([LAW_SHORT[a.law], "-", "-", "-", "-", "-", "-", "not fitted: " + a.error[:70]])
            continue
        loo = a.loo
        tested = f"{len(loo.computed)}/{len(loo.rows)}"
        rows.append([LAW_SHORT[a.law], "-" if a.det.parameters is None else str(a.det.parameters),
                     tested,
                     "-" if loo.largest("general_error") is None else f"{loo.largest('general_error'):.4f}",
                     "-" if loo.largest("domain_error") is None else f"{loo.largest('domain_error'):.4f}",
                     "none" if a.rec.replay is None else f"{a.rec.replay:.3f}",
                     _pm(a.rec.general_rise, a.bound("general_error"), "+.4f"),
                     ("<- chosen" if a is chosen else "") + (" exactly determined" if a.det.exact else "")])
    return format_table(["law", "params", "LOO runs", "LOO rise err", "LOO domain err", "replay",
                         "predicted rise", ""], rows, right={1, 2, 3, 4, 5, 6})


def plot_laws(assessments: list[Assessment], observations: list[Observation], chosen: Assessment,
              base_general: float, out: Path, title: str = "",
              measured: dict[str, tuple[float, float, float]] | None = None) -> None:
    """General and domain loss against the replay ratio: the runs, every fitted law's curve at the target
    budget (the chosen one bold), the tolerance, each law's recommendation; ``measured`` = {law: (replay,
    general, domain)} of runs trained at the recommendations, drawn as stars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = chosen.rec
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110)
    runs = [o for o in observations if o.tokens == rec.tokens and o.params == rec.params] or observations
    for ax, attr in zip(axes, ("general_loss", "domain_loss")):
        ax.plot([o.replay for o in runs], [getattr(o, attr) for o in runs], "o", color="k", label="sweep runs")
    grid = np.linspace(0.0, 1.0, 401)
    colors = {"cmr": "tab:blue", "dcpt": "tab:orange", "interp": "tab:purple"}
    for a in assessments:
        if a.error is not None:
            continue
        x = grid[(grid > 0) & (grid < 1)] if a.law == "cmr" else grid
        try:
            g, d = a.fitted.predict(x, rec.tokens, rec.params)
        except UserError:
            continue
        bound = a.bound("general_error")
        label = f"{LAW_SHORT[a.law]}" + (" (exactly determined: untested)" if a.det.exact else
                                         " (no LOO error)" if bound is None else f" (LOO +/- {bound:.3f})")
        width = 2.6 if a is chosen else 1.2
        axes[0].plot(x, g, "-", color=colors[a.law], linewidth=width, label=label)
        axes[1].plot(x, d, "-", color=colors[a.law], linewidth=width)
        if a.rec.replay is not None:
            for ax in axes:
                ax.axvline(a.rec.replay, color=colors[a.law], linestyle="--", linewidth=1)
    for law, (replay, general, domain) in (measured or {}).items():
        axes[0].plot([replay], [general], "*", color=colors.get(law, "tab:green"), markersize=13,
                     markeredgecolor="k", label=f"run at {LAW_SHORT.get(law, law)}'s ratio")
        axes[1].plot([replay], [domain], "*", color=colors.get(law, "tab:green"), markersize=13, markeredgecolor="k")
    general_values = [o.general_loss for o in runs] + [base_general, base_general + rec.allowed_rise]
    domain_values = [o.domain_loss for o in runs]
    for ax, values in ((axes[0], general_values), (axes[1], domain_values)):
        pad = 0.15 * (max(values) - min(values)) + 0.01
        ax.set_ylim(min(values) - pad, max(values) + pad)
    axes[0].axhline(base_general + rec.allowed_rise, color="tab:red", linestyle=":", label="base + tolerance")
    axes[0].axhline(base_general, color="0.5", linestyle=":", label="base model")
    label_loss_axes(axes)
    fig.suptitle(title + f"\nchosen by leave-one-out error: {LAW_SHORT[chosen.law]}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    plt.close(fig)


def label_loss_axes(axes) -> None:
    """Labels, range and legend of a fit plot's two panels (general and domain held-out loss against replay)."""
    axes[0].set_ylabel("general held-out loss (nats/token)")
    axes[1].set_ylabel("domain held-out loss (nats/token)")
    for ax in axes:
        ax.set_xlabel("replay ratio r (general share of tokens)")
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)

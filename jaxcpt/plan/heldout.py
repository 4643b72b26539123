"""How far to trust a fitted law: is it exactly determined, and how well does it predict runs it did not see?

A law with p parameters fitted to p runs passes through every run whatever the truth is, and
so does every bootstrap resample that can be fitted: its residuals are zero and a bootstrap
interval has zero width. That reads as certainty and is the opposite. So:

- ``determination`` counts the runs that determine the curve at the target budget against the
  law's parameters. At or below the count the fit is *exactly determined*: the planner prints
  no interval and says how many more ratios, and which, would make it testable.
- ``leave_one_out`` refits the law without each interior run (0 < r < 1) in turn and predicts
  that run: the error (predicted - measured, nats) of the general-loss rise and of the domain
  loss. Their largest absolute value is the uncertainty printed beside a prediction. With n
  runs a leave-one-out fit sees n - 1, so a law needs p + 1 runs for it to exist at all.
- ``check_sweep`` refuses sweeps that no law here can fit honestly (fewer than 2 interior
  ratios at the target budget).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.plan.laws import FitError, Observation

# Fewest interior ratios at the target budget any law here is fitted on (the interpolation baseline's);
# CMR needs 3 per budget (alpha, s, beta), and one more for a leave-one-out error.
MIN_INTERIOR = 2


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def at_target(observations: list[Observation], tokens: float, params: float) -> list[Observation]:
    return [o for o in observations if _same(o.tokens, tokens) and _same(o.params, params)]


def interior(observations: list[Observation]) -> list[Observation]:
    return [o for o in observations if 0.0 < o.replay < 1.0]


def check_sweep(observations: list[Observation], tokens: float, params: float) -> None:
    """A clear error when the target budget has too few interior ratios to fit anything."""
    runs = at_target(observations, tokens, params)
    ratios = sorted({o.replay for o in interior(runs)})
    if len(ratios) < MIN_INTERIOR:
        others = sorted({(o.tokens, o.params) for o in observations} - {(tokens, params)})
        where = f"D={tokens:.4g} N={params:.4g}"
        also = (f" (the sweep has runs at other budgets, {', '.join(f'D={t:.4g} N={p:.4g}' for t, p in others)}, but "
                "only --law dcpt has a budget term to carry them over)") if others else ""
        raise FitError(f"the sweep has {len(ratios)} replay ratio(s) strictly between 0 and 1 at {where} "
                       f"({', '.join(f'{r:g}' for r in ratios) or 'none'}){also}; a fit needs at least {MIN_INTERIOR} "
                       "(CMR 3, and 4 to measure its error): sweep more ratios, e.g. --ratios 0,0.05,0.1,0.25,0.5")


def parameters(fitted, tokens: float, params: float) -> int | None:
    """Free parameters of the curve the law uses at the target (None: no parametric form)."""
    if fitted.law == "cmr":
        return 3  # alpha, s, beta of each loss's curve at this budget
    if fitted.law == "dcpt":
        fixed = fitted.general["not_identified"]
        return 6 + ("A/N^alpha" not in fixed) * 2 + ("D^beta" not in fixed)  # E B C eta gamma eps (+A alpha) (+beta)
    return None


def determining_runs(fitted, observations: list[Observation], tokens: float, params: float) -> list[Observation]:
    """The runs the curve at the target is fitted on: interior runs of that budget (CMR), every run (D-CPT)."""
    if fitted.law == "cmr":
        return interior(at_target(observations, tokens, params))
    if fitted.law == "dcpt":
        return list(observations)
    return at_target(observations, tokens, params)


@dataclasses.dataclass(frozen=True)
class Determination:
    runs: int  # runs (distinct points) that determine the curve at the target
    parameters: int | None
    exact: bool  # runs <= parameters: the fit passes through every run, no error can be estimated
    more_for_loo: int  # interior ratios to add before leave-one-out exists (0: it does)
    more_for_bootstrap: int  # ... before a bootstrap resample can have more runs than parameters with some chance
    suggest: tuple[float, ...]  # ratios to add, best first

    def message(self, law: str) -> str:
        if self.parameters is None:
            return (f"{law}: no parameters; it passes through every (monotone) run, so only its leave-one-out "
                    "error measures it")
        if not self.exact:
            return f"{law}: {self.runs} runs determine {self.parameters} parameters"
        more = ", ".join(f"{r:g}" for r in self.suggest[: max(self.more_for_loo, 1)])
        return (f"{law}: EXACTLY DETERMINED: {self.runs} runs for {self.parameters} parameters, so the curve passes "
                f"through every run and neither residuals nor a bootstrap can say how wrong it is; no interval is "
                f"given. Sweep {self.more_for_loo} more interior ratio(s) (e.g. {more}) for a leave-one-out error, "
                f"{self.more_for_bootstrap} more for a bootstrap")


def determination(fitted, observations: list[Observation], tokens: float, params: float,
                  recommended: float | None = None) -> Determination:
    runs = determining_runs(fitted, observations, tokens, params)
    distinct = len({(o.tokens, o.params, o.replay) for o in runs})
    p = parameters(fitted, tokens, params)
    swept = sorted({o.replay for o in at_target(observations, tokens, params)})
    if p is None:
        return Determination(distinct, None, False, max(0, 3 - len(interior(runs))), 0,
                             tuple(suggest_ratios(swept, recommended, 3)))
    more_loo = max(0, p + 1 - distinct)
    more_boot = max(0, p + 2 - distinct)
    return Determination(distinct, p, distinct <= p, more_loo, more_boot,
                         tuple(suggest_ratios(swept, recommended, max(more_boot, 1))))


def suggest_ratios(swept: list[float], recommended: float | None, count: int) -> list[float]:
    """Ratios worth adding, best first: the recommendation (where the answer is decided), then the middles of
    the widest gaps between swept ratios next to it; rounded to 0.01, at least 0.02 from anything swept."""
    chosen: list[float] = []
    taken = list(swept)

    def free(r: float) -> bool:
        return 0.0 < r < 1.0 and all(abs(r - s) >= 0.02 - 1e-9 for s in taken)

    if recommended is not None and free(round(recommended, 2)):
        chosen.append(round(recommended, 2))
        taken.append(chosen[-1])
    while len(chosen) < count:
        points = sorted(set(taken) | {0.0} | ({1.0} if max(taken, default=0.0) >= 0.5 else {min(1.0, 2 * max(taken, default=0.5))}))
        gaps = [(b - a, (a + b) / 2) for a, b in zip(points, points[1:])]
        if recommended is not None:  # first the gaps around the recommendation (where the tolerance binds), widest first
            near = [(a <= recommended + 1e-9 and b >= recommended - 1e-9) for a, b in zip(points, points[1:])]
            gaps = [(bool(n), width, mid) for n, (width, mid) in zip(near, gaps)]
        else:
            gaps = [(False, width, mid) for width, mid in gaps]
        for *_, mid in sorted(gaps, reverse=True):
            if free(round(mid, 2)):
                chosen.append(round(mid, 2))
                taken.append(chosen[-1])
                break
        else:
            break
    return chosen


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
    """Each interior run at the target predicted by a fit without it; errors are predicted - measured, nats."""

    rows: tuple[dict, ...]  # {run, replay, general_rise, predicted_rise, general_error, domain_loss, predicted_domain,
    #                          domain_error} or {run, replay, failed: reason}
    failed: int

    @property
    def computed(self) -> list[dict]:
        return [r for r in self.rows if "failed" not in r]

    @property
    def complete(self) -> bool:
        return bool(self.rows) and self.failed == 0

    def largest(self, key: str) -> float | None:
        values = [abs(r[key]) for r in self.computed]
        return max(values) if values else None

    def rms(self, key: str) -> float | None:
        values = [r[key] for r in self.computed]
        return float(np.sqrt(np.mean(np.square(values)))) if values else None

    def summary(self) -> dict:
        return {"runs": len(self.rows), "failed": self.failed,
                "general_rise_max_abs": self.largest("general_error"), "general_rise_rms": self.rms("general_error"),
                "domain_loss_max_abs": self.largest("domain_error"), "domain_loss_rms": self.rms("domain_error"),
                "rows": list(self.rows)}


def leave_one_out(name: str, observations: list[Observation], tokens: float, params: float,
                  start: dict | None = None) -> LeaveOneOut:
    """Refit ``name`` without each interior run at the target and predict it."""
    from jaxcpt.plan.fitted import fit_law

    rows, failed = [], 0
    for held in sorted(interior(at_target(observations, tokens, params)), key=lambda o: (o.replay, o.run)):
        rest = [o for o in observations if o is not held]
        try:
            fitted = fit_law(name, rest, start=start)
            general, domain = fitted.predict(np.array([held.replay]), held.tokens, held.params)
        except UserError as e:  # FitError included: too few runs left, a budget no longer fitted
            rows.append({"run": held.run, "replay": held.replay, "failed": str(e)})
            failed += 1
            continue
        rise = held.general_loss - held.base_general_loss
        predicted_rise = float(general[0]) - held.base_general_loss
        rows.append({"run": held.run, "replay": held.replay, "general_rise": rise, "predicted_rise": predicted_rise,
                     "general_error": predicted_rise - rise, "domain_loss": held.domain_loss,
                     "predicted_domain": float(domain[0]), "domain_error": float(domain[0]) - held.domain_loss})
    return LeaveOneOut(tuple(rows), failed)


def uncertainty_words(error: float, bound: float | None, what: str) -> str:
    """'within' / 'outside' the reported leave-one-out uncertainty, in a sentence."""
    if bound is None:
        return (f"{what}: the fit reported no uncertainty (exactly determined or untested), so this error of "
                f"{error:+.4f} nats is the first measure of it")
    inside = abs(error) <= bound + 1e-12
    return (f"{what}: off by {error:+.4f} nats, {'within' if inside else 'OUTSIDE'} the reported uncertainty "
            f"(+/- {bound:.4f}, the largest leave-one-out error)")


def is_degenerate_resample(name: str, pick: list[Observation], parameters_needed: int | None) -> bool:
    """A resample whose curve would be exactly determined: refitting it adds a zero-width sample, not information."""
    if parameters_needed is None:
        return True  # no parameters: nothing to resample
    if name == "cmr":
        groups: dict[tuple[float, float], set] = {}
        for o in interior(pick):
            groups.setdefault((o.tokens, o.params), set()).add(o.replay)
        return not groups or any(len(r) <= parameters_needed for r in groups.values())
    return len({(o.tokens, o.params, o.replay) for o in pick}) <= parameters_needed

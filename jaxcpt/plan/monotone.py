"""The baseline a mixture law must beat: monotone piecewise-linear interpolation in the replay ratio.

No functional form: at each (budget, model size) the runs' losses are made monotone with
isotonic regression (scipy's pool-adjacent-violators), the general loss non-increasing in the
replay ratio (more replay, less forgetting) and the domain loss non-decreasing (less domain
data), then joined by straight lines. Beyond the swept ratios it stays flat at the outermost
run: it never extrapolates a trend. Endpoint runs (no replay, no domain data) are used, since
no form is assumed that they could break.

It has no parameters to fit, so it is never "exactly determined" in the sense of a law with
p parameters fitted to p runs; it passes through every (monotone) run by construction, and its
leave-one-out error (``jaxcpt.plan.heldout``) is the only measure of its accuracy. A law whose
held-out error is not below this baseline's has not earned its form.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.optimize import isotonic_regression

from jaxcpt.errors import UserError
from jaxcpt.plan.laws import FitError, Observation, Recommendation, Tolerance


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def monotone_knots(replay, losses, *, increasing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(distinct ratios, isotonic losses at them): repeated ratios averaged, weighted by their count."""
    replay, losses = np.asarray(replay, np.float64), np.asarray(losses, np.float64)
    knots = np.unique(replay)  # sorted
    means = np.array([losses[replay == k].mean() for k in knots])
    counts = np.array([np.sum(replay == k) for k in knots], np.float64)
    fitted = isotonic_regression(means, weights=counts, increasing=increasing).x
    return knots, fitted


class InterpolationFit:
    """Monotone interpolation per (budget, model size) group; predicts only at swept budgets."""

    law = "interp"
    left_out: list[str] = []

    def __init__(self, observations: list[Observation]):
        groups: dict[tuple[float, float], list[Observation]] = defaultdict(list)
        for obs in observations:
            groups[(obs.tokens, obs.params)].append(obs)
        self.groups: dict[tuple[float, float], dict] = {}
        for (tokens, params), runs in sorted(groups.items()):
            replay = [o.replay for o in runs]
            if len(set(replay)) < 2:
                continue  # one ratio is no curve; heldout.check_sweep names such groups when they are the target
            g_knots, g_values = monotone_knots(replay, [o.general_loss for o in runs], increasing=False)
            d_knots, d_values = monotone_knots(replay, [o.domain_loss for o in runs], increasing=True)
            self.groups[(tokens, params)] = {"replay": g_knots, "general": g_values, "domain": d_values,
                                             "runs": len(runs),
                                             "base_general": float(np.mean([o.base_general_loss for o in runs]))}
        if not self.groups:
            raise FitError("monotone interpolation needs at least 2 distinct replay ratios at one budget")
        self.tokens_seen = sorted({t for t, _ in self.groups})
        self.params_seen = sorted({p for _, p in self.groups})

    @property
    def coefficients(self) -> dict:
        """The knots: what the interpolation passes through (after making the losses monotone)."""
        return {f"D={t:.4g} N={p:.4g}": {"replay": [float(x) for x in g["replay"]],
                                         "general": [float(x) for x in g["general"]],
                                         "domain": [float(x) for x in g["domain"]]}
                for (t, p), g in self.groups.items()}

    def _group(self, tokens: float, params: float) -> dict | None:
        return next((g for (t, p), g in self.groups.items() if _same(t, tokens) and _same(p, params)), None)

    def predict(self, replay, tokens: float, params: float) -> tuple[np.ndarray, np.ndarray]:
        group = self._group(tokens, params)
        if group is None:
            swept = ", ".join(f"D={t:.4g} N={p:.4g}" for t, p in self.groups)
            raise UserError(f"monotone interpolation predicts only at swept budgets ({swept}), not at "
                            f"D={tokens:.4g} N={params:.4g}; fit --law dcpt to move along D or N")
        replay = np.asarray(replay, np.float64)
        return (np.interp(replay, group["replay"], group["general"]),  # flat beyond the outermost runs
                np.interp(replay, group["replay"], group["domain"]))

    def recommend(self, tokens: float, params: float, tolerance: Tolerance,
                  base_general: float | None = None) -> Recommendation:
        from jaxcpt.plan.fitted import _from_curves

        group = self._group(tokens, params)
        if group is None:
            self.predict([0.5], tokens, params)  # raises the error above
        base = group["base_general"] if base_general is None else base_general
        return _from_curves(self, tokens, params, tolerance, base, extrapolated=False)

    def start(self) -> None:
        return None

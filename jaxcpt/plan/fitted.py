"""A law fitted to a sweep's runs: predictions at any replay ratio, the recommended ratio, a bootstrap.

``fit_law("cmr" | "dcpt", observations)`` returns an object with

- ``coefficients``: what was fitted, as plain numbers (for printing and JSON);
- ``predict(replay, tokens, params) -> (general [ratios], domain [ratios])``;
- ``recommend(tokens, params, tolerance, base_general)``: a ``Recommendation``, marked
  ``extrapolated`` when the budget or model size lies outside what the sweep ran.

The CMR law is fitted per (budget, model size) group, as in the paper; other budgets are
reached only through the CMR scaling law (Eq. 8) over at least three budgets, which gives the
ratio but not the losses. The D-CPT law is one surface over (N, D, r) and predicts both
losses anywhere, within the axes the sweep varied.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import numpy as np

from jaxcpt.errors import UserError
from jaxcpt.plan.laws import (
    REPLAY_GRID,
    FitError,
    Observation,
    Recommendation,
    Tolerance,
    best_replay,
    dcpt_loss,
    fit_dcpt,
    fit_power_law,
    power_law,
)


def _same(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b), 1.0)


def _outside(value: float, seen: list[float]) -> bool:
    return value < min(seen) * (1 - 1e-9) or value > max(seen) * (1 + 1e-9)


def group_label(tokens: float, params: float) -> str:
    return f"D={tokens:.4g} N={params:.4g}"


class CMRFit:
    """CMR law (Gu et al. 2024): ``L(R) = alpha * R**s + beta`` per budget, R = 1 - replay."""

    law = "cmr"

    def __init__(self, observations: list[Observation]):
        # Gu et al. fit L(R) "for different mixture ratios R (non-endpoint values, R in (0, 1))" (Sec. 5.1):
        # a run without replay (R = 1) or without domain data (R = 0) is plotted but not fitted.
        self.left_out = [o.run for o in observations if not 0.0 < o.replay < 1.0]  # (budgets not fitted join below)
        groups: dict[tuple[float, float], list[Observation]] = defaultdict(list)
        for obs in observations:
            if 0.0 < obs.replay < 1.0:
                groups[(obs.tokens, obs.params)].append(obs)
        if not groups:
            raise FitError("the CMR law is fitted on replay ratios strictly between 0 and 1 (Gu et al. Sec. 5.1), "
                           "and the sweep has none")
        self.groups: dict[tuple[float, float], dict] = {}
        # The law has no budget term: each budget is its own curve, and a budget with too few ratios (a run that
        # `plan check` added at another budget, say) cannot be fitted. It is left out, and named if it is asked for.
        self.unfitted: dict[tuple[float, float], str] = {}
        for (tokens, params), runs in sorted(groups.items()):
            ratios = [1.0 - o.replay for o in runs]
            try:
                general = fit_power_law(ratios, [o.general_loss for o in runs])
                domain = fit_power_law(ratios, [o.domain_loss for o in runs])
            except FitError as e:
                if len(groups) == 1:
                    raise FitError(f"budget {group_label(tokens, params)}: {e}") from None
                self.unfitted[(tokens, params)] = f"{', '.join(o.run for o in runs)}: {e}"
                self.left_out += [o.run for o in runs]
                continue
            self.groups[(tokens, params)] = {
                "general": general, "domain": domain, "runs": len(runs),
                "base_general": float(np.mean([o.base_general_loss for o in runs])),
                "base_domain": float(np.mean([o.base_domain_loss for o in runs])),
            }
        if not self.groups:
            raise FitError("no budget of the sweep has 3 distinct replay ratios strictly between 0 and 1 to fit the "
                           "CMR law on: " + "; ".join(f"{group_label(*k)} ({v})" for k, v in self.unfitted.items()))
        self.tokens_seen = sorted({t for t, _ in self.groups})
        self.params_seen = sorted({p for _, p in self.groups})

    @property
    def coefficients(self) -> dict:
        return {group_label(t, p): {"general": g["general"], "domain": g["domain"]} for (t, p), g in self.groups.items()}

    def _refuse_unfitted(self, tokens: float, params: float) -> None:
        reason = next((v for (t, p), v in self.unfitted.items() if _same(t, tokens) and _same(p, params)), None)
        if reason is not None:
            raise FitError(f"the sweep mixes budgets, and the CMR law has no budget term: each budget is its own "
                           f"curve, and {group_label(tokens, params)} cannot be fitted ({reason}). Sweep that budget "
                           f"over 3+ ratios, or fit --law dcpt, whose D^beta term carries the other budgets over")

    def _group(self, tokens: float, params: float) -> dict | None:
        return next((g for (t, p), g in self.groups.items() if _same(t, tokens) and _same(p, params)), None)

    def predict(self, replay, tokens: float, params: float) -> tuple[np.ndarray, np.ndarray]:
        group = self._group(tokens, params)
        if group is None:
            self._refuse_unfitted(tokens, params)
            raise UserError(f"the CMR law predicts losses only at swept budgets ({self._budgets()}); at "
                            f"{group_label(tokens, params)} it gives the critical ratio alone (Eq. 8), or fit --law dcpt")
        ratio = 1.0 - np.asarray(replay, np.float64)
        return power_law(ratio, **group["general"]), power_law(ratio, **group["domain"])

    def _budgets(self) -> str:
        return ", ".join(group_label(t, p) for t, p in self.groups)

    def recommend(self, tokens: float, params: float, tolerance: Tolerance,
                  base_general: float | None = None) -> Recommendation:
        group = self._group(tokens, params)
        if group is not None:
            base = group["base_general"] if base_general is None else base_general
            return _from_curves(self, tokens, params, tolerance, base, extrapolated=False)
        self._refuse_unfitted(tokens, params)
        same_size = [(t, g) for (t, p), g in self.groups.items() if _same(p, params)]
        if len(same_size) < 3:
            raise UserError(f"no swept budget at {group_label(tokens, params)}: the CMR scaling law (Gu et al. Eq. 8, "
                            f"R_CMR(T) = alpha4 T^s4 + beta3) needs 3 or more budgets of that model size, the sweep has "
                            f"{len(same_size)}; sweep more --steps, or fit --law dcpt")
        budgets, critical = [], []
        for t, g in same_size:
            rec = _from_curves(self, t, params, tolerance, g["base_general"] if base_general is None else base_general,
                               extrapolated=False)
            if rec.replay is not None:
                budgets.append(t)
                critical.append(1.0 - rec.replay)
        if len(budgets) < 3:
            raise UserError("fewer than 3 swept budgets have a feasible ratio at this tolerance; Eq. 8 cannot be fitted")
        eq8 = fit_power_law(budgets, critical)
        ratio = float(np.clip(power_law(tokens, **eq8), 0.0, 1.0))
        base = same_size[0][1]["base_general"] if base_general is None else base_general
        return Recommendation(replay=1.0 - ratio, tokens=tokens, params=params,
                              allowed_rise=tolerance.allowed_rise(base), extrapolated=_outside(tokens, budgets),
                              how=f"CMR Eq. 8 over {len(budgets)} budgets: alpha4={eq8['alpha']:.6g} "
                                  f"s4={eq8['s']:.6g} beta3={eq8['beta']:.6g} (T in tokens)")

    def start(self) -> None:
        return None


class DCPTFit:
    """D-CPT law (Que et al. 2024), one surface per loss: general in r = replay, domain in r = 1 - replay."""

    law = "dcpt"

    def __init__(self, observations: list[Observation], start: dict | None = None):
        n = [o.params for o in observations]
        d = [o.tokens for o in observations]
        replay = np.array([o.replay for o in observations])
        self.general = fit_dcpt(n, d, replay, [o.general_loss for o in observations],
                                start=start and start["general"])
        self.domain = fit_dcpt(n, d, 1.0 - replay, [o.domain_loss for o in observations],
                               start=start and start["domain"])
        self.tokens_seen = sorted(set(d))
        self.params_seen = sorted(set(n))
        self.base_general = {p: float(np.mean([o.base_general_loss for o in observations if o.params == p]))
                             for p in self.params_seen}

    @property
    def coefficients(self) -> dict:
        return {"general": self.general, "domain": self.domain}

    def start(self) -> dict:
        return self.coefficients

    def _check_axes(self, tokens: float, params: float) -> None:
        for coef in (self.general, self.domain):
            if "A/N^alpha" in coef["not_identified"] and not _same(params, self.params_seen[0]):
                raise UserError(f"the sweep ran one model size (N={self.params_seen[0]:.4g}), so the law cannot say "
                                f"how loss moves with N; sweep two or more sizes to predict N={params:.4g}")
            if "D^beta" in coef["not_identified"] and not _same(tokens, self.tokens_seen[0]):
                raise UserError(f"the sweep ran one budget (D={self.tokens_seen[0]:.4g} tokens), so the law cannot "
                                f"say how loss moves with D; sweep two or more --steps to predict D={tokens:.4g}")

    def predict(self, replay, tokens: float, params: float) -> tuple[np.ndarray, np.ndarray]:
        self._check_axes(tokens, params)
        replay = np.asarray(replay, np.float64)
        general = {k: v for k, v in self.general.items() if k != "not_identified"}
        domain = {k: v for k, v in self.domain.items() if k != "not_identified"}
        return dcpt_loss(params, tokens, replay, **general), dcpt_loss(params, tokens, 1.0 - replay, **domain)

    def recommend(self, tokens: float, params: float, tolerance: Tolerance,
                  base_general: float | None = None) -> Recommendation:
        if base_general is None:
            base_general = next((b for p, b in self.base_general.items() if _same(p, params)), None)
            if base_general is None:
                raise UserError(f"no swept run has N={params:.4g}, so its base general loss is unknown; pass "
                                "--base-general-loss (the model's held-out general loss before CPT)")
        extrapolated = _outside(tokens, self.tokens_seen) or _outside(params, self.params_seen)
        return _from_curves(self, tokens, params, tolerance, base_general, extrapolated=extrapolated)


def _from_curves(law, tokens: float, params: float, tolerance: Tolerance, base_general: float,
                 *, extrapolated: bool) -> Recommendation:
    general, domain = law.predict(REPLAY_GRID, tokens, params)  # [ratios] each
    allowed = tolerance.allowed_rise(base_general)
    i = best_replay(REPLAY_GRID, general, domain, base_general, allowed)
    if i is None:
        return Recommendation(replay=None, tokens=tokens, params=params, allowed_rise=allowed,
                              extrapolated=extrapolated)
    return Recommendation(replay=float(REPLAY_GRID[i]), tokens=tokens, params=params, allowed_rise=allowed,
                          general_loss=float(general[i]), domain_loss=float(domain[i]),
                          general_rise=float(general[i] - base_general), extrapolated=extrapolated)


def fit_law(name: str, observations: list[Observation], start: dict | None = None):
    if not observations:
        raise FitError("no finished runs to fit; run `jaxcpt plan sweep` first")
    if name == "cmr":
        return CMRFit(observations)
    if name == "dcpt":
        return DCPTFit(observations, start=start)
    if name == "interp":
        from jaxcpt.plan.monotone import InterpolationFit

        return InterpolationFit(observations)
    raise UserError(f"unknown law {name!r}; choose cmr, dcpt or interp (or auto in plan fit)")


def _flatten(tree: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)):
            out[f"{prefix}{key}"] = float(value)
    return out


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """Percentiles (5, 50, 95) over refits on runs resampled with replacement."""

    coefficients: dict[str, tuple[float, float, float]]
    replay: tuple[float, float, float] | None
    samples: int  # refits that succeeded
    failed: int  # resamples too degenerate to fit (e.g. fewer than 3 distinct ratios)
    infeasible: int  # refits under which no ratio met the tolerance
    degenerate: int = 0  # resamples with no more distinct runs than parameters (exactly determined): not refitted
    requested: int = 0

    @property
    def enough(self) -> bool:
        """Whether the percentiles rest on enough non-degenerate refits to print (a fifth of those asked, >= 20)."""
        return self.samples >= max(20, self.requested // 5)


def bootstrap(name: str, observations: list[Observation], *, tokens: float, params: float, tolerance: Tolerance,
              base_general: float | None = None, samples: int = 200, seed: int = 0, full=None) -> Bootstrap:
    """Refit on ``samples`` resamples of the runs; resamples that cannot be fitted are counted, not hidden."""
    from jaxcpt.plan.heldout import is_degenerate_resample, parameters

    rng = np.random.default_rng(seed)
    start = full.start() if full is not None else None
    needed = parameters(full or fit_law(name, observations), tokens, params)
    values: dict[str, list[float]] = defaultdict(list)
    replays, failed, infeasible, degenerate = [], 0, 0, 0
    for _ in range(samples):
        pick = [observations[i] for i in rng.integers(0, len(observations), len(observations))]
        if is_degenerate_resample(name, pick, needed):  # it would fit exactly: a zero-width sample, not evidence
            degenerate += 1
            continue
        try:
            fitted = fit_law(name, pick, start=start)
            rec = fitted.recommend(tokens, params, tolerance, base_general)
        except UserError:
            failed += 1
            continue
        for key, value in _flatten(fitted.coefficients).items():
            values[key].append(value)
        if rec.replay is None:
            infeasible += 1
        else:
            replays.append(rec.replay)

    def pct(v):
        return tuple(float(x) for x in np.percentile(v, [5, 50, 95]))

    return Bootstrap(coefficients={k: pct(v) for k, v in values.items()}, replay=pct(replays) if replays else None,
                     samples=samples - failed - degenerate, failed=failed, infeasible=infeasible,
                     degenerate=degenerate, requested=samples)

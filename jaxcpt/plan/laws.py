"""Mixture laws of continual pretraining: their forms, fits to proxy runs, and the replay ratio they pick.

A proxy run continues a base model of ``N`` parameters for ``D`` tokens on a mixture whose
general (replay) share is ``r`` and domain share ``1 - r``; it ends with held-out losses
``L_gen`` and ``L_dom``, and its step-0 evaluation gives the base model's ``L_gen0``, ``L_dom0``.

CMR scaling law (Gu et al. 2024, "CMR Scaling Law: Predicting Critical Mixture Ratios for
Continual Pre-training of Language Models", arXiv:2407.17467), in the domain ratio ``R = 1 - r``:

- Sec. 5.1: at a fixed budget, each loss follows ``L(R) = alpha * R**s + beta``;
- Definitions 1-3: ``R`` is feasible when ``L_gen(R) <= L_gen0 + eps`` (Eq. 1); the critical
  mixture ratio (CMR) is the largest feasible ``R``;
- Eq. 8: over budgets ``T``, the CMR follows ``R_CMR(T) = alpha4 * T**s4 + beta3``.

The paper also asks the general loss to turn downwards along the trajectory (Definition 2);
the final-loss constraint of Eq. 1 is what proxy runs measure, so that is what is checked here.

D-CPT law (Que et al. 2024, "D-CPT Law: Domain-specific Continual Pre-Training Scaling Law for
Large Language Models", arXiv:2406.01375), with ``r`` the share of the corpus whose loss it is
(``r`` for the general loss, ``1 - r`` for the domain loss):

    L(N, D, r) = E + A / N**alpha + B * r**eta / D**beta + C / (r + eps)**gamma

Fits use variable projection: for fixed exponents the coefficients enter linearly and are
solved exactly (least squares; non-negative for D-CPT, whose terms are all penalties), so
the search runs only over the exponents. That makes fits of a handful of runs reproducible
instead of depending on where a general optimiser starts. Uncertainty comes from a bootstrap
over runs (``bootstrap``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize

from jaxcpt.errors import UserError

LAWS = ("cmr", "dcpt", "interp")  # interp: the monotone baseline (jaxcpt.plan.monotone)


class FitError(UserError):
    """Too few or too uniform runs to fit a law; the message says what the sweep lacks."""


@dataclasses.dataclass(frozen=True)
class Observation:
    """One finished proxy run."""

    run: str
    replay: float  # general (replay) share r of the trained tokens
    tokens: float  # CPT tokens trained, D
    params: float  # model parameters, N
    general_loss: float
    domain_loss: float
    base_general_loss: float  # step-0 evaluation: the model before continued pretraining
    base_domain_loss: float


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far the general loss may rise: ``value`` nats, or ``value`` times the base loss when relative."""

    value: float
    relative: bool = False

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """'0.05' = 0.05 nats (the CMR paper's epsilon); '3%' = 3% of the base general loss (D-CPT's usage)."""
        text = str(text).strip()
        relative = text.endswith("%")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            raise UserError(f"tolerance {text!r} must be a number of nats (0.05) or a percentage (3%)") from None
        if value < 0:
            raise UserError(f"tolerance must be >= 0, got {text!r}")
        return cls(value / 100 if relative else value, relative)

    def allowed_rise(self, base_general_loss: float) -> float:
        return self.value * base_general_loss if self.relative else self.value

    def __str__(self) -> str:
        return f"{100 * self.value:g}% of the base general loss" if self.relative else f"{self.value:g} nats"


# ---------------------------------------------------------------- the forms


def power_law(x, alpha: float, s: float, beta: float):
    """``alpha * x**s + beta``: CMR Sec. 5.1 (x = domain ratio R) and Eq. 8 (x = budget T)."""
    with np.errstate(divide="ignore"):  # x = 0 with s < 0 is an infinite loss, which callers rank last
        return alpha * np.asarray(x, np.float64) ** s + beta


def dcpt_loss(n, d, r, *, E, A, alpha, B, beta, eta, C, gamma, eps):  # noqa: N803 - the paper's names
    """The D-CPT law at model size ``n``, tokens ``d`` and share ``r`` of the loss's own corpus."""
    n, d, r = (np.asarray(v, np.float64) for v in (n, d, r))
    return E + A / n**alpha + B * r**eta / d**beta + C / (r + eps) ** gamma


# ---------------------------------------------------------------- fitting


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares ``alpha, s, beta`` of ``y = alpha * x**s + beta`` (needs 3 distinct x > 0)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if np.any(x <= 0):
        raise FitError("a power law in x needs x > 0")
    if len(np.unique(x)) < 3:
        raise FitError(f"a 3-parameter power law needs at least 3 distinct x values, got {sorted(set(x.tolist()))}")
    scale = float(np.exp(np.mean(np.log(x))))  # fit in x / scale: well-conditioned whatever the units
    xs = x / scale

    def solve(s: float) -> tuple[float, np.ndarray]:
        design = np.stack([xs**s, np.ones_like(xs)], axis=1)  # [points, 2]
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        return float(np.sum((design @ coef - y) ** 2)), coef

    grid = np.concatenate([np.linspace(-8, -0.02, 200), np.linspace(0.02, 12, 300)])
    sse = np.array([solve(s)[0] for s in grid])
    i = int(np.argmin(sse))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = optimize.minimize_scalar(lambda s: solve(s)[0], bounds=(lo, hi), method="bounded",
                                    options={"xatol": 1e-10})
    s = float(best.x) if best.fun <= sse[i] else float(grid[i])
    _, (a, b) = solve(s)
    return {"alpha": float(a) * scale ** (-s), "s": s, "beta": float(b)}


# D-CPT exponents searched over, with their bounds; the linear coefficients E, A, B, C are solved for.
_DCPT_BOUNDS = {"alpha": (0.0, 3.0), "beta": (0.0, 3.0), "eta": (0.0, 4.0), "gamma": (0.0, 4.0), "eps": (1e-4, 1.0)}
_DCPT_STARTS = {"alpha": (0.3,), "beta": (0.3,), "eta": (0.5, 2.0), "gamma": (0.3, 1.5), "eps": (0.01, 0.2)}


def fit_dcpt(n, d, r, y, *, start: dict | None = None) -> dict[str, float]:
    """D-CPT coefficients for losses ``y`` at (n, d, r); terms whose axis the runs do not vary are left out.

    With a single model size, ``A / N**alpha`` is indistinguishable from ``E`` and is dropped
    (``A = 0``); with a single budget, ``D**beta`` is a constant absorbed into ``B`` (``beta = 0``).
    The returned dict lists the dropped terms under ``"not_identified"``.
    """
    n, d, r, y = (np.asarray(v, np.float64) for v in (n, d, r, y))
    free = [k for k in ("alpha", "beta", "eta", "gamma", "eps")
            if not (k == "alpha" and len(np.unique(n)) == 1) and not (k == "beta" and len(np.unique(d)) == 1)]
    use_n = "alpha" in free
    n_linear = 4 if use_n else 3
    if len(y) < len(free) + n_linear:
        raise FitError(f"the D-CPT law has {len(free) + n_linear} free parameters here but the sweep has only "
                       f"{len(y)} runs; add ratios or budgets")
    if len(np.unique(r)) < 3:
        raise FitError(f"the D-CPT law needs at least 3 distinct mixture ratios, got {sorted(set(r.tolist()))}")
    n_ref, d_ref = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
    ns, ds = n / n_ref, d / d_ref

    def unpack(theta) -> dict[str, float]:
        values = {"alpha": 0.0, "beta": 0.0}
        values.update(zip(free, (float(t) for t in theta)))
        return values

    def design(values) -> np.ndarray:
        columns = [np.ones_like(y)]
        if use_n:
            columns.append(ns ** -values["alpha"])
        columns += [r ** values["eta"] * ds ** -values["beta"], (r + values["eps"]) ** -values["gamma"]]
        return np.stack(columns, axis=1)  # [points, linear terms]

    def residuals(theta) -> np.ndarray:
        x = design(unpack(theta))
        coef, _ = optimize.nnls(x, y)
        return x @ coef - y

    lower = [_DCPT_BOUNDS[k][0] for k in free]
    upper = [_DCPT_BOUNDS[k][1] for k in free]
    if start is not None:
        starts = [[float(np.clip(start[k], lo, hi)) for k, lo, hi in zip(free, lower, upper)]]
    else:
        starts = [list(t) for t in np.array(np.meshgrid(*[_DCPT_STARTS[k] for k in free])).T.reshape(-1, len(free))]
    best = None
    for theta0 in starts:
        result = optimize.least_squares(residuals, theta0, bounds=(lower, upper), x_scale="jac")
        if best is None or result.cost < best.cost:
            best = result
    values = unpack(best.x)
    coef, _ = optimize.nnls(design(values), y)
    E, rest = float(coef[0]), [float(c) for c in coef[1:]]
    A = rest.pop(0) if use_n else 0.0
    B, C = rest
    return {"E": E, "A": A * n_ref ** values["alpha"], "alpha": values["alpha"], "B": B * d_ref ** values["beta"],
            "beta": values["beta"], "eta": values["eta"], "C": C, "gamma": values["gamma"], "eps": values["eps"],
            "not_identified": [t for t, k in (("A/N^alpha", "alpha"), ("D^beta", "beta")) if k not in free]}


# ---------------------------------------------------------------- choosing the ratio


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """The replay ratio a law picks for one budget and model size (``replay`` None: none is feasible)."""

    replay: float | None
    tokens: float
    params: float
    allowed_rise: float
    general_loss: float | None = None  # predicted at ``replay`` (None where the law predicts no losses there)
    domain_loss: float | None = None
    general_rise: float | None = None
    extrapolated: bool = False
    how: str = "fitted curves"


REPLAY_GRID = np.linspace(0.0, 1.0, 1001)  # [ratios] candidates, 0.1% apart


def best_replay(replay, general, domain, base_general: float, allowed_rise: float) -> int | None:
    """Index of the ratio with the lowest domain loss among those whose general rise stays within the tolerance.

    Ties go to the smaller replay ratio (more domain data for the same predicted loss).
    """
    feasible = np.asarray(general) - base_general <= allowed_rise + 1e-12  # [ratios]
    if not feasible.any():
        return None
    order = np.lexsort((np.asarray(replay), np.where(feasible, np.asarray(domain), np.inf)))
    return int(order[0])

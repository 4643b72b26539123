"""Mixture laws: published numbers reproduced, known coefficients recovered, the ratio chosen, the bootstrap."""

import numpy as np
import pytest

from jaxcpt.errors import UserError
from jaxcpt.plan.fitted import bootstrap, fit_law
from jaxcpt.plan.laws import (
    REPLAY_GRID,
    Observation,
    Tolerance,
    best_replay,
    dcpt_loss,
    fit_dcpt,
    fit_power_law,
    power_law,
)

# Gu et al. 2024, "CMR Scaling Law" (EMNLP 2024, arXiv:2407.17467v2), Table 5: the CMR scaling law
# R_CMR(T) = alpha4 * T**s4 + beta3 (Eq. 8) per model size, T in units of 0.2B tokens (T = 100 is
# the 20B-token CPT budget). Provenance: the search store holds the v1 text of the paper, which
# has Eq. 8 but not this table; the coefficients below are as transcribed from the v2 table in a
# public repository (search-store file 71375411327). The ratios they must give are printed in the
# stored v1 text itself: Sec. 5.3 "29.8%, 34.9%, 41.4% and 47.8%" and Key Results "29.76% for the
# 460M model to 34.89% for the 940M model".
CMR_TABLE5 = {  # size: (alpha4, s4, beta3)
    "460M": (0.22524761, 0.26944345, -0.48139982),
    "940M": (0.7520627, 0.13720245, -1.06581937),
    "1.6B": (-2.36384831, -0.15125569, 1.59223649),
    "3.1B": (-2.5368197, -0.42071423, 0.84375368),
}
CMR_PUBLISHED_PCT = {"460M": 29.8, "940M": 34.9, "1.6B": 41.4, "3.1B": 47.8}  # Sec. 5.3, T_max = 20B tokens
CMR_KEY_RESULTS_PCT = {"460M": 29.76, "940M": 34.89}  # Sec. 2, two decimals

# Que et al. 2024, "D-CPT Law" (NeurIPS 2024, arXiv:2406.01375), Table 5 (Usage 1, trade-off between
# general and domain abilities: chemistry, Qwen1.5-1.8B, D0 = 10B tokens, the general loss may rise
# at most 3% over the base model's 2.8602): real validation losses at domain ratios r_d around the
# optimum r_d = 0.924 that the paper's fitted law predicts. The paper does not print its fitted
# D-CPT coefficients in anything the search store holds; these losses are as transcribed from the
# table in the same public repository, and an independent summary of the paper (search-store file
# 6637731042) confirms the table's optimum 0.924 and the 3% threshold.
DCPT_TABLE5_RD = [0.9, 0.91, 0.92, 0.924, 0.93, 0.94, 1.0]
DCPT_TABLE5_LG = [2.9052, 2.9193, 2.9376, 2.9445, 2.9644, 2.9848, 3.4667]
DCPT_TABLE5_LD = [1.7321, 1.7312, 1.7311, 1.7291, 1.7279, 1.7265, 1.7220]
DCPT_BASE_GENERAL = 2.8602
DCPT_PUBLISHED_RD = 0.924


def test_cmr_table5_coefficients_give_the_published_critical_ratios():
    for size, (alpha4, s4, beta3) in CMR_TABLE5.items():
        pct = 100 * float(power_law(100.0, alpha4, s4, beta3))
        assert abs(pct - CMR_PUBLISHED_PCT[size]) < 0.05, (size, pct)
        if size in CMR_KEY_RESULTS_PCT:
            assert abs(pct - CMR_KEY_RESULTS_PCT[size]) < 0.005, (size, pct)


def test_cmr_eq8_fit_recovers_table5_coefficients_from_its_own_curve():
    # Budgets as the paper swept them (T = 10 ... 100, i.e. 2B to 20B tokens), noise-free.
    budgets = np.array([10.0, 25.0, 50.0, 75.0, 100.0])
    for size, (alpha4, s4, beta3) in CMR_TABLE5.items():
        fitted = fit_power_law(budgets, power_law(budgets, alpha4, s4, beta3))
        assert fitted["s"] == pytest.approx(s4, rel=1e-4), size
        assert 100 * float(power_law(100.0, **fitted)) == pytest.approx(CMR_PUBLISHED_PCT[size], abs=0.05)


def test_tolerance_rule_on_dcpt_table5_losses_picks_the_published_ratio():
    replay = 1.0 - np.array(DCPT_TABLE5_RD)  # the general share
    tolerance = Tolerance.parse("3%")
    i = best_replay(replay, DCPT_TABLE5_LG, DCPT_TABLE5_LD, DCPT_BASE_GENERAL,
                    tolerance.allowed_rise(DCPT_BASE_GENERAL))
    assert DCPT_TABLE5_RD[i] == DCPT_PUBLISHED_RD


def test_dcpt_fit_of_table5_losses_reproduces_the_published_optimal_ratio():
    rd = np.array(DCPT_TABLE5_RD)
    n, d = np.full(rd.shape, 1.8e9), np.full(rd.shape, 10e9)
    general = fit_dcpt(n, d, 1.0 - rd, DCPT_TABLE5_LG)
    domain = fit_dcpt(n, d, rd, DCPT_TABLE5_LD)
    assert set(general["not_identified"]) == {"A/N^alpha", "D^beta"}  # one model size, one budget
    drop = "not_identified"
    lg = dcpt_loss(1.8e9, 10e9, REPLAY_GRID, **{k: v for k, v in general.items() if k != drop})
    ld = dcpt_loss(1.8e9, 10e9, 1.0 - REPLAY_GRID, **{k: v for k, v in domain.items() if k != drop})
    i = best_replay(REPLAY_GRID, lg, ld, DCPT_BASE_GENERAL, 0.03 * DCPT_BASE_GENERAL)
    assert 1.0 - REPLAY_GRID[i] == pytest.approx(DCPT_PUBLISHED_RD, abs=0.005)


# Synthetic sweeps: (replay, loss) from a known law plus Gaussian noise of the size proxy-run
# evaluations show (1e-3 to 2e-3 nats), three seeds per ratio.
CMR_GENERAL = {"alpha": 0.6, "s": 4.0, "beta": 3.7}  # rises steeply as the domain ratio R -> 1
CMR_DOMAIN = {"alpha": 0.4, "s": -1.0, "beta": 1.8}
RATIOS = np.array([0.0, 0.05, 0.1, 0.2, 0.25, 0.35, 0.5, 0.75])


def synthetic_cmr_sweep(noise: float, seed: int = 0, tokens: float = 1e6, replicas: int = 3,
                        general=CMR_GENERAL, domain=CMR_DOMAIN) -> list[Observation]:
    rng = np.random.default_rng(seed)
    base_general = power_law(1.0, **general) - general["alpha"]  # the loss with no domain data at all
    obs = []
    for k in range(replicas):
        for r in RATIOS:
            obs.append(Observation(
                run=f"r{r:g}-{k}", replay=float(r), tokens=tokens, params=1e6,
                general_loss=float(power_law(1 - r, **general) + rng.normal(0, noise)),
                domain_loss=float(power_law(1 - r, **domain) + rng.normal(0, noise)),
                base_general_loss=float(base_general), base_domain_loss=3.0))
    return obs


def test_cmr_fit_recovers_known_coefficients_from_a_noisy_sweep():
    fitted = fit_law("cmr", synthetic_cmr_sweep(noise=2e-3))
    (group,) = fitted.groups.values()
    # Tolerance: 10% on alpha and s, 0.02 nats on beta, at 2e-3 nats of noise.
    for got, want in ((group["general"], CMR_GENERAL), (group["domain"], CMR_DOMAIN)):
        assert got["alpha"] == pytest.approx(want["alpha"], rel=0.10)
        assert got["s"] == pytest.approx(want["s"], rel=0.10)
        assert got["beta"] == pytest.approx(want["beta"], abs=0.02)


def test_cmr_fit_leaves_out_the_endpoints_as_the_paper_does():
    obs = synthetic_cmr_sweep(noise=0.0, replicas=1)
    inner = fit_law("cmr", [o for o in obs if 0 < o.replay < 1])
    # a run without replay far off the power law (a much stronger shift at R = 1) changes nothing
    off = [o if o.replay > 0 else Observation(**{**o.__dict__, "general_loss": o.general_loss + 1.0}) for o in obs]
    fitted = fit_law("cmr", off)
    assert fitted.left_out == ["r0-0"]
    assert fitted.coefficients == inner.coefficients


def true_cmr_replay(tolerance: float) -> float:
    base = CMR_GENERAL["beta"]
    g = power_law(1 - REPLAY_GRID, **CMR_GENERAL)
    d = power_law(1 - REPLAY_GRID, **CMR_DOMAIN)
    return float(REPLAY_GRID[best_replay(REPLAY_GRID, g, d, base, tolerance)])


def test_cmr_recommendation_and_bootstrap_interval_cover_the_true_ratio():
    obs = synthetic_cmr_sweep(noise=2e-3, seed=1)
    fitted = fit_law("cmr", obs)
    tol = Tolerance(0.1)
    rec = fitted.recommend(1e6, 1e6, tol)
    truth = true_cmr_replay(0.1)  # the smallest replay whose rise is <= 0.1 nats: 1 - (0.1/0.6)**(1/4)
    assert rec.replay == pytest.approx(truth, abs=0.01)
    assert not rec.extrapolated
    boot = bootstrap("cmr", obs, tokens=1e6, params=1e6, tolerance=tol, samples=60, seed=0, full=fitted)
    lo, mid, hi = boot.replay
    assert lo <= truth <= hi and hi - lo < 0.1
    assert boot.samples + boot.failed == 60
    lo_s, _, hi_s = boot.coefficients["D=1e+06 N=1e+06.general.s"]
    assert lo_s <= CMR_GENERAL["s"] <= hi_s


def test_best_replay_takes_the_largest_domain_gain_within_the_tolerance():
    replay = np.array([0.0, 0.1, 0.2, 0.3])
    general = np.array([3.5, 3.2, 3.1, 3.05])  # base 3.0: rises 0.5, 0.2, 0.1, 0.05
    domain = np.array([1.0, 1.1, 1.2, 1.3])
    assert best_replay(replay, general, domain, 3.0, 0.15) == 2
    assert best_replay(replay, general, domain, 3.0, 0.01) is None
    # a domain loss that is not monotone: the best gain wins, not the smallest replay
    assert best_replay(replay, general, np.array([1.0, 1.4, 1.2, 1.1]), 3.0, 0.25) == 3


def test_tolerance_reads_nats_or_percent():
    assert Tolerance.parse("0.05").allowed_rise(3.0) == pytest.approx(0.05)
    assert Tolerance.parse("3%").allowed_rise(3.0) == pytest.approx(0.09)
    with pytest.raises(UserError, match="percentage"):
        Tolerance.parse("three")


def test_cmr_other_budget_needs_three_budgets_and_is_marked_extrapolated():
    two = synthetic_cmr_sweep(1e-3, tokens=1e6) + synthetic_cmr_sweep(1e-3, tokens=2e6, seed=2)
    with pytest.raises(UserError, match="3 or more budgets"):
        fit_law("cmr", two).recommend(8e6, 1e6, Tolerance(0.1))
    # Later budgets tolerate more domain data (the general rise shrinks), as in the paper's Fig. 5.
    sweeps = []
    for k, tokens in enumerate((1e6, 2e6, 4e6)):
        general = {**CMR_GENERAL, "alpha": CMR_GENERAL["alpha"] * (tokens / 1e6) ** -0.3}
        sweeps += synthetic_cmr_sweep(1e-3, seed=k, tokens=tokens, general=general)
    fitted = fit_law("cmr", sweeps)
    inside = fitted.recommend(4e6, 1e6, Tolerance(0.1))
    beyond = fitted.recommend(16e6, 1e6, Tolerance(0.1))
    assert not inside.extrapolated and beyond.extrapolated
    assert "Eq. 8" in beyond.how and beyond.general_loss is None  # the ratio only, no loss curves
    assert beyond.replay < inside.replay


DCPT_GENERAL = dict(E=1.8, A=300.0, alpha=0.35, B=40.0, beta=0.3, eta=0.6, C=0.05, gamma=0.8, eps=0.02)
DCPT_DOMAIN = dict(E=1.2, A=200.0, alpha=0.3, B=30.0, beta=0.28, eta=0.5, C=0.08, gamma=0.6, eps=0.05)
# Ratios near both ends: the C / (r + eps)**gamma term of each loss shows only where its corpus is scarce.
DCPT_RATIOS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 1.0)


def synthetic_dcpt_sweep(noise, sizes=(1e6, 4e6, 1.6e7), budgets=(1e6, 4e6, 1.6e7), seed=0) -> list[Observation]:
    rng = np.random.default_rng(seed)
    obs = []
    for n in sizes:
        for d in budgets:
            for r in DCPT_RATIOS:
                obs.append(Observation(
                    run=f"n{n:g}-d{d:g}-r{r:g}", replay=r, tokens=d, params=n,
                    general_loss=float(dcpt_loss(n, d, r, **DCPT_GENERAL) + rng.normal(0, noise)),
                    domain_loss=float(dcpt_loss(n, d, 1 - r, **DCPT_DOMAIN) + rng.normal(0, noise)),
                    base_general_loss=float(dcpt_loss(n, 1e12, 1.0, **DCPT_GENERAL)), base_domain_loss=4.0))
    return obs


@pytest.mark.parametrize("seed", [0, 1])
def test_dcpt_fit_recovers_known_coefficients_from_a_noisy_sweep(seed):
    fitted = fit_law("dcpt", synthetic_dcpt_sweep(noise=1e-3, seed=seed))
    # Tolerance at 1e-3 nats of noise (3 sizes x 3 budgets x 12 ratios): the exponents alpha, beta, eta
    # within 5%, every other coefficient within 15%. C, gamma and eps trade off against each other
    # (they shape the same small-ratio corner), so they are the loosest; over seeds 0-5 the worst
    # was 12% (domain C).
    for got, want in ((fitted.general, DCPT_GENERAL), (fitted.domain, DCPT_DOMAIN)):
        for key, value in want.items():
            rel = 0.05 if key in ("alpha", "beta", "eta") else 0.15
            assert got[key] == pytest.approx(value, rel=rel), (key, got[key], value)


def test_dcpt_predicts_a_larger_budget_marked_extrapolated():
    obs = synthetic_dcpt_sweep(noise=1e-3, sizes=(1e6,), budgets=(1e6, 2e6, 4e6))
    fitted = fit_law("dcpt", obs)
    assert fitted.general["not_identified"] == ["A/N^alpha"]
    tol = Tolerance(0.3)
    base = obs[0].base_general_loss
    rec = fitted.recommend(16e6, 1e6, tol)
    assert rec.extrapolated
    g = dcpt_loss(1e6, 16e6, REPLAY_GRID, **DCPT_GENERAL)
    d = dcpt_loss(1e6, 16e6, 1 - REPLAY_GRID, **DCPT_DOMAIN)
    truth = float(REPLAY_GRID[best_replay(REPLAY_GRID, g, d, base, 0.3)])
    assert 0.0 < truth < 1.0  # an interior optimum: the tolerance and the domain loss both matter
    assert rec.replay == pytest.approx(truth, abs=0.02)
    with pytest.raises(UserError, match="one model size"):
        fitted.predict([0.1], 4e6, 7e6)


def test_fits_say_what_the_sweep_lacks():
    two_ratios = [o for o in synthetic_cmr_sweep(1e-3) if o.replay in (0.0, 0.1)]
    with pytest.raises(UserError, match="3 distinct"):
        fit_law("cmr", two_ratios)
    with pytest.raises(UserError, match="free parameters"):
        fit_law("dcpt", synthetic_cmr_sweep(1e-3, replicas=1)[:4])


def test_dcpt_predicts_a_larger_model_marked_extrapolated():
    obs = synthetic_dcpt_sweep(noise=1e-3)
    fitted = fit_law("dcpt", obs)
    n, d = 6.4e7, 1.6e7  # four times the largest swept model
    base = float(dcpt_loss(n, 1e12, 1.0, **DCPT_GENERAL))
    with pytest.raises(UserError, match="--base-general-loss"):
        fitted.recommend(d, n, Tolerance(0.3))  # no swept run tells the base loss of that size
    rec = fitted.recommend(d, n, Tolerance(0.3), base_general=base)
    assert rec.extrapolated
    g = dcpt_loss(n, d, REPLAY_GRID, **DCPT_GENERAL)
    dom = dcpt_loss(n, d, 1 - REPLAY_GRID, **DCPT_DOMAIN)
    assert rec.replay == pytest.approx(float(REPLAY_GRID[best_replay(REPLAY_GRID, g, dom, base, 0.3)]), abs=0.02)

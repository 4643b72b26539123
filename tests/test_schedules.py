"""Learning-rate schedules against closed-form values written out here, not taken from the code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcpt.config import ConfigError, from_dict
from jaxcpt.optim.config import OptimConfig, ScheduleConfig
from jaxcpt.optim.schedules import build_schedule, first_step_below, peak_lr, phase_boundaries

TOTAL = 1000
PEAK = 1e-3
MIN = 0.1 * PEAK  # min_lr_ratio default


def lrs(cfg: ScheduleConfig, steps, total=TOTAL) -> np.ndarray:
    schedule = build_schedule(cfg, total)
    return np.array([float(schedule(s)) for s in steps])


def cosine(start, end, t, length):
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t, length) / length))


def linear(start, end, t, length):
    return start + (end - start) * min(t, length) / length


def one_minus_sqrt(start, end, t, length):
    return end + (start - end) * (1 - math.sqrt(min(t, length) / length))


def around(*boundaries):
    """Each boundary with its neighbours: where off-by-one mistakes live."""
    return sorted({s for b in boundaries for s in (b - 1, b, b + 1) if s >= 0})


def check(cfg, expected, steps, total=TOTAL):
    got = lrs(cfg, steps, total)
    want = np.array([expected(s) for s in steps])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-12, err_msg=f"steps {steps}")


def assert_monotone(cfg, lo, hi, increasing, total=TOTAL):
    values = np.asarray(build_schedule(cfg, total)(jnp.arange(lo, hi + 1)))
    diffs = np.diff(values)
    assert (diffs >= -1e-12).all() if increasing else (diffs <= 1e-12).all()


# --- every kind, at and around each boundary ---------------------------------------------------


def test_warmup_cosine_matches_closed_form():
    cfg = ScheduleConfig(kind="warmup_cosine", peak_lr=PEAK, warmup_steps=100)

    def expected(s):
        return PEAK * s / 100 if s < 100 else cosine(PEAK, MIN, s - 100, 900)

    check(cfg, expected, around(0, 100, 550, 1000) + [1500])
    assert_monotone(cfg, 0, 100, increasing=True)
    assert_monotone(cfg, 100, 1000, increasing=False)
    assert lrs(cfg, [1000, 5000]).tolist() == pytest.approx([MIN, MIN])


def test_warmup_fraction_and_default_warmup_resolve_to_steps():
    by_fraction = ScheduleConfig(peak_lr=PEAK, warmup_fraction=0.05)  # 50 steps of 1000
    check(by_fraction, lambda s: PEAK * s / 50 if s < 50 else cosine(PEAK, MIN, s - 50, 950), around(50))
    default = ScheduleConfig(peak_lr=PEAK)  # neither given: 1% of the run
    check(default, lambda s: PEAK * s / 10 if s < 10 else cosine(PEAK, MIN, s - 10, 990), around(10))


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_rewarm_starts_from_base_lr_and_redecays(shape):
    start, peak = 3e-5, 3e-4
    cfg = ScheduleConfig(kind="rewarm", peak_lr=peak, warmup_start_lr=start, warmup_steps=200, decay_shape=shape)
    decay = {"linear": linear, "cosine": cosine}[shape]

    def expected(s):
        return linear(start, peak, s, 200) if s < 200 else decay(peak, 0.1 * peak, s - 200, 800)

    check(cfg, expected, around(0, 200, 600, 1000))
    assert lrs(cfg, [0])[0] == pytest.approx(start, rel=1e-6)
    assert_monotone(cfg, 0, 200, increasing=True)
    assert_monotone(cfg, 200, 1000, increasing=False)


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt"])
def test_wsd_warmup_stable_decay(shape):
    cfg = ScheduleConfig(kind="wsd", peak_lr=PEAK, warmup_steps=100, decay_fraction=0.2, decay_shape=shape)
    decay = {"linear": linear, "cosine": cosine, "1-sqrt": one_minus_sqrt}[shape]

    def expected(s):
        if s < 100:
            return PEAK * s / 100
        if s < 800:
            return PEAK
        return decay(PEAK, MIN, s - 800, 200)

    check(cfg, expected, around(0, 100, 450, 800, 900, 1000))
    assert_monotone(cfg, 800, 1000, increasing=False)
    assert phase_boundaries(cfg, TOTAL) == [("warmup", 0), ("stable", 100), ("decay", 800), ("end", 1000)]


@pytest.mark.parametrize("anneal_shape", ["linear", "exponential"])
@pytest.mark.parametrize("cooldown_shape", ["cosine", "linear"])
def test_infinite_warmup_cooldown_constant_anneal(cooldown_shape, anneal_shape):
    const = 0.5 * PEAK
    cfg = ScheduleConfig(
        kind="infinite", peak_lr=PEAK, warmup_steps=100, cooldown_steps=100, decay_shape=cooldown_shape,
        constant_lr_ratio=0.5, anneal_start_step=600, anneal_shape=anneal_shape,
    )  # fmt: skip
    cooldown = {"linear": linear, "cosine": cosine}[cooldown_shape]

    def expected(s):
        if s < 100:
            return PEAK * s / 100
        if s < 200:
            return cooldown(PEAK, const, s - 100, 100)
        if s < 600:
            return const
        t = min(s - 600, 400)
        return linear(const, MIN, t, 400) if anneal_shape == "linear" else const * (MIN / const) ** (t / 400)

    check(cfg, expected, around(0, 100, 150, 200, 600, 800, 1000))
    assert_monotone(cfg, 100, 1000, increasing=False)
    assert phase_boundaries(cfg, TOTAL) == [("warmup", 0), ("cooldown", 100), ("constant", 200), ("anneal", 600), ("end", 1000)]


def test_infinite_anneal_branches_agree_with_constant_phase_until_they_start():
    def infinite(anneal_start):
        return ScheduleConfig(
            kind="infinite", peak_lr=PEAK, warmup_steps=50, cooldown_steps=50, anneal_start_step=anneal_start
        )

    early, late = infinite(400), infinite(700)
    steps = jnp.arange(TOTAL + 1)
    lr_early, lr_late = np.asarray(build_schedule(early, TOTAL)(steps)), np.asarray(build_schedule(late, TOTAL)(steps))
    np.testing.assert_array_equal(lr_early[:400], lr_late[:400])  # bit-identical up to the branch point
    assert (lr_late[100:700] == lr_late[100]).all()  # the late run is still constant where the early one anneals
    assert lr_early[401] < lr_late[401]
    assert lr_early[TOTAL] == pytest.approx(MIN, rel=1e-6) and lr_late[TOTAL] == pytest.approx(MIN, rel=1e-6)


def test_infinite_short_anneal_then_holds_the_minimum():
    cfg = ScheduleConfig(
        kind="infinite", peak_lr=PEAK, warmup_steps=100, cooldown_steps=100, anneal_start_fraction=0.6, anneal_steps=100
    )
    def expected(s):
        return 0.5 * PEAK if s < 600 else linear(0.5 * PEAK, MIN, s - 600, 100) if s < 700 else MIN

    check(cfg, expected, around(600, 650, 700, 1000))
    assert phase_boundaries(cfg, TOTAL)[-3:] == [("anneal", 600), ("final", 700), ("end", 1000)]


def test_infinite_without_anneal_stays_constant_past_the_run():
    cfg = ScheduleConfig(kind="infinite", peak_lr=PEAK, warmup_steps=10, cooldown_fraction=0.05, constant_lr_ratio=0.3)
    check(cfg, lambda s: 0.3 * PEAK, [60, 61, 999, 1000, 10**6])
    assert [name for name, _ in phase_boundaries(cfg, TOTAL)] == ["warmup", "cooldown", "constant", "end"]


def test_constant_and_inverse_sqrt():
    constant = ScheduleConfig(kind="constant", peak_lr=PEAK, warmup_steps=20, min_lr_ratio=0.1)
    check(constant, lambda s: PEAK * s / 20 if s < 20 else PEAK, around(0, 20, 1000))
    inverse = ScheduleConfig(kind="inverse_sqrt", peak_lr=PEAK, warmup_steps=100)
    # the textbook form, peak * sqrt(warmup / step) after the warmup
    check(inverse, lambda s: PEAK * s / 100 if s < 100 else PEAK * math.sqrt(100 / s), around(0, 100, 400, 1000))
    assert_monotone(inverse, 100, 1000, increasing=False)


def test_optimizer_warmup_holds_zero_then_shifts_the_schedule():
    cfg = ScheduleConfig(peak_lr=PEAK, warmup_steps=100, optimizer_warmup_steps=50)

    def expected(s):
        if s < 50:
            return 0.0
        s -= 50
        return PEAK * s / 100 if s < 100 else cosine(PEAK, MIN, s - 100, 850)  # decay fills the rest of the run

    check(cfg, expected, around(0, 50, 150, 1000))
    assert phase_boundaries(cfg, TOTAL) == [("optimizer_warmup", 0), ("warmup", 50), ("decay", 150), ("end", 1000)]


@pytest.mark.parametrize("kind", ["warmup_cosine", "rewarm", "wsd", "infinite", "constant", "inverse_sqrt"])
def test_every_kind_is_continuous_at_its_boundaries(kind):
    extra = {"infinite": {"anneal_start_fraction": 0.6}}.get(kind, {})
    cfg = ScheduleConfig(kind=kind, peak_lr=PEAK, warmup_fraction=0.1, **extra)
    values = np.asarray(build_schedule(cfg, TOTAL)(jnp.arange(TOTAL + 1)))
    # Phases here are >= 100 steps, so no single step may move the lr by more than ~2% of the peak.
    assert np.abs(np.diff(values)).max() < 0.02 * PEAK


def test_zero_length_phases_are_the_only_jumps():
    no_warmup = ScheduleConfig(peak_lr=PEAK, warmup_steps=0)
    assert lrs(no_warmup, [0])[0] == pytest.approx(PEAK, rel=1e-6)
    no_cooldown = ScheduleConfig(kind="infinite", peak_lr=PEAK, warmup_steps=100, cooldown_steps=0, constant_lr_ratio=0.5)
    assert lrs(no_cooldown, [99, 100]).tolist() == pytest.approx([PEAK * 0.99, 0.5 * PEAK], rel=1e-6)


def test_schedule_is_jittable_and_takes_python_ints_and_arrays():
    schedule = build_schedule(ScheduleConfig(kind="wsd", peak_lr=PEAK, warmup_steps=100), TOTAL)
    jitted = jax.jit(schedule)
    for step in (0, 57, 100, 850, 1000):
        eager = schedule(step)
        assert isinstance(eager, jax.Array) and eager.shape == () and eager.dtype == jnp.float32
        assert float(jitted(jnp.int32(step))) == pytest.approx(float(eager), rel=1e-6)
    assert schedule(jnp.arange(5)).shape == (5,)
    only_constant = build_schedule(ScheduleConfig(kind="constant", peak_lr=PEAK, warmup_steps=0), TOTAL)
    assert only_constant(jnp.arange(3)).shape == (3,)


# --- helpers the rest of the stack reads ---------------------------------------------------------


def test_first_step_below_counts_only_after_the_peak():
    cfg = ScheduleConfig(peak_lr=PEAK, warmup_steps=100)
    schedule = build_schedule(cfg, TOTAL)
    # warmup steps are below half the peak too, but come before it: they must not count
    want = next(s for s in range(100, TOTAL) if cosine(PEAK, MIN, s - 100, 900) < 0.5 * PEAK)
    assert first_step_below(schedule, 0.5, peak_lr(cfg), TOTAL) == want
    assert first_step_below(schedule, 0.05, PEAK, TOTAL) is None  # never below the 10% floor
    constant = build_schedule(ScheduleConfig(kind="constant", peak_lr=PEAK, warmup_steps=10), TOTAL)
    assert first_step_below(constant, 0.9, PEAK, TOTAL) is None


def test_peak_lr_reads_the_config():
    assert peak_lr(ScheduleConfig(peak_lr=2e-4)) == 2e-4


# --- configs that cannot work fail with a message that says why ---------------------------------


@pytest.mark.parametrize(
    "schedule, total, message",
    [
        ({"warmup_steps": 10, "warmup_fraction": 0.1}, TOTAL, r"warmup_steps=10 and warmup_fraction=0.1 both given; keep one"),
        (
            {"kind": "wsd", "warmup_fraction": 0.5, "decay_fraction": 0.6},
            TOTAL,
            r"fractions add up to more than the run: warmup_fraction=0.5 \+ decay_fraction=0.6 > 1",
        ),
        (
            {"kind": "wsd", "warmup_steps": 900, "decay_steps": 200},
            TOTAL,
            r"schedule phases warmup \(900\) \+ decay \(200\) = 1100 steps exceed the run of total_steps=1000",
        ),
        (
            {"kind": "infinite", "anneal_start_step": 1200},
            TOTAL,
            r"anneal_start_step=1200 is beyond the run of total_steps=1000",
        ),
        (
            {"kind": "infinite", "warmup_steps": 100, "cooldown_steps": 100, "anneal_start_step": 150},
            TOTAL,
            r"anneal_start_step=150 falls before the constant phase, which starts at step 200",
        ),
        (
            {"kind": "infinite", "cooldown_fraction": 0.3, "anneal_start_fraction": 0.2},
            TOTAL,
            r"anneal_start_fraction=0.2 \(step 200\) falls before the constant phase, which starts at step 310",
        ),
        (
            {"kind": "infinite", "anneal_start_fraction": 0.7, "anneal_fraction": 0.4},
            TOTAL,
            r"anneal ends after the run: anneal_start_fraction=0.7 \+ anneal_fraction=0.4 > 1",
        ),
        ({"decay_fraction": 0.2}, TOTAL, r"decay_fraction is set but kind 'warmup_cosine' does not read it \(only 'wsd' do\)"),
        ({"kind": "warmup_cosine", "decay_shape": "linear"}, TOTAL, r"use kind 'rewarm' for decay_shape"),
        ({"kind": "infinite", "anneal_start_step": 500, "anneal_shape": "exponential", "min_lr_ratio": 0.0}, TOTAL,
         r"exponential' needs min_lr_ratio > 0"),  # fmt: skip
        ({"warmup_start_lr": 1e-3, "peak_lr": 1e-4}, TOTAL, r"warmup_start_lr \(0.001\) must be in \[0, peak_lr=0.0001\]"),
        ({"optimizer_warmup_steps": 1001}, TOTAL, r"optimizer_warmup \(1001\) .* exceed the run of total_steps=1000"),
    ],
)
def test_bad_schedule_configs_raise_clear_errors(schedule, total, message):
    with pytest.raises(ConfigError, match=message):
        cfg = from_dict(OptimConfig, {"schedule": schedule}, prefix="optim").schedule
        build_schedule(cfg, total)


def test_config_errors_name_the_section_they_come_from():
    with pytest.raises(ConfigError, match=r"^optim.schedule: warmup_steps=5 and warmup_fraction=0.2 both given"):
        from_dict(OptimConfig, {"schedule": {"warmup_steps": 5, "warmup_fraction": 0.2}}, prefix="optim")
    with pytest.raises(ConfigError, match=r"did you mean 'wsd'"):
        from_dict(OptimConfig, {"schedule": {"kind": "wds"}}, prefix="optim")

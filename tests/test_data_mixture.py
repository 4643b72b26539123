"""Mixture weights: realised token shares, stage changes, ramps, LR-triggered stages."""

import numpy as np
import pytest
from test_data_fixtures import data_config, random_token_docs, take, write_token_shards

from jaxcpt.config import ConfigError
from jaxcpt.data.mixture import WeightSchedule, first_step_below
from jaxcpt.data.pipeline import build_train_iterator


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    # Different document lengths per source, so counting rows or documents would miss a token target.
    return {
        "domain": str(write_token_shards(str(root / "domain"), random_token_docs(300, 1, min_len=5, max_len=40))),
        "replay": str(write_token_shards(str(root / "replay"), random_token_docs(300, 2, min_len=30, max_len=200))),
        "code": str(write_token_shards(str(root / "code"), random_token_docs(300, 3, min_len=2, max_len=15))),
    }


def _cfg(shards, weights: dict, **kw):
    sources = [{"name": n, "paths": [shards[n]], "weight": w} for n, w in weights.items()]
    return data_config(sources=sources, seq_len=64, shuffle_buffer=64, packing_bins=8, **kw)


def _token_shares(batches, num_sources: int) -> np.ndarray:
    tokens = np.zeros(num_sources)
    for b in batches:
        np.add.at(tokens, b["source"], b["loss_mask"].sum(axis=1))
    return tokens / tokens.sum()


@pytest.mark.parametrize("weights", [{"domain": 0.95, "replay": 0.05}, {"domain": 0.5, "replay": 0.3, "code": 0.2}])
def test_realised_token_shares_within_one_point_over_10000_rows(shards, weights):
    it = build_train_iterator(_cfg(shards, weights), batch_size=100, process_index=0, process_count=1)
    batches = take(it, 100)  # 10,000 rows; the sources repeat many times (new shuffle each epoch)
    shares = _token_shares(batches, len(weights))
    target = np.array(list(weights.values()))
    assert np.abs(shares - target).max() < 0.01, (shares, target)


@pytest.mark.parametrize("count", ["rows", "documents"])
def test_weights_can_count_rows_or_documents_instead_of_tokens(shards, count):
    cfg = _cfg(shards, {"domain": 0.5, "code": 0.5}, weights_count=count)
    batches = take(build_train_iterator(cfg, batch_size=50, process_index=0, process_count=1), 20)
    units = np.zeros(2)
    for b in batches:  # a row counts 1, or the number of document pieces in it
        np.add.at(units, b["source"], 1 if count == "rows" else b["segment_ids"].max(axis=1))
    assert abs(units[0] / units.sum() - 0.5) < 0.01


def test_new_weights_hold_right_after_a_stage_change(shards):
    cfg = _cfg(shards, {"domain": 0.95, "replay": 0.05}, stages=[[40, {"domain": 0.5, "replay": 0.5}]])
    it = build_train_iterator(cfg, batch_size=100, process_index=0, process_count=1)
    batches = take(it, 80)
    assert abs(_token_shares(batches[:40], 2)[1] - 0.05) < 0.01
    # No "catching up" on the old mixture: the first batches after the change already mix 50/50.
    assert abs(_token_shares(batches[40:42], 2)[1] - 0.5) < 0.02
    assert abs(_token_shares(batches[40:], 2)[1] - 0.5) < 0.01


def test_source_with_zero_weight_in_a_stage_is_not_read(shards):
    cfg = _cfg(shards, {"domain": 0.5, "replay": 0.5}, stages=[{"step": 3, "weights": {"domain": 1.0}}])
    it = build_train_iterator(cfg, batch_size=10, process_index=0, process_count=1)
    batches = take(it, 6)
    assert all((b["source"] == 0).all() for b in batches[3:])


def test_linear_ramp_interpolates_between_mixtures():
    schedule = WeightSchedule([0.9, 0.1], [(100, 50, [0.5, 0.5])])
    np.testing.assert_allclose(schedule.at(99), [0.9, 0.1])
    np.testing.assert_allclose(schedule.at(100), [0.9, 0.1])
    np.testing.assert_allclose(schedule.at(125), [0.7, 0.3])
    np.testing.assert_allclose(schedule.at(150), [0.5, 0.5])
    np.testing.assert_allclose(schedule.at(10**6), [0.5, 0.5])


def test_stage_starting_mid_ramp_ramps_from_where_the_mixture_was():
    schedule = WeightSchedule([1.0, 0.0], [(0, 100, [0.0, 1.0]), (50, 0, [1.0, 0.0])])
    np.testing.assert_allclose(schedule.at(49), [0.51, 0.49])
    np.testing.assert_allclose(schedule.at(50), [1.0, 0.0])


def test_first_step_below_looks_after_the_peak():
    def warmup_linear_decay(step):  # peak 1.0 at step 10, then down to 0 at step 110
        step = np.asarray(step, dtype=float)
        return np.where(step < 10, step / 10, np.maximum(0.0, 1 - (step - 10) / 100))

    # During warmup the rate is below half its peak too; the stage must wait for the decay.
    assert first_step_below(warmup_linear_decay, 0.5, 200) == 61
    assert first_step_below(lambda s: 1.0, 0.5, 50) is None
    scalar_only = lambda s: float(warmup_linear_decay(int(s)))  # noqa: E731
    assert first_step_below(scalar_only, 0.5, 200) == 61


def test_lr_below_stage_starts_where_the_schedule_says(shards):
    cfg = _cfg(shards, {"domain": 1.0, "replay": 0.0}, stages=[{"lr_below": 0.5, "weights": {"replay": 1.0}}])
    lr = lambda step: np.maximum(0.0, 1.0 - np.asarray(step) / 10)  # noqa: E731 - below 0.5 from step 6
    it = build_train_iterator(cfg, batch_size=4, lr_schedule=lr, total_steps=10, process_index=0, process_count=1)
    assert it.stage_steps == [6]
    sources = [set(b["source"].tolist()) for b in take(it, 8)]
    assert sources[:6] == [{0}] * 6 and sources[6:] == [{1}] * 2
    with pytest.raises(ConfigError, match="lr_schedule"):
        build_train_iterator(cfg, batch_size=4, process_index=0, process_count=1)


def test_stage_change_lands_on_its_step_with_worker_processes(shards):
    # Workers make whole batches in turn; each must know which optimizer step its batch is.
    cfg = _cfg(
        shards, {"domain": 1.0, "replay": 0.0}, stages=[[5, {"replay": 1.0}]], num_workers=2, worker_buffer_size=2
    )
    with build_train_iterator(cfg, batch_size=3, process_index=0, process_count=1) as it:
        sources = [set(b["source"].tolist()) for b in take(it, 9)]
    assert sources == [{0}] * 5 + [{1}] * 4

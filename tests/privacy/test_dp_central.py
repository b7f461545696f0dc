"""Client-level DP-FedAvg (central mode): configuration, clipping stage, noise, state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client.pipeline import StageContext
from confide.config import load_config
from confide.exceptions import ConfigError, PrivacyError
from confide.privacy import build_round_privacy
from confide.privacy.accounting import calibrate_noise_multiplier
from confide.privacy.central import CentralDP
from confide.privacy.mechanisms import split_noise_multiplier
from confide.round import Aggregate


def _cfg(*extra):
    return load_config(None, ["data.num_clients=100", "cohort.size=20", "run.rounds=10",
                              "privacy.mode='central'", *extra])


def _privacy(*extra) -> CentralDP:
    privacy = build_round_privacy(_cfg(*extra), num_clients=100, dataset_size=1000)
    assert isinstance(privacy, CentralDP)
    return privacy


def test_needs_a_noise_multiplier_or_a_target():
    with pytest.raises(ConfigError, match="needs privacy.noise_multiplier or"):
        _privacy()
    with pytest.raises(ConfigError, match="adds no noise"):
        _privacy("privacy.noise_multiplier=0")


@pytest.mark.parametrize("name", ["fedmedian", "trimmedmean", "krum"])
def test_robust_aggregators_are_refused(name):
    with pytest.raises(ConfigError, match="combines individual client updates"):
        _privacy("privacy.noise_multiplier=1.0", f"strategy.name='{name}'")


def test_target_epsilon_calibrates_for_the_run():
    privacy = _privacy("privacy.target_epsilon=4.0")
    expected = calibrate_noise_multiplier(target_epsilon=4.0, sample_rate=0.2, steps=10,
                                          delta=1e-5)
    assert privacy.noise_multiplier == expected
    assert privacy.sampling == "poisson" and privacy.weighting == "uniform"


def test_hooks_match_dp_fedavg():
    privacy = _privacy("privacy.noise_multiplier=1.5", "privacy.clip_norm=0.5")
    ctx = StageContext(server_round=1, client_id=3, seed=0)
    (stage,) = privacy.client_stages()
    clipped = stage(torch.full((1000,), 1.0), ctx)
    assert float(torch.linalg.vector_norm(clipped.double())) <= 0.5
    n = 100_000
    agg = Aggregate(update_sum=torch.zeros(n, dtype=torch.float64), weight_sum=7.0, count=7)
    agg = privacy.process_aggregate(agg, 1)
    assert agg.denominator == 20  # the expected cohort, not the 7 that reported
    std = float(agg.update_sum.std())
    assert abs(std / (1.5 * 0.5) - 1) < 5 / math.sqrt(2 * n)
    again = privacy.process_aggregate(
        Aggregate(update_sum=torch.zeros(n, dtype=torch.float64), weight_sum=7.0, count=7), 1)
    assert torch.equal(again.update_sum, agg.update_sum)  # seeded by (run seed, round)


def test_adaptive_clipping_rides_with_the_update():
    privacy = _privacy("privacy.noise_multiplier=1.0", "privacy.adaptive_clipping=true",
                       "privacy.clip_norm=0.1")
    (stage,) = privacy.client_stages()
    ctx = StageContext(server_round=1, client_id=0, seed=0)
    small = stage(torch.full((4,), 0.01), ctx)
    big = stage(torch.full((4,), 10.0), ctx)
    assert small.shape == (5,) and float(small[-1]) == 0.5
    assert float(big[-1]) == -0.5 and float(torch.linalg.vector_norm(big[:-1])) <= 0.1
    agg = Aggregate(update_sum=small + big, weight_sum=2.0, count=2)
    out = privacy.process_aggregate(agg, 1)
    assert out.update_sum.shape == (4,)
    # z = 1 split with sigma_b = 20/20 = 1 (Andrew et al. 2021)
    assert privacy.mechanism.noise_multiplier == pytest.approx(split_noise_multiplier(1.0, 1.0))
    assert privacy.clip_norm != 0.1
    assert set(privacy.round_metrics()) == {"clip_norm", "unclipped_fraction"}
    assert privacy.round_metrics()["clip_norm"] == 0.1


def test_adaptive_clipping_refuses_too_much_noise_for_the_count():
    with pytest.raises(PrivacyError, match="adaptive clipping needs noise_multiplier <"):
        _privacy("privacy.noise_multiplier=3.0", "privacy.adaptive_clipping=true")


def test_auxiliary_vectors_are_refused():
    privacy = _privacy("privacy.noise_multiplier=1.0")
    agg = Aggregate(update_sum=torch.zeros(3), weight_sum=1.0, count=1,
                    aux_sum={"control_variate": torch.zeros(3)})
    with pytest.raises(PrivacyError, match="auxiliary vectors"):
        privacy.process_aggregate(agg, 1)


def test_state_keeps_the_calibrated_multiplier():
    a = _privacy("privacy.target_epsilon=4.0", "privacy.adaptive_clipping=true")
    a.process_aggregate(Aggregate(update_sum=torch.zeros(5), weight_sum=1.0, count=1), 1)
    a.account(1, None)
    # resumed with more rounds: a fresh calibration would pick a larger multiplier
    b = build_round_privacy(load_config(None, [
        "data.num_clients=100", "cohort.size=20", "run.rounds=40", "privacy.mode='central'",
        "privacy.target_epsilon=4.0", "privacy.adaptive_clipping=true"]), num_clients=100,
        dataset_size=1000)
    assert b.noise_multiplier > a.noise_multiplier
    b.load_state_dict(a.state_dict())
    assert b.noise_multiplier == a.noise_multiplier
    assert b.clip_norm == a.clip_norm
    assert b.ledger.epsilon == a.ledger.epsilon


def test_explicit_multiplier_must_match_the_checkpoint():
    a = _privacy("privacy.noise_multiplier=1.0")
    b = _privacy("privacy.noise_multiplier=2.0")
    with pytest.raises(PrivacyError, match="differs"):
        b.load_state_dict(a.state_dict())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=50),
       st.floats(1e-3, 1e3))
def test_client_stage_clips_every_update(values, clip_norm):
    privacy = CentralDP(noise_multiplier=1.0, clip_norm=clip_norm, sample_rate=0.1,
                        expected_clients=10, delta=1e-5)
    out = privacy.clip_update(torch.tensor(values, dtype=torch.float32),
                              StageContext(server_round=1, client_id=0, seed=0))
    assert float(torch.linalg.vector_norm(out.double())) <= clip_norm


def test_adaptive_clipping_needs_an_in_process_executor():
    with pytest.raises(ConfigError, match="in-process executors"):
        _privacy("privacy.noise_multiplier=1.0", "privacy.adaptive_clipping=true",
                 "simulation.executor='flower'")

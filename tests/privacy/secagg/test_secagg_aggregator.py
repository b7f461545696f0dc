"""SecureAggregator: the Aggregator the coordinator uses when secure_aggregation.enabled."""

from __future__ import annotations

import logging

import pytest
import torch
from confide_testing import FAST
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.app.simulate import build_aggregator, run_simulation
from confide.client import ClientResult
from confide.config import load_config
from confide.exceptions import ConfigError, RoundFailedError
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.privacy.secagg.quantisation import Quantiser
from confide.round import PlainAggregator


def _config(*overrides: str):
    return load_config(None, ["secure_aggregation.enabled=true", "data.num_clients=20",
                              *overrides])


def _results(n: int, dim: int = 30, *, aux: bool = False, seed: int = 0) -> list[ClientResult]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for cid in range(n):
        extra = {"delta_c": torch.randn(dim, generator=g) * 0.1} if aux else {}
        out.append(ClientResult(client_id=3 * cid + 1, update=torch.randn(dim, generator=g) * 0.05,
                                num_examples=int(torch.randint(1, 90, (1,), generator=g)),
                                num_steps=1, aux=extra))
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(3, 20), aux=st.booleans(), weighting=st.sampled_from(["examples", "uniform"]),
       seed=st.integers(0, 1000))
def test_secure_sum_matches_the_plain_sum(n, aux, weighting, seed):
    results = _results(n, aux=aux, seed=seed)
    plain = PlainAggregator().aggregate(results, server_round=1, weighting=weighting)
    agg = SecureAggregator(_config())
    secure = agg.aggregate(results, server_round=1, weighting=weighting)
    assert secure.weight_sum == plain.weight_sum
    assert secure.count == plain.count == n
    assert secure.client_ids == plain.client_ids
    sa = agg.settings
    q = Quantiser(bits=sa.bits, clipping_range=sa.clipping_range, max_weight=sa.max_weight,
                  cohort_size=n)
    # at most one rounding step per client, plus float32 rounding of the result
    step = n / q.update_scale + 1e-6 * float(plain.update_sum.abs().max())
    assert (secure.update_sum - plain.update_sum).abs().max() <= step
    for k in plain.aux_sum:
        assert (secure.aux_sum[k] - plain.aux_sum[k]).abs().max() <= n / q.aux_scale + 1e-6
    report = agg.last_report
    assert report is not None and report.included == plain.client_ids and not report.insecure


def test_build_aggregator_selects_it():
    assert isinstance(build_aggregator(_config()), SecureAggregator)
    assert isinstance(build_aggregator(load_config(None, [])), PlainAggregator)


def test_skipping_masks_warns_and_keeps_the_sum_bit_for_bit():
    results = _results(12)
    secure = SecureAggregator(_config()).aggregate(results, server_round=4,
                                                   weighting="examples")
    with pytest.warns(UserWarning, match="NOT SECURE"):
        insecure_agg = SecureAggregator(_config("secure_aggregation.skip_pairwise_masks=true"))
    insecure = insecure_agg.aggregate(results, server_round=4, weighting="examples")
    assert torch.equal(secure.update_sum, insecure.update_sum)
    assert secure.weight_sum == insecure.weight_sum
    assert insecure_agg.last_report is not None and insecure_agg.last_report.insecure


@pytest.mark.parametrize("stage, summed", [("advertise_keys", 14), ("share_keys", 14),
                                           ("masked_input", 20)])
def test_dropouts_at_protocol_stages(stage, summed):
    agg = SecureAggregator(_config(f"simulation.dropout_stage='{stage}'",
                                   "simulation.dropout_rate=0.3"))
    assert stage in agg.dropout_stages
    out = agg.aggregate(_results(20), server_round=2, weighting="examples")
    assert out.count == summed
    report = agg.last_report
    assert report is not None and len(report.dropped) == 6  # 30% of 20 left, whatever the stage


def test_too_few_survivors_abort_the_round():
    agg = SecureAggregator(_config("simulation.dropout_stage='share_keys'",
                                   "simulation.dropout_rate=0.5", "secure_aggregation.threshold=8",
                                   "secure_aggregation.neighbours=10"))
    with pytest.raises(RoundFailedError, match="no sum is released"):
        agg.aggregate(_results(12), server_round=1, weighting="examples")


@pytest.mark.parametrize("overrides, error", [
    (["secure_aggregation.threshold=6", "secure_aggregation.neighbours=4"], "exceeds"),
    (["cohort.size=1"], "at least 2"),
    (["secure_aggregation.bits=10", "secure_aggregation.max_weight=100"], "too small"),
    (["secure_aggregation.dropout_tolerance=0.8", "secure_aggregation.corruption_tolerance=0.2"],
     "exceeds 0.9"),
])
def test_bad_settings_are_config_errors(overrides, error):
    with pytest.raises(ConfigError, match=error):
        SecureAggregator(_config(*overrides))


def test_large_weights_are_capped_with_a_warning(caplog):
    results = _results(5)
    results[0].num_examples = 5000
    agg = SecureAggregator(_config("secure_aggregation.max_weight=100"))
    with caplog.at_level(logging.WARNING, logger="confide"):
        out = agg.aggregate(results, server_round=1, weighting="examples")
    assert "capped" in caplog.text
    assert out.weight_sum == 100 + sum(r.num_examples for r in results[1:])


def test_plain_aggregator_refuses_protocol_dropout_stages():
    from confide.app.simulate import build_simulation

    with pytest.raises(ConfigError, match="dropout_stage"):
        build_simulation(load_config(None, [*FAST, "simulation.dropout_stage='share_keys'"]))


def test_simulation_with_dropouts_after_sharing_keys(tmp_path):
    _, history = run_simulation(None, overrides=[
        *FAST, "secure_aggregation.enabled=true", "simulation.dropout_stage='share_keys'",
        "simulation.dropout_rate=0.3", "cohort.min_clients=2"], output=tmp_path / "r")
    assert all(r["num_sampled"] == 10 and r["num_clients"] == 7 for r in history)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "scaffold"])
def test_digits_accuracy_is_unchanged_by_secure_aggregation(tmp_path, strategy):
    """Acceptance: secure aggregation on/off, same seed, within 0.5 points on digits."""
    common = ["run.rounds=12", "data.num_clients=20", "client.device='cpu'",
              f"strategy.name='{strategy}'"]
    _, plain = run_simulation(None, overrides=common, output=tmp_path / "plain")
    _, secure = run_simulation(None, overrides=[*common, "secure_aggregation.enabled=true"],
                               output=tmp_path / "secure")
    a, b = plain[-1]["test_accuracy"], secure[-1]["test_accuracy"]
    assert a > 0.7
    assert abs(a - b) <= 0.005, (a, b)

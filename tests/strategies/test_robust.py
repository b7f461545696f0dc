"""Robust aggregators: hand-made values, properties, and their refusal of secure aggregation."""

import pytest
import torch
from confide_testing import FAST
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.app.simulate import build_simulation
from confide.config import SecureAggregationConfig, load_config
from confide.exceptions import StrategyError
from confide.privacy.base import RoundPrivacy
from confide.round import PlainAggregator
from confide.server.coordinator import Coordinator
from confide.strategies import FedMedian, Krum, TrimmedMean, get_strategy


def rows(*values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def agg(strategy, updates):
    return strategy.aggregate_individual(updates, [1.0] * len(updates))


def test_median_by_hand():
    ups = rows([1.0, 10.0], [2.0, -5.0], [100.0, 0.0])
    assert torch.equal(agg(FedMedian(), ups), torch.tensor([2.0, 0.0], dtype=torch.float64))
    # even count: mean of the two middle values (Yin et al. 2018, Definition 1)
    ups.append(torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.equal(agg(FedMedian(), ups), torch.tensor([2.5, 0.5], dtype=torch.float64))


def test_trimmed_mean_by_hand():
    ups = rows([1.0], [2.0], [3.0], [4.0], [1000.0])
    # β = 0.2, m = 5: drop 1 from each end -> mean(2, 3, 4)
    assert agg(TrimmedMean.from_options({"beta": 0.2}), ups).item() == pytest.approx(3.0)
    # β = 0.1: floor(0.5) = 0 dropped -> plain mean
    assert agg(TrimmedMean.from_options({"beta": 0.1}), ups).item() == pytest.approx(202.0)


def test_krum_by_hand():
    # Four honest points near the origin, one far away; f = 1, n = 5: n - f - 2 = 2 neighbours
    ups = rows([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [50.0, 50.0])
    k = Krum.from_options({"num_byzantine": 1})
    scores = k.scores(torch.stack(ups))
    # each corner's two nearest are at squared distance 1 and 1 -> score 2
    assert scores[:4].tolist() == pytest.approx([2.0, 2.0, 2.0, 2.0])
    assert scores[4] > 4000
    assert torch.equal(agg(k, ups), ups[0])  # ties -> the first
    multi = Krum.from_options({"num_byzantine": 1, "num_selected": 4})
    assert torch.allclose(agg(multi, ups), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_krum_needs_more_than_2f_plus_2_clients():
    k = Krum.from_options({"num_byzantine": 2})
    with pytest.raises(StrategyError, match=r"more than 2f\+2 = 6 clients per round"):
        agg(k, rows(*[[float(i)] for i in range(6)]))
    with pytest.raises(StrategyError, match="num_selected = 7 exceeds"):
        agg(Krum.from_options({"num_byzantine": 2, "num_selected": 7}),
            rows(*[[float(i)] for i in range(8)]))


def test_no_updates_is_an_error():
    for s in (FedMedian(), TrimmedMean(), Krum()):
        with pytest.raises(StrategyError, match="no client updates"):
            agg(s, [])


vectors = st.lists(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3),
    min_size=5, max_size=9)


@settings(max_examples=60, deadline=None)
@given(vectors, st.randoms(use_true_random=False))
def test_order_independent_and_within_the_range(values, rnd):
    ups = rows(*values)
    shuffled = list(ups)
    rnd.shuffle(shuffled)
    stacked = torch.stack(ups)
    lo, hi = stacked.min(0).values, stacked.max(0).values
    for s in (FedMedian(), TrimmedMean.from_options({"beta": 0.2})):
        a, b = agg(s, ups), agg(s, shuffled)
        assert torch.allclose(a, b, rtol=0, atol=1e-9)
        assert bool(((a >= lo - 1e-9) & (a <= hi + 1e-9)).all())
    k = Krum.from_options({"num_byzantine": 1})
    chosen = agg(k, ups)
    assert any(torch.equal(chosen, u) for u in ups)  # Krum returns one of the inputs


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.floats(-1, 1, allow_nan=False), min_size=4, max_size=4),
                min_size=5, max_size=8),
       st.floats(1e4, 1e6))
def test_one_outlier_cannot_drag_the_result(honest, scale):
    # f = 1 attacker with a huge update; the result stays within the honest range.
    ups = rows(*honest) + [torch.full((4,), scale, dtype=torch.float64)]
    stacked = torch.stack(ups[:-1])
    lo, hi = stacked.min(0).values, stacked.max(0).values
    for s in (FedMedian(), TrimmedMean.from_options({"beta": 1 / len(ups) + 1e-9}),
              Krum.from_options({"num_byzantine": 1})):
        out = agg(s, ups)
        assert bool(((out >= lo - 1e-9) & (out <= hi + 1e-9)).all()), s.name


def test_trimmed_mean_with_beta_zero_is_the_unweighted_mean():
    ups = rows([1.0, 2.0], [3.0, -4.0], [5.0, 0.5])
    assert torch.allclose(agg(TrimmedMean.from_options({"beta": 0.0}), ups),
                          torch.stack(ups).mean(0))


@pytest.mark.parametrize("name", ["fedmedian", "trimmedmean", "krum"])
def test_coordinator_refuses_robust_aggregator_with_secure_aggregation(name):
    sim = build_simulation(load_config(None, [*FAST, "run.rounds=1"]))
    config = sim.config.replace(secure_aggregation=SecureAggregationConfig(enabled=True))
    base = sim.coordinator
    with pytest.raises(StrategyError, match="secure aggregation reveals only their sum") as exc:
        Coordinator(config=config, strategy=get_strategy(name)(), executor=base.executor,
                    aggregator=PlainAggregator(), privacy=RoundPrivacy(), params=base.params,
                    num_clients=base.num_clients, client_sizes=base.client_sizes)
    assert f"strategy {name!r} needs individual client updates" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_robust_aggregator_runs_in_a_simulation():
    sim = build_simulation(load_config(None, [*FAST, "strategy.name='trimmedmean'",
                                              "strategy.beta=0.2", "data.partition='iid'"]))
    history = sim.coordinator.run()
    assert history[-1]["test_accuracy"] > history[0]["test_accuracy"]

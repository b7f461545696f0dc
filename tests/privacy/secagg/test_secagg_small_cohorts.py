"""Small federations: three clients with threshold 2 survive one dropout at any stage.

Bonawitz et al. 2017 (t-out-of-n, Fig. 4): the sum is recovered when at least t clients
survive to the unmask stage, each client holding one share of its own secrets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from secagg_helpers import make_round

from confide.client import ClientResult
from confide.config import load_config
from confide.exceptions import RoundFailedError
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.round import PlainAggregator

#: "before": it never answers; otherwise it answers that stage and then goes silent
DROP_POINTS = ["before", "advertise_keys", "share_keys", "masked_input"]


@pytest.mark.parametrize("drop", DROP_POINTS)
@pytest.mark.parametrize("victim", [0, 1, 2])
def test_three_clients_threshold_two_survive_one_dropout(drop, victim):
    rnd = make_round(3, 16, seed=5, degree=2, threshold=2)
    gone = rnd.server.cohort[victim]
    if drop == "before":
        del rnd.clients[gone]
    else:
        rnd.drop_after = {gone: drop}
    result, _ = rnd.run()
    others = [c for c in rnd.server.cohort if c != gone]
    # one that leaves after sending its masked input is in the sum: its self-mask seed is
    # rebuilt from the two survivors' shares (Bonawitz et al. 2017, Round 4)
    summed = rnd.server.cohort if drop == "masked_input" else others
    assert result.included == summed
    np.testing.assert_array_equal(result.words, rnd.expected(summed))
    assert gone in result.dropped


def test_two_live_clients_run_the_protocol():
    rnd = make_round(2, 8, seed=3, degree=1, threshold=2)
    result, _ = rnd.run()
    np.testing.assert_array_equal(result.words, rnd.expected(rnd.server.cohort))


def test_two_dropouts_of_three_abort_and_count_the_live():
    rnd = make_round(3, 8, seed=2, degree=2, threshold=2)
    first, second, _ = rnd.server.cohort
    rnd.drop_after = {first: "share_keys", second: "share_keys"}
    with pytest.raises(RoundFailedError, match=r"1 masked inputs survived.*threshold 2"):
        rnd.run()
    assert rnd.server.result.words.size == 0


def _results(n: int, dim: int = 12) -> list[ClientResult]:
    g = torch.Generator().manual_seed(n)
    return [ClientResult(client_id=cid, update=torch.randn(dim, generator=g) * 0.1,
                         num_examples=10 + cid, num_steps=2, metrics={"train_loss": 1.0 + cid})
            for cid in range(n)]


def test_a_cohort_of_three_that_lost_one_at_training_still_aggregates():
    config = load_config(None, ["secure_aggregation.enabled=true", "data.num_clients=3",
                                "cohort.size=3", "secure_aggregation.threshold=2"])
    agg = SecureAggregator(config)
    two = _results(3)[1:]  # client 0 dropped while training
    out = agg.aggregate(two, server_round=1, weighting="examples")
    plain = PlainAggregator().aggregate(two, server_round=1, weighting="examples")
    assert out.count == 2 and out.client_ids == [1, 2]
    assert out.weight_sum == plain.weight_sum
    assert torch.allclose(out.update_sum, plain.update_sum, atol=1e-3)


def test_one_live_client_is_refused_with_the_live_count():
    config = load_config(None, ["secure_aggregation.enabled=true", "data.num_clients=3",
                                "cohort.size=3", "secure_aggregation.threshold=2"])
    with pytest.raises(RoundFailedError, match="at least 2 live clients, 1 reported"):
        SecureAggregator(config).aggregate(_results(3)[:1], server_round=1,
                                           weighting="examples")

"""Several ranks (torch.distributed, gloo on the CPU): two ranks give one rank's model, and
what they exchange per round does not grow with the cohort when plain sums suffice."""

from __future__ import annotations

import pytest
import torch

from confide.app.simulate import build_simulation
from confide.config import load_config

BASE = [
    "run.rounds=2",
    "data.num_clients=8",
    "data.partition='dirichlet'",  # unequal client sizes: ranks get unequal shards
    "client.epochs=1",
    "client.batch_size=16",
    "client.device='cpu'",
    "model.hidden_units=16",
    "simulation.executor='vectorized'",
]
CENTRAL_DP = ["privacy.mode='central'", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5",
              "privacy.adaptive_clipping=true", "cohort.size=6"]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _simulation(extra=()):
    return build_simulation(load_config(None, [*BASE, *extra]))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    pytest.param([], id="fedavg"),
    pytest.param(CENTRAL_DP, id="central-dp-adaptive-clipping"),
])
def test_two_ranks_reducing_sums_equal_one_rank(extra):
    one = _simulation(extra)
    h1 = one.coordinator.run()
    two = _simulation([*extra, "simulation.world_size=2"])
    executor = two.coordinator.executor
    assert executor.rows_reason is None  # the ranks exchange sums, not rows
    h2 = two.coordinator.run()
    a, b = one.coordinator.params, two.coordinator.params
    assert float((a - b).norm() / a.norm()) < 1e-9
    for r1, r2 in zip(h1, h2, strict=True):
        assert r1["num_clients"] == r2["num_clients"]
        assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=1e-9)
        for key in ("clip_norm", "unclipped_fraction"):
            assert r2.get(key) == pytest.approx(r1.get(key), rel=1e-9)
    assert executor._pool is None  # closed at the end of run()
    stats = executor.stats
    assert all(s["rank_bytes"] > 0 and s["rank_exchange_s"] >= 0 for s in stats)


@pytest.mark.slow
def test_rank_bytes_do_not_grow_with_the_cohort():
    sim = _simulation(["data.num_clients=32", "simulation.world_size=2"])
    coord, executor = sim.coordinator, sim.coordinator.executor
    instructions = coord.strategy.configure_round(1)
    try:
        for n in (8, 32):
            outcome = executor.run_cohort([coord._task(cid, 1, instructions)
                                           for cid in range(n)])
            # rank 0's rows come back; rank 1's clients only as their sum
            assert outcome.reduced is not None and outcome.reduced.count > 0
            assert len(outcome.batch) + outcome.reduced.count == n
    finally:
        executor.close()
    small, large = executor.stats[-2:]
    dim = coord.params.numel()
    assert small["rank_bytes"] == large["rank_bytes"]
    assert small["rank_bytes"] < 3 * (dim + 8) * 8  # weights out, one vector of sums back
    # the task table (ids, seeds, sizes) grows by a few dozen bytes per client, not by dim
    assert large["task_bytes"] - small["task_bytes"] < 24 * 100


@pytest.mark.parametrize(("extra", "why"), [
    (["strategy.name='scaffold'"], "per-client state"),
    (["strategy.name='fedmedian'"], "individual updates"),
    (["secure_aggregation.enabled=true"], "secure aggregation"),
    (["privacy.mode='dp-sgd'", "privacy.noise_multiplier=0.8"], "DP-SGD"),
])
def test_ranks_send_rows_when_sums_do_not_suffice(extra, why):
    executor = _simulation([*extra, "simulation.world_size=2"]).coordinator.executor
    assert executor.fallback_reason is None
    assert why in executor.rows_reason
    executor.close()


@pytest.mark.slow
def test_a_failing_rank_zero_leaves_the_group_usable(monkeypatch):
    """Rank 0 failing mid-round still takes part in the exchange, so close() stops the
    workers (no rank left waiting in a collective)."""
    from confide.simulations.vectorized.ranks import RankPool
    from confide.simulations.vectorized.trainer import CohortTrainer

    sim = _simulation(["simulation.world_size=2"])
    executor = sim.coordinator.executor
    pools = []
    real_close = RankPool.close

    def broken(self, *args, **kwargs):
        raise RuntimeError("rank 0 broke (simulated)")

    def close(self):
        pools.append(self)
        real_close(self)

    monkeypatch.setattr(CohortTrainer, "train", broken)
    monkeypatch.setattr(RankPool, "close", close)
    with pytest.raises(RuntimeError, match="simulated"):
        sim.coordinator.run()
    assert executor._pool is None and pools  # closed by run()'s finally
    # the worker finished its round and left on "stop" (not terminated after a timeout)
    assert [p.exitcode for p in pools[0].procs] == [0]

"""SCAFFOLD's control-variate bookkeeping (Karimireddy et al. 2020, Algorithm 1, option II)."""

from fractions import Fraction

import pytest
import torch
from confide_testing import FAST

from confide.app.simulate import build_simulation
from confide.client.round import ClientResult
from confide.config import load_config
from confide.exceptions import RoundFailedError
from confide.round import PlainAggregator
from confide.strategies import Scaffold, effective_local_steps

LR, STEPS = 0.1, 2  # K η_l = 0.2 without momentum


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def client_round(strategy, instructions, state, cid, update):
    """One client: its correction, then option II; returns (correction, ClientResult)."""
    rule = strategy.client_rule(instructions, state)
    aux, new_state = strategy.client_finalize(instructions, state, t(update), num_steps=STEPS,
                                              lr=LR, momentum=0.0)
    result = ClientResult(client_id=cid, update=t(update), num_examples=10, num_steps=STEPS,
                          aux=aux, new_state=new_state)
    return rule.gradient_correction, result


def server_round(strategy, params, results, total):
    """Sum on the same aggregation path as the updates, then the server rule."""
    agg = PlainAggregator().aggregate(results, server_round=1, weighting="examples")
    return strategy.apply(params, agg.mean_update(), agg.mean_aux(), 1,
                          num_clients=agg.count, total_clients=total)


def test_two_rounds_by_hand_with_partial_participation():
    s = Scaffold()
    x0 = t([0.0, 0.0])
    s.initialize(x0)
    states = {0: {}, 1: {}, 2: {}}  # N = 3 clients; round 1: {0, 1}; round 2: {1, 2}

    # Round 1: c = 0, c_i = 0 -> no correction; c_i+ = -Δy_i / (K η_l)
    ins = s.configure_round(1)
    corr0, r0 = client_round(s, ins, states[0], 0, [0.2, -0.2])
    corr1, r1 = client_round(s, ins, states[1], 1, [0.4, 0.0])
    assert torch.equal(corr0, t([0.0, 0.0])) and torch.equal(corr1, t([0.0, 0.0]))
    assert torch.allclose(r0.new_state["c_i"], t([-1.0, 1.0]))
    assert torch.allclose(r1.new_state["c_i"], t([-2.0, 0.0]))
    assert torch.allclose(r0.aux["delta_c"], t([-1.0, 1.0]))
    x1 = server_round(s, x0, [r0, r1], total=3)
    assert torch.allclose(x1, t([0.3, -0.1]))
    assert torch.allclose(s.c, t([-1.0, 1 / 3]))  # 0 + 2/3 * mean([-1, 1], [-2, 0])
    states[0], states[1] = r0.new_state, r1.new_state

    # Round 2: correction c - c_i; c_i+ = c_i - c - Δy_i / (K η_l)
    ins = s.configure_round(2)
    corr1, r1 = client_round(s, ins, states[1], 1, [0.2, 0.2])
    corr2, r2 = client_round(s, ins, states[2], 2, [-0.2, 0.0])
    assert torch.allclose(corr1, t([1.0, 1 / 3]))
    assert torch.allclose(corr2, t([-1.0, 1 / 3]))
    assert torch.allclose(r1.new_state["c_i"], t([-2.0, -4 / 3]))
    assert torch.allclose(r2.new_state["c_i"], t([2.0, -1 / 3]))
    assert torch.allclose(r1.aux["delta_c"], t([0.0, -4 / 3]))
    x2 = server_round(s, x1, [r1, r2], total=3)
    assert torch.allclose(x2, t([0.3, 0.0]))
    c = [Fraction(-1) + Fraction(2, 3) * Fraction(1), Fraction(1, 3) - Fraction(5, 9)]
    assert torch.allclose(s.c, t([float(v) for v in c]))  # [-1/3, -2/9]
    states[1], states[2] = r1.new_state, r2.new_state
    # Invariant of Algorithm 1 with c_i starting at 0: c is the mean of all N client variates.
    assert torch.allclose(s.c, sum(st["c_i"] for st in states.values()) / 3)


def test_effective_local_steps_matches_torch_sgd_momentum():
    # K heavy-ball steps on a constant gradient walk lr * a(K, β) * g.
    for momentum in (0.0, 0.5, 0.9):
        for k in (1, 2, 7, 40):
            w = torch.zeros(1, requires_grad=True)
            opt = torch.optim.SGD([w], lr=0.1, momentum=momentum)
            for _ in range(k):
                w.grad = torch.ones(1)
                opt.step()
            walked = -float(w.detach()) / 0.1
            assert walked == pytest.approx(effective_local_steps(k, momentum), rel=1e-5)
    assert effective_local_steps(5, 0.0) == 5.0


def test_option_two_uses_the_momentum_path_length():
    s = Scaffold()
    update = t([-1.0, 2.0])
    _, state = s.client_finalize(s.configure_round(1), {}, update, num_steps=10, lr=0.01,
                                 momentum=0.9)
    path = 0.01 * effective_local_steps(10, 0.9)
    assert torch.allclose(state["c_i"], -update / path)


def test_client_without_steps_keeps_its_variate():
    s = Scaffold()
    s.initialize(t([0.0, 0.0]))
    aux, state = s.client_finalize(s.configure_round(1), {"c_i": t([1.0, 2.0])}, t([0.0, 0.0]),
                                   num_steps=0, lr=0.1)
    assert torch.equal(state["c_i"], t([1.0, 2.0]))
    assert torch.equal(aux["delta_c"], t([0.0, 0.0]))


def test_mismatched_control_variate_is_a_strategy_error():
    from confide.exceptions import StrategyError

    s = Scaffold()
    s.initialize(t([0.0, 0.0, 0.0]))
    with pytest.raises(StrategyError, match="control variate"):
        s.client_rule(s.configure_round(1), {"c_i": t([1.0, 2.0])})


def test_simulation_keeps_c_equal_to_mean_of_client_variates():
    # A real run with partial participation (5 of 10 clients per round), momentum SGD.
    sim = build_simulation(load_config(None, [*FAST, "strategy.name='scaffold'",
                                              "cohort.size=5"]))
    sim.coordinator.run()
    states = sim.coordinator.client_states
    assert 5 <= len(states) <= 10
    total = sum(st["c_i"] for st in states.values())
    c = sim.coordinator.strategy.c
    assert torch.allclose(c, total / 10, atol=1e-5)
    assert float(c.abs().max()) > 0
    assert sim.coordinator.history[-1]["test_accuracy"] > 0.2  # learns (chance is 0.1)


class _KEtaScaffold(Scaffold):
    """Option II dividing by K η_l even though the local optimizer has momentum."""

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return super().client_finalize(instructions, client_state, client_update,
                                       num_steps=num_steps, lr=lr, momentum=0.0)


def test_local_momentum_keeps_control_variates_stable():
    # NIID-Bench trains locally with SGD momentum 0.9. Option II must divide by the momentum
    # path length: with plain K η_l, c_i is ~10x too large, the correction is fed through the
    # momentum again, and the variates oscillate until the updates are NaN.
    sets = ["run.rounds=8", "data.num_clients=10", "client.epochs=2", "client.device='cpu'",
            "client.momentum=0.9", "client.lr=0.02", "strategy.name='scaffold'"]
    sim = build_simulation(load_config(None, sets))
    history = sim.coordinator.run()
    assert all(r["num_clients"] == 10 for r in history)  # no client sent a non-finite update
    assert history[-1]["test_accuracy"] > 0.8
    assert float(sim.coordinator.strategy.c.abs().max()) < 1.0

    naive = build_simulation(load_config(None, sets))
    naive.coordinator.strategy = _KEtaScaffold()
    naive.coordinator.executor.context.strategy = naive.coordinator.strategy
    try:
        diverged = any(r["num_clients"] < 10 for r in naive.coordinator.run())
    except RoundFailedError:  # every client's update was non-finite
        diverged = True
    assert diverged


def test_control_variate_sums_travel_the_secure_aggregation_path():
    # Δc_i is summed with the updates by SecAgg+ (masked, quantised): same state as in the clear.
    runs = {}
    for enabled in ("false", "true"):
        sim = build_simulation(load_config(None, [*FAST, "run.rounds=2",
                                                  "strategy.name='scaffold'",
                                                  f"secure_aggregation.enabled={enabled}"]))
        sim.coordinator.run()
        runs[enabled] = sim.coordinator
    plain, secure = runs["false"], runs["true"]
    assert float(plain.strategy.c.abs().max()) > 1e-3
    assert torch.allclose(secure.strategy.c, plain.strategy.c, atol=1e-6)
    assert torch.allclose(secure.params, plain.params, atol=1e-5)
    assert set(secure.client_states) == set(plain.client_states)

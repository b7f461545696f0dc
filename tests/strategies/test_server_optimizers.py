"""Each server optimizer against its closed-form update on hand-made inputs (two rounds)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.server.checkpoint import load_checkpoint, save_checkpoint
from confide.strategies import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Scaffold,
    get_strategy,
)

X0 = [1.0, -1.0, 0.5]
D1 = [0.2, -0.4, 0.0]
D2 = [0.1, 0.3, -0.2]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def step(strategy, x, delta, rnd, aux=None, num_clients=2, total_clients=2):
    return strategy.apply(t(x), t(delta), aux or {}, rnd, num_clients=num_clients,
                          total_clients=total_clients)


def test_fedavg_adds_the_mean_update():
    s = FedAvg()
    x1 = step(s, X0, D1, 1)
    assert torch.allclose(x1, t([1.2, -1.4, 0.5]))
    assert s.state_dict() == {}


def test_fedprox_server_is_fedavg():
    s = get_strategy("fedprox").from_options({"mu": 0.1})
    assert torch.allclose(step(s, X0, D1, 1), t([1.2, -1.4, 0.5]))


def test_fedavgm_two_rounds_by_hand():
    # v1 = Δ1; x1 = x0 + η v1; v2 = β v1 + Δ2; x2 = x1 + η v2  (η = 0.5, β = 0.9)
    s = FedAvgM.from_options({"server_lr": 0.5, "server_momentum": 0.9})
    x1 = step(s, X0, D1, 1)
    assert torch.allclose(x1, t([1.1, -1.2, 0.5]))
    x2 = step(s, x1.tolist(), D2, 2)
    assert torch.allclose(s.velocity, t([0.28, -0.06, -0.2]))
    assert torch.allclose(x2, t([1.24, -1.23, 0.4]))


def _fedopt_reference(kind, x, deltas, lr, b1, b2, tau):
    """Reddi et al. 2021, Algorithm 2, written out one coordinate at a time."""
    x = list(x)
    m = [0.0] * len(x)
    v = [tau * tau] * len(x)
    for delta in deltas:
        for j, d in enumerate(delta):
            m[j] = b1 * m[j] + (1 - b1) * d
            if kind == "fedadagrad":
                v[j] = v[j] + d * d
            elif kind == "fedyogi":
                v[j] = v[j] - (1 - b2) * d * d * math.copysign(1.0, v[j] - d * d) \
                    if v[j] != d * d else v[j]
            else:
                v[j] = b2 * v[j] + (1 - b2) * d * d
            x[j] = x[j] + lr * m[j] / (math.sqrt(v[j]) + tau)
    return x, v


@pytest.mark.parametrize("kind", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimizers_two_rounds_closed_form(kind):
    options = {"server_lr": 0.1, "beta1": 0.9, "tau": 0.1}
    if kind != "fedadagrad":
        options["beta2"] = 0.99
    s = get_strategy(kind).from_options(options)
    x1 = step(s, X0, D1, 1)
    x2 = step(s, x1.tolist(), D2, 2)
    expected, v = _fedopt_reference(kind, X0, [D1, D2], 0.1, 0.9, 0.99, 0.1)
    assert torch.allclose(x2, t(expected), atol=1e-12)
    assert torch.allclose(s.v, t(v), atol=1e-12)


def test_second_moments_after_one_round_by_hand():
    # v0 = τ² = 0.01, Δ1² = [0.04, 0.16, 0]
    opts = {"tau": 0.1}
    adagrad, adam, yogi = (FedAdagrad.from_options(opts), FedAdam.from_options(opts),
                           FedYogi.from_options(opts))
    for s in (adagrad, adam, yogi):
        step(s, X0, D1, 1)
        assert torch.allclose(s.m, t([0.02, -0.04, 0.0]))  # (1 - β1) Δ1
    assert torch.allclose(adagrad.v, t([0.05, 0.17, 0.01]))  # v0 + Δ²
    assert torch.allclose(adam.v, t([0.0103, 0.0115, 0.0099]))  # .99 v0 + .01 Δ²
    # Yogi: v0 - .01 Δ² sign(v0 - Δ²): grows where Δ² > v0, unchanged where Δ = 0
    assert torch.allclose(yogi.v, t([0.0104, 0.0116, 0.01]))


def test_adam_first_step_is_about_lr_times_sign():
    # With v0 = τ² and tiny τ, m1/sqrt(v1) = (1-β1)Δ / sqrt(1-β2)|Δ| = sign(Δ) for β's .9/.99
    s = FedAdam.from_options({"server_lr": 0.01, "tau": 1e-9})
    x1 = step(s, [0.0, 0.0], [3.0, -0.002], 1)
    assert torch.allclose(x1, t([0.01, -0.01]), atol=1e-7)


def test_scaffold_server_rule():
    # x <- x + η_g Δy ; c <- c + |S|/N Δc  (Karimireddy et al. 2020, Alg. 1 lines 16-17)
    s = Scaffold.from_options({"server_lr": 2.0})
    s.initialize(t(X0))
    x1 = step(s, X0, D1, 1, aux={"delta_c": t([1.0, -2.0, 4.0])}, num_clients=2,
              total_clients=8)
    assert torch.allclose(x1, t([1.4, -1.8, 0.5]))
    assert torch.allclose(s.c, t([0.25, -0.5, 1.0]))


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi", "scaffold"])
def test_server_state_round_trips_through_a_checkpoint(tmp_path, name):
    a = get_strategy(name).from_options({})
    a.initialize(t(X0))
    aux = {"delta_c": t([0.5, 0.5, 0.5])}
    x1 = step(a, X0, D1, 1, aux=aux)
    save_checkpoint(tmp_path, {"round": 1, "params": x1, "strategy": a.state_dict(),
                               "client_states": {}, "history": [], "privacy": {}})
    b = get_strategy(name).from_options({})
    b.load_state_dict(load_checkpoint(tmp_path)["strategy"])  # weights_only=True load
    assert torch.equal(step(a, x1.tolist(), D2, 2, aux=aux), step(b, x1.tolist(), D2, 2, aux=aux))


finite = st.floats(min_value=-10, max_value=10, allow_nan=False, allow_infinity=False)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(finite, min_size=3, max_size=3), min_size=1, max_size=6),
       st.floats(min_value=1e-4, max_value=1.0), st.floats(min_value=1e-6, max_value=1.0))
def test_adam_step_per_coordinate_is_bounded(deltas, lr, tau):
    # |m_t| <= (1-β1) Σ β1^(t-k) |Δ_k| and v_t >= (1-β2) Σ β2^(t-k) Δ_k²; Cauchy-Schwarz gives
    # |x_{t+1} - x_t| <= η (1-β1) / sqrt((1-β2)(1 - β1²/β2)), whatever the updates' scale.
    b1, b2 = 0.9, 0.99
    bound = lr * (1 - b1) / math.sqrt((1 - b2) * (1 - b1 * b1 / b2))
    s = FedAdam.from_options({"server_lr": lr, "tau": tau, "beta1": b1, "beta2": b2})
    x = t([0.0, 0.0, 0.0])
    for rnd, d in enumerate(deltas, start=1):
        new = s.apply(x, t(d), {}, rnd, num_clients=1, total_clients=1)
        assert float((new - x).abs().max()) <= bound * (1 + 1e-9)
        x = new


def test_fedprox_sends_mu_to_clients():
    s = FedProx.from_options({"mu": 0.5})
    instructions = s.configure_round(1)
    assert instructions.values == {"proximal_mu": 0.5}
    assert s.client_rule(instructions, {}).proximal_mu == 0.5

"""Distributed DP: exact discrete Gaussian, rotation, rounding, encode/decode, accounting."""

from __future__ import annotations

import decimal
import json
import math
import warnings

import numpy as np
import pytest
import torch
from confide_testing import FAST
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants.analysis import rdp as opacus_rdp

from confide.app.simulate import run_simulation
from confide.client.pipeline import StageContext
from confide.config import load_config
from confide.exceptions import ConfigError
from confide.privacy import discrete_gaussian as ddg
from confide.privacy import distributed as ddp
from confide.privacy.distributed import (
    DiscreteGaussianShares,
    DistributedDP,
    conditional_stochastic_round,
    ddg_rdp,
    poisson_subsampled_rdp,
    rotate,
    rotation_signs,
    rounded_l2_bound,
    sample_discrete_gaussian,
    unrotate,
)
from confide.round import Aggregate

# --------------------------------------------------------------------------- the sampler


def _dg_pmf(sigma_sq: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-np.arange(-400, 401) ** 2 / (2 * sigma_sq))
    norm = weights.sum()
    return np.exp(-support**2 / (2 * sigma_sq)) / norm


@pytest.mark.parametrize("s, t", [(1, 1), (2, 3), (5, 4)])
def test_discrete_gaussian_matches_its_pmf(s, t):
    """Chi-square of 200k draws against N_Z(0, s*t) on the central values."""
    draws = sample_discrete_gaussian(s, t, 200_000, np.random.default_rng(s * 7 + t))
    sigma_sq = s * t
    support = np.arange(-int(4 * math.sqrt(sigma_sq)), int(4 * math.sqrt(sigma_sq)) + 1)
    expected = _dg_pmf(sigma_sq, support) * draws.size
    observed = np.array([(draws == k).sum() for k in support])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = support.size - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    assert abs(draws.mean()) < 5 * math.sqrt(sigma_sq / draws.size)


def test_large_discrete_gaussian_has_the_right_scale():
    shares = DiscreteGaussianShares.for_sigma(12345.6)
    draws = shares.sample(100_000, np.random.default_rng(0))
    assert abs(draws.std() / shares.sigma - 1) < 0.01
    assert shares.s * shares.t == pytest.approx(12345.6**2, rel=1e-3)


@settings(max_examples=30, deadline=None)
@given(num=st.integers(0, 10**6), den=st.integers(1, 10**6))
def test_lazy_comparison_agrees_with_the_float_decision(num, den):
    """The exact fallback decides U < exp(-num/den) like an exact comparison would."""
    p = math.exp(-num / den)
    rng = np.random.default_rng(num ^ den)
    for u in (0, 2**61, 2**62 - 1, int(p * 2**62 * 0.999), int(p * 2**62 * 1.001)):
        if u >= 2**62:
            continue
        got = ddg._LazyUniform(u, rng).less_than_exp(num, den)
        if (u + 1) / 2**62 < p * (1 - 1e-12):
            assert got
        elif u / 2**62 > p * (1 + 1e-12):
            assert not got


def test_lazy_comparison_resolves_a_value_on_the_boundary():
    """A u whose first 62 bits equal floor(p * 2^62) needs more bits; both outcomes occur."""
    num, den = 1, 3
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        scaled = (-(decimal.Decimal(num) / den)).exp() * 2**62
    u = int(scaled)  # U in [u, u+1) / 2^62 straddles exp(-1/3)
    assert 0.05 < float(scaled - u) < 0.95
    outcomes = {ddg._LazyUniform(u, np.random.default_rng(i)).less_than_exp(num, den)
                for i in range(40)}
    assert outcomes == {True, False}


def test_bernoulli_exp_rates():
    rng = np.random.default_rng(1)
    for num, den in [(0, 1), (1, 1), (7, 3), (1, 1000)]:
        n = 200_000
        hits = ddg._bernoulli_exp(np.full(n, num, dtype=np.int64),
                                  np.full(n, den, dtype=np.int64), rng).mean()
        p = math.exp(-num / den)
        assert abs(hits - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12


# --------------------------------------------------------------------------- rotation, rounding


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 300), seed=st.integers(0, 2**31))
def test_rotation_is_orthonormal_and_inverts(dim, seed):
    x = np.random.default_rng(seed).normal(size=dim)
    signs = rotation_signs(seed, ddp.padded_length(dim))
    y = rotate(x, signs)
    assert np.isclose(np.linalg.norm(y), np.linalg.norm(x), rtol=1e-12)
    assert np.allclose(unrotate(y, signs, dim), x, atol=1e-12)
    # H is the Walsh-Hadamard matrix: symmetric, +-1 entries, H H = d' I
    eye = np.eye(8)
    h = np.stack([ddp.fwht(row) for row in eye])
    assert np.array_equal(h, h.T) and set(np.unique(h)) == {-1.0, 1.0}
    assert np.array_equal(h @ h, 8 * eye)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 500), norm=st.floats(0.5, 1e4), seed=st.integers(0, 2**31))
def test_conditional_rounding_respects_its_bound(dim, norm, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim)
    x *= norm / np.linalg.norm(x)
    bound = rounded_l2_bound(norm, dim)
    rounded = conditional_stochastic_round(x, bound, rng)
    assert np.linalg.norm(rounded) <= bound
    assert np.all(np.abs(rounded - x) < 1)


# --------------------------------------------------------------------------- encode / decode


def _dp(dim: int = 500, n: int = 10, sigma: float = 0.05, bits: int = 20) -> DistributedDP:
    return DistributedDP(clip_norm=1.0, sigma_local=sigma, bits=bits, dim=dim, sample_rate=0.5,
                         expected_clients=n, max_clients=2 * n, delta=1e-5)


def test_decoded_sum_is_the_sum_of_clipped_updates_plus_the_discrete_noise():
    dim, n = 500, 10
    dp = _dp(dim, n)
    rng = np.random.default_rng(0)
    updates = [torch.from_numpy(rng.normal(size=dim) * s).float() for s in (0.01, 0.2) * 5]
    encoded = [dp.encode_update(u, StageContext(server_round=4, client_id=i, seed=100 + i))
               for i, u in enumerate(updates)]
    words = sum(e.to(torch.int64) for e in encoded) % (1 << dp.bits)
    out = dp.process_aggregate(Aggregate(update_sum=words.double(), weight_sum=n, count=n), 4)
    want = sum(u.double() * min(1.0, 1.0 / float(u.double().norm())) for u in updates)
    noise_std = math.sqrt(n) * dp.noise.sigma * dp.gamma  # total noise, original units
    err = (out.update_sum.double() - want).numpy()
    assert abs(err.std() / noise_std - 1) < 0.15  # rounding adds ~gamma/2 per client
    assert out.denominator == n and out.count == n
    # every encoded update lies in Z_{2^b} and carries the flag the secure aggregator checks
    ctx = StageContext(server_round=4, client_id=0, seed=1)
    dp.encode_update(updates[0], ctx)
    assert ctx.info[ddp.ENCODED_INFO_KEY] == dp.bits
    assert all(float(e.min()) >= 0 and float(e.max()) < 2**dp.bits for e in encoded)


def test_the_noise_is_the_same_for_the_same_seed_and_differs_otherwise():
    dp = _dp()
    u = torch.zeros(500)
    a = dp.encode_update(u, StageContext(server_round=1, client_id=0, seed=5))
    b = dp.encode_update(u, StageContext(server_round=1, client_id=0, seed=5))
    c = dp.encode_update(u, StageContext(server_round=1, client_id=0, seed=6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- accounting


@settings(max_examples=25, deadline=None)
@given(q=st.floats(0.001, 0.9), z=st.floats(0.5, 5.0))
def test_subsampling_bound_is_never_below_opacus_exact_gaussian(q, z):
    """Zhu-Wang's general bound, fed the Gaussian's RDP, upper-bounds Mironov's exact SGM."""
    orders = list(range(2, 40))
    plain = {a: a / (2 * z * z) for a in orders}
    exact = opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=orders)
    for a, e in zip(orders, exact, strict=True):
        assert poisson_subsampled_rdp(a, q, plain) >= e * (1 - 1e-9) - 1e-12
        assert poisson_subsampled_rdp(a, q, plain) <= plain[a] + 1e-12


def test_ddg_rdp_is_the_gaussian_rdp_when_tau_vanishes():
    for a in (2, 5, 17):
        assert ddg_rdp(a, l2=0.8, l1=10.0, tau=0.0, dim=1024) == pytest.approx(a * 0.64 / 2)
    assert ddg_rdp(3, l2=0.8, l1=10.0, tau=1e-3, dim=1024) > 3 * 0.64 / 2


@pytest.mark.parametrize("target", [None, 4.0])
def test_equivalent_multiplier_dominates_the_mechanism(target):
    dp = DistributedDP(clip_norm=1.0, sigma_local=0.1, bits=18, dim=1000, sample_rate=0.1,
                       expected_clients=100, max_clients=150, delta=1e-5, target_epsilon=target)
    z = dp.equivalent_multiplier(100)
    table = dp.mechanism_rdp(100)
    cap = math.inf if target is None else target
    orders = [a for a in ddp.LEDGER_ORDERS if ddp._conversion_floor(a, 1e-5) <= cap]
    sgm = opacus_rdp.compute_rdp(q=0.1, noise_multiplier=z, steps=1, orders=orders)
    assert all(s >= ddp._interpolate(a, table) for a, s in zip(orders, sgm, strict=True))
    # and it is tight: a slightly larger multiplier no longer dominates
    sgm_up = opacus_rdp.compute_rdp(q=0.1, noise_multiplier=z * 1.001, steps=1, orders=orders)
    assert any(s < ddp._interpolate(a, table) for a, s in zip(orders, sgm_up, strict=True))


def test_fewer_noise_clients_cost_more_privacy():
    dp = _dp(n=100, sigma=0.1)
    assert dp.equivalent_multiplier(50) < dp.equivalent_multiplier(100)


def test_calibration_reaches_the_target_after_the_planned_rounds():
    cfg = load_config(None, ["privacy.mode='distributed'", "privacy.target_epsilon=8",
                             "secure_aggregation.enabled=true", "secure_aggregation.bits=18",
                             "data.num_clients=1000", "cohort.size=100", "run.rounds=50"])
    dp = DistributedDP.from_config(cfg, num_clients=1000, dim=5000)
    for rnd in range(1, 51):
        dp.check_budget(rnd, 100)  # never raises within the planned rounds
        dp.stage_event("population", dp.planned_events(rnd, 100)["population"])
        eps = dp.account(rnd, None)
    assert 7.5 < eps <= 8.0


def test_scale_leaves_room_for_k_standard_deviations():
    dp = _dp(dim=1000, n=100, sigma=0.1, bits=16)
    total_std = math.sqrt(dp.max_clients) * dp.noise.sigma
    signal = dp.max_clients * dp.clip_norm / dp.gamma / math.sqrt(dp.padded)
    assert 2 * ddp.K_STDDEVS * math.hypot(total_std, signal) <= 2**16 * 1.01


@pytest.mark.parametrize("overrides, error", [
    (["secure_aggregation.enabled=false"], "needs secure_aggregation.enabled"),
    (["privacy.accountant='prv'"], "accountant = 'rdp'"),
    (["privacy.adaptive_clipping=true"], "adaptive_clipping"),
    (["privacy.target_epsilon=null"], "needs privacy.noise_multiplier"),
])
def test_bad_settings_are_config_errors(overrides, error):
    base = ["privacy.mode='distributed'", "privacy.target_epsilon=8",
            "secure_aggregation.enabled=true"]
    overrides = [o for o in overrides if "null" not in o]
    if error.startswith("needs privacy.noise"):
        base = base[:1] + base[2:]
    cfg = load_config(None, [*base, *overrides])
    with pytest.raises(ConfigError, match=error):
        DistributedDP.from_config(cfg, num_clients=20, dim=100)


def test_distributed_dp_simulation_records_its_ledger(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run_dir, history = run_simulation(None, overrides=[
            *FAST, "privacy.mode='distributed'", "privacy.noise_multiplier=0.8",
            "secure_aggregation.enabled=true", "secure_aggregation.bits=20", "cohort.size=6",
            "privacy.delta=1e-3"], output=tmp_path / "r")
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert ledger["mode"] == "distributed"
    assert len(ledger["accounts"]["population"]) == 3
    eps = [r["epsilon"] for r in history]
    assert eps == sorted(eps) and eps[-1] > 0
    # the ledger's Gaussian-equivalent accounting never reports less than the mechanism's own
    assert all(r["epsilon"] >= r["ddg_epsilon"] for r in history)

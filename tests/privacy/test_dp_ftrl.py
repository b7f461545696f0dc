"""DP-FTRL's mechanisms: epsilon against independent computations, the noise covariance,
resume of the correlated noise, and refusal of clients that break the participation pattern."""

from __future__ import annotations

import io
import itertools
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from scipy import optimize, stats

from confide.client.round import ClientResult
from confide.exceptions import ConfigError, PrivacyError
from confide.privacy.ftrl import DPFTRL, build_mechanism
from confide.privacy.ftrl_matrix import BandedToeplitz, sqrt_prefix_coefficients
from confide.privacy.ftrl_noise import NoiseSource, load_or_create_kek, unwrap_key, wrap_key
from confide.privacy.ftrl_tree import TreeAggregation, honaker_variances

try:  # the lead is moving Aggregate to confide/round.py
    from confide.round import Aggregate
except ImportError:
    from confide.round import Aggregate  # type: ignore[no-redef]

DELTA = 1e-5


# --------------------------------------------------------------------------- independent maths
def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang 2018,
    Thm. 8): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    def gap(eps: float) -> float:
        return (stats.norm.cdf(-eps / mu + mu / 2)
                - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta)
    return float(optimize.brentq(gap, 0.0, 500.0, xtol=1e-12))


def opacus_rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


def dyadic_nodes(length: int, start: int = 0) -> list[tuple[int, int]]:
    """Leaf ranges [lo, hi) of the complete dyadic blocks of one tree over ``length`` leaves."""
    nodes = []
    size = 1
    while size <= length:
        nodes += [(start + lo, start + lo + size) for lo in range(0, length - size + 1, size)]
        size *= 2
    return nodes


def banded_matrix(band: int, rounds: int) -> np.ndarray:
    c = sqrt_prefix_coefficients(band)
    c = c / np.linalg.norm(c)
    return sum(c[k] * np.eye(rounds, k=-k) for k in range(min(band, rounds)))


def separated_patterns(rounds: int, separation: int):
    """Every non-empty set of rounds whose gaps are >= separation (brute force)."""
    for r in range(1, rounds + 1):
        for combo in itertools.combinations(range(rounds), r):
            if all(b - a >= separation for a, b in itertools.pairwise(combo)):
                yield combo


def ftrl(mechanism, *, rounds, participation="cyclic", separation=None, z=1.0, accountant="pld",
         kek_path=None, clip=1.0, noise_key=None):
    return DPFTRL(mechanism=mechanism, noise_multiplier=z, clip_norm=clip, rounds=rounds,
                  participation=participation, min_separation=separation, expected_clients=4,
                  delta=DELTA, accountant=accountant, kek_path=kek_path, noise_key=noise_key)


# --------------------------------------------------------------------------- tree aggregation
@pytest.mark.parametrize("rounds", [1, 2, 3, 7, 8, 100, 1000])
def test_tree_single_participation_matches_kairouz_theorem(rounds):
    # Kairouz et al. 2021, Thm. 4.1: one participation -> the leaf is in ceil(lg(T+1)) nodes,
    # each a Gaussian mechanism with sensitivity 1 and multiplier z: compose them.
    levels = math.ceil(math.log2(rounds + 1))
    z = 3.0
    dp = ftrl(TreeAggregation(), rounds=rounds, participation="single", z=z)
    assert dp.sensitivity(rounds) ** 2 == pytest.approx(levels)
    exact = analytic_gaussian_epsilon(math.sqrt(levels) / z, DELTA)
    pld = dp.epsilon_after_rounds(rounds)
    assert exact - 1e-9 <= pld <= exact + 5e-3
    rdp = ftrl(TreeAggregation(), rounds=rounds, participation="single", z=z, accountant="rdp")
    assert rdp.epsilon_after_rounds(rounds) == pytest.approx(
        opacus_rdp_epsilon([(z, 1.0, levels)], DELTA), rel=1e-9)


@pytest.mark.parametrize(("rounds", "separation"), [(12, 4), (20, 6), (9, 3)])
def test_tree_cyclic_with_restarts_matches_the_paper(rounds, separation):
    # Kairouz et al. 2021, Sec. 4 (restarts): one tree per `separation` rounds, a client in at
    # most one leaf of each; k trees compose: sum of ceil(lg(L_i + 1)) over the trees.
    z = 2.0
    dp = ftrl(TreeAggregation(restart_every=separation), rounds=rounds, separation=separation,
              z=z)
    lengths = [min(separation, rounds - s) for s in range(0, rounds, separation)]
    levels = sum(math.ceil(math.log2(length + 1)) for length in lengths)
    assert dp.sensitivity(rounds) ** 2 == pytest.approx(levels)
    exact = analytic_gaussian_epsilon(math.sqrt(levels) / z, DELTA)
    assert exact - 1e-9 <= dp.epsilon_after_rounds(rounds) <= exact + 5e-3
    rdp = ftrl(TreeAggregation(restart_every=separation), rounds=rounds, separation=separation,
               z=z, accountant="rdp")
    assert rdp.epsilon_after_rounds(rounds) == pytest.approx(
        opacus_rdp_epsilon([(z, 1.0, levels)], DELTA), rel=1e-9)


def test_tree_restart_longer_than_separation_is_refused():
    with pytest.raises(PrivacyError, match="columns overlap for rounds 4 or more apart"):
        ftrl(TreeAggregation(), rounds=12, separation=4)
    with pytest.raises(ConfigError, match="tree_restart = 8 exceeds"):
        build_mechanism(kind="tree", rounds=20, participation="cyclic", min_separation=4,
                        tree_restart=8)


# --------------------------------------------------------------------------- banded MF
@pytest.mark.parametrize("band", [2, 4])
@pytest.mark.parametrize(("participation", "separation"), [("single", None), ("cyclic", 4),
                                                           ("cyclic", 5)])
def test_banded_epsilon_matches_brute_force_sensitivity(band, participation, separation):
    rounds, z = 12, 1.5
    c = banded_matrix(band, rounds)
    patterns = ([(j,) for j in range(rounds)] if participation == "single"
                else list(separated_patterns(rounds, separation)))
    # C >= 0 entrywise, so equal contributions are the worst case (Choquette-Choo, McMahan,
    # Rush, Thakurta 2023, "Multi-epoch matrix factorization", Thm. 2): brute-force it.
    brute = max(float(np.linalg.norm(c[:, list(p)].sum(axis=1))) for p in patterns)
    dp = ftrl(BandedToeplitz(band=band), rounds=rounds, participation=participation,
              separation=separation, z=z)
    assert dp.sensitivity(rounds) == pytest.approx(brute, rel=1e-12)
    k = 1 if separation is None else math.ceil(rounds / separation)
    assert brute <= math.sqrt(k) * np.linalg.norm(c, axis=0).max() + 1e-12  # the paper's bound
    exact = analytic_gaussian_epsilon(brute / z, DELTA)
    assert exact - 1e-9 <= dp.epsilon_after_rounds(rounds) <= exact + 5e-3
    rdp = ftrl(BandedToeplitz(band=band), rounds=rounds, participation=participation,
               separation=separation, z=z, accountant="rdp")
    assert rdp.epsilon_after_rounds(rounds) == pytest.approx(
        opacus_rdp_epsilon([(z / brute, 1.0, 1)], DELTA), rel=1e-9)


def test_band_checks():
    with pytest.raises(ConfigError, match="band = 10 is larger than run.rounds = 6"):
        build_mechanism(kind="banded", rounds=6, participation="single", min_separation=None,
                        band=10)
    with pytest.raises(ConfigError, match="band = 5 exceeds privacy.min_separation = 4"):
        build_mechanism(kind="banded", rounds=20, participation="cyclic", min_separation=4,
                        band=5)


def test_per_round_events_compose_to_the_whole_mechanism():
    dp = ftrl(BandedToeplitz(band=3), rounds=12, separation=3, z=2.0, accountant="rdp")
    events = [e for t in range(1, 13) if (e := dp._round_event(t)) is not None]
    assert sum(1 / ev[0] ** 2 for ev in events) == pytest.approx(
        dp.sensitivity(12) ** 2 / 4.0, rel=1e-12)


# --------------------------------------------------------------------------- noise covariance
def _prefix_noise(mechanism, rounds: int, dim: int) -> np.ndarray:
    mechanism.start(source=NoiseSource(bytes(range(32))), dim=dim, std=1.0)
    return np.cumsum(np.stack([mechanism.step() for _ in range(rounds)]), axis=0)


def _assert_covariance(samples: np.ndarray, expected: np.ndarray) -> None:
    dim = samples.shape[1]
    empirical = samples @ samples.T / dim
    diag = np.diag(expected)
    standard_error = np.sqrt((np.outer(diag, diag) + expected ** 2) / dim)
    assert np.all(np.abs(empirical - expected) <= 5 * standard_error), (empirical, expected)
    assert np.all(np.abs(samples.mean(axis=1)) <= 5 * np.sqrt(diag / dim))


def _linear_map(nodes_of_round) -> np.ndarray:
    """Rows: prefix sums; columns: all nodes ever released; entries: their weights."""
    rounds = len(nodes_of_round)
    allnodes = sorted({n for nodes in nodes_of_round for n in nodes})
    index = {n: i for i, n in enumerate(allnodes)}
    out = np.zeros((rounds, len(allnodes)))
    for t, weights in enumerate(nodes_of_round):
        for n, w in weights.items():
            out[t, index[n]] += w
    return out


def _decomposition(t: int) -> list[tuple[int, int]]:
    """Dyadic blocks [lo, hi) of the binary decomposition of leaves [0, t)."""
    blocks, lo = [], 0
    for h in reversed(range(t.bit_length())):
        if (t >> h) & 1:
            blocks.append((lo, lo + (1 << h)))
            lo += 1 << h
    return blocks


def test_vanilla_tree_noise_covariance():
    rounds, period = 8, 3  # restarts after 3 leaves
    weights = []
    for t in range(1, rounds + 1):
        w: dict = {}
        for start in range(0, t, period):
            # finished trees contribute their final prefix estimate, the current one its part
            local = min(period, t - start)
            for lo, hi in _decomposition(local):
                w[(start + lo, start + hi)] = 1.0
        weights.append(w)
    expected = _linear_map(weights)
    _assert_covariance(_prefix_noise(TreeAggregation(restart_every=period, honaker=False),
                                     rounds, 40_000), expected @ expected.T)


def test_honaker_tree_is_the_blue_and_has_its_covariance():
    # Independent: the best linear unbiased estimator of each prefix sum from the nodes
    # released so far, by generalised least squares (Honaker 2015; Kairouz et al. App. B.2).
    rounds = 8
    weights = []
    for t in range(1, rounds + 1):
        nodes = dyadic_nodes(t)
        m = np.array([[1.0 if lo <= j < hi else 0.0 for j in range(t)] for lo, hi in nodes])
        estimator = np.ones(t) @ np.linalg.solve(m.T @ m, m.T)  # a^T (M^T M)^-1 M^T
        weights.append(dict(zip(nodes, estimator, strict=True)))
    expected = _linear_map(weights)
    cov = expected @ expected.T
    v = honaker_variances(4)
    assert [cov[t - 1, t - 1] for t in (1, 2, 3, 4, 8)] == pytest.approx(
        [v[0], v[1], v[1] + v[0], v[2], v[3]], rel=1e-9)
    _assert_covariance(_prefix_noise(TreeAggregation(), rounds, 40_000), cov)


@pytest.mark.parametrize("band", [2, 4])
def test_banded_noise_covariance(band):
    rounds = 8
    c_inv = np.linalg.inv(banded_matrix(band, rounds))
    a = np.tril(np.ones((rounds, rounds)))
    expected = a @ c_inv @ c_inv.T @ a.T  # Cov(B z) = A C^-1 C^-T A^T
    _assert_covariance(_prefix_noise(BandedToeplitz(band=band), rounds, 40_000), expected)


def test_noise_source_is_keyed_and_standard_normal():
    a, b = NoiseSource(bytes(32)), NoiseSource(bytes(range(32)))
    x = a.normal(1, 7, 100_001)
    assert x.shape == (100_001,)
    assert np.array_equal(x, a.normal(1, 7, 100_001))
    assert not np.array_equal(x, a.normal(1, 8, 100_001))
    assert not np.array_equal(x, b.normal(1, 7, 100_001))
    assert stats.kstest(x, "norm").pvalue > 1e-3
    assert NoiseSource().key != NoiseSource().key  # fresh keys from the OS CSPRNG


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
def test_key_wrap_round_trip_and_wrong_kek(kek, key):
    wrapped = wrap_key(kek, key)
    assert key.hex() not in wrapped
    assert unwrap_key(kek, wrapped) == key
    other = bytes(b ^ 1 for b in kek)
    with pytest.raises(PrivacyError, match="does not unwrap"):
        unwrap_key(other, wrapped)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=120))
def test_unwrap_rejects_arbitrary_checkpoint_text(text):
    try:
        unwrap_key(bytes(32), text)
    except PrivacyError:
        pass


# --------------------------------------------------------------------------- rounds and resume
def _result(cid: int, dim: int) -> ClientResult:
    return ClientResult(client_id=cid, update=torch.zeros(dim), num_examples=1, num_steps=1)


def _round(dp: DPFTRL, rnd: int, cohort: list[int], dim: int = 257) -> torch.Tensor:
    results = [_result(c, dim) for c in cohort]
    dp.check_budget(rnd, len(cohort))
    dp.observe_results(results, rnd)
    gen = torch.Generator().manual_seed(rnd)
    agg = Aggregate(update_sum=torch.randn(dim, generator=gen), weight_sum=len(results),
                    count=len(results), client_ids=sorted(r.client_id for r in results))
    out = dp.process_aggregate(agg, rnd).update_sum.clone()
    dp.account(rnd, None)
    return out


@pytest.mark.parametrize("mechanism", [lambda: BandedToeplitz(band=3),
                                       lambda: TreeAggregation(restart_every=3)])
def test_resume_continues_the_correlated_noise_exactly(mechanism, tmp_path):
    kek = tmp_path / "secrets" / "noise.kek"
    cohorts = [[(r - 1) % 3 * 2, (r - 1) % 3 * 2 + 1] for r in range(1, 9)]  # 3 groups
    straight = ftrl(mechanism(), rounds=8, separation=3, kek_path=kek, accountant="rdp")
    expected = [_round(straight, r, cohorts[r - 1]) for r in range(1, 9)]

    # the same secret key as the straight run (which wraps its own under the same KEK)
    first = ftrl(mechanism(), rounds=8, separation=3, kek_path=kek, accountant="rdp",
                 noise_key=straight._source.key)
    got = [_round(first, r, cohorts[r - 1]) for r in range(1, 5)]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    raw = buffer.getvalue()
    assert first._source.key not in raw and first._source.key.hex().encode() not in raw
    resumed = ftrl(mechanism(), rounds=8, separation=3, kek_path=kek, accountant="rdp")
    resumed.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    got += [_round(resumed, r, cohorts[r - 1]) for r in range(5, 9)]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert resumed.ledger.to_dict() == straight.ledger.to_dict()
    assert resumed.last_round == straight.last_round

    # a wrong key-encryption key cannot continue the noise
    other = tmp_path / "other.kek"
    load_or_create_kek(other, create=True)
    stranger = ftrl(mechanism(), rounds=8, separation=3, kek_path=other, accountant="rdp")
    stranger.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    with pytest.raises(PrivacyError, match="does not unwrap"):
        _round(stranger, 5, cohorts[4])
    missing = ftrl(mechanism(), rounds=8, separation=3, kek_path=tmp_path / "absent.kek",
                   accountant="rdp")
    missing.load_state_dict(torch.load(io.BytesIO(raw), weights_only=True))
    with pytest.raises(PrivacyError, match="is missing"):
        _round(missing, 5, cohorts[4])


def test_kek_file_is_private(tmp_path):
    path = tmp_path / "secrets" / "k.kek"
    kek = load_or_create_kek(path, create=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_kek(path, create=False) == kek


def test_client_breaking_the_separation_is_refused_and_logged(caplog):
    dp = ftrl(BandedToeplitz(band=2), rounds=10, separation=3)
    caplog.set_level(logging.WARNING, logger="confide")
    _round(dp, 1, [1, 2])
    results = [_result(1, 257), _result(3, 257)]
    dp.observe_results(results, 2)
    assert [r.client_id for r in results] == [3]
    assert dp.round_metrics() == {"refused_clients": 1.0}
    assert "round 2: DP-FTRL refuses client 1: it took part 1 round(s) ago, fewer than " \
           "privacy.min_separation = 3" in caplog.text
    # the refused client's update never reaches the sum; a sum that holds it is not released
    agg = Aggregate(update_sum=torch.zeros(257), weight_sum=2, count=2, client_ids=[1, 3])
    with pytest.raises(PrivacyError, match="did not admit"):
        dp.process_aggregate(agg, 2)
    assert dp.admit([1], 4) == [1]  # three rounds later it may come back
    single = ftrl(BandedToeplitz(band=2), rounds=10, participation="single")
    assert single.admit([5], 1) == [5]
    assert single.admit([5, 6], 9) == [6]
    assert "it already took part (privacy.participation = 'single')" in caplog.text


def test_clip_batch_bounds_every_row_like_clip_update():
    dp = ftrl(BandedToeplitz(band=2), rounds=4, separation=2, clip=0.5)
    gen = torch.Generator().manual_seed(0)
    updates = torch.randn(6, 1000, generator=gen) * torch.tensor([0.0, 1e-4, 0.1, 1, 10, 1e6]
                                                                  )[:, None]
    clipped = dp.clip_batch(updates, [None] * 6)  # type: ignore[list-item]
    norms = torch.linalg.vector_norm(clipped.double(), dim=1)
    assert bool((norms <= 0.5).all())
    for row in range(6):
        assert torch.allclose(clipped[row], dp.clip_update(updates[row], None), atol=1e-7)  # type: ignore[arg-type]


def test_refusal_filters_a_result_batch_in_place():
    round_module = pytest.importorskip("confide.round")  # the coordinator's batch, on main
    if not hasattr(round_module, "ResultBatch"):
        pytest.skip("no ResultBatch in this tree")
    batch = round_module.ResultBatch.from_results([_result(c, 8) for c in (1, 2, 3)])
    dp = ftrl(BandedToeplitz(band=2), rounds=10, separation=3)
    dp.admit([2], 1)
    dp.observe_results(batch, 2)
    assert batch.client_ids == [1, 3] and tuple(batch.updates.shape) == (2, 8)

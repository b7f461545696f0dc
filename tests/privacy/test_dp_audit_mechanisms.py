"""The one-run canary audit of every DP mechanism, through the real round loop.

For each mechanism: with z = 0 the canaries show a large empirical epsilon (as large as the
statistics allow with that many canaries), and with the configured noise the lower bound
stays below the accountant's epsilon. The configured noise is chosen so that the accountant's
epsilon is *below* the z = 0 bound: were the noise not applied, the second test would fail.
"""

from __future__ import annotations

import math

import pytest

from confide.app.audit import run_canary_audit
from confide.config import load_config
from confide.privacy.audit import one_run_epsilon_lower_bound

JOB = ["data.num_clients=20", "cohort.size=10", "client.epochs=1", "client.device='cpu'"]

#: mode -> (settings, canaries, configured noise multiplier, accountant epsilon at that noise)
MECHANISMS = {
    "central": ([*JOB, "run.rounds=5"], 1000, 3.0, 1.8460),
    "dp-ftrl": ([*JOB, "run.rounds=5", "cohort.sampling='cyclic'"], 1000, 4.0, 1.7791),
    # the Walsh-Hadamard padding makes every client's vector 2^k long: a small model keeps
    # the SecAgg+ rounds of ~260 clients (real and canary) quick
    "distributed": ([*JOB, "run.rounds=3", "model.hidden_units=32",
                     "secure_aggregation.enabled=true"], 500, 4.0, 2.0400),
    "dp-sgd": ([*JOB, "run.rounds=3"], 500, 3.0, 1.1303),
}


def _audit(mode: str, z: float):
    settings, canaries, _, _ = MECHANISMS[mode]
    cfg = load_config(None, [*settings, f"privacy.mode='{mode}'",
                             f"privacy.noise_multiplier={z}"])
    return run_canary_audit(cfg, canaries=canaries)


def _top_guesses_all_right(m: int) -> float:
    """The bound when the m/5 highest scores are all included canaries (95%, 8 grid points).

    The bottom guesses cannot all be right with Poisson-sampled canaries: an included canary
    that was never sampled scores like an excluded one.
    """
    k = m // 5
    return one_run_epsilon_lower_bound(m=m, r=k, v=k, delta=1e-5, alpha=0.05 / 8)


@pytest.fixture(scope="module", params=sorted(MECHANISMS))
def audits(request):
    mode = request.param
    return mode, _audit(mode, 0.0), _audit(mode, MECHANISMS[mode][2])


@pytest.mark.slow
def test_no_noise_shows_a_large_empirical_epsilon(audits):
    mode, result, _ = audits
    assert result.mechanism == mode
    assert result.canary_kind == ("gradient" if mode == "dp-sgd" else "client")
    assert math.isinf(result.epsilon_accountant)
    assert result.noise_multiplier == 0
    # every guess right: as much as this many canaries can show at 95% (1000: 3.57, 500: 2.91)
    assert result.correct == result.guesses > 0
    assert result.epsilon_lower_bound >= _top_guesses_all_right(result.canaries) - 1e-9
    assert result.epsilon_lower_bound > 2.5
    assert result.mean_score_included > result.mean_score_excluded


@pytest.mark.slow
def test_noise_keeps_the_lower_bound_below_the_accountant(audits):
    mode, no_noise, result = audits
    _, _, z, eps = MECHANISMS[mode]
    assert result.mechanism == mode and result.noise_multiplier == z
    assert result.epsilon_accountant == pytest.approx(eps, abs=1e-3)
    # the test can fail: the accountant's epsilon is below what z = 0 shows
    assert result.epsilon_accountant < no_noise.epsilon_lower_bound
    assert 0 <= result.epsilon_lower_bound <= result.epsilon_accountant

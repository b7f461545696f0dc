"""The canary audit (Steinke et al. 2023 bound, Andrew et al. 2024 canary clients)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from confide_testing import assert_one_line_error, run_cli

from confide.app.audit import run_canary_audit
from confide.config import load_config
from confide.privacy.audit import (
    gaussian_fit_epsilon,
    guess_epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

AUDIT_JOB = ["data.num_clients=20", "cohort.size=10", "run.rounds=5", "client.epochs=1",
             "client.device='cpu'", "privacy.mode='central'"]


def test_p_value_grows_with_epsilon_and_falls_with_correct_guesses():
    ps = [one_run_p_value(m=1000, r=100, v=90, epsilon=e, delta=1e-5) for e in (0, 1, 2, 4)]
    assert ps == sorted(ps) and ps[0] < 1e-3
    assert one_run_p_value(m=1000, r=100, v=90, epsilon=0, delta=0) < 1e-10
    assert one_run_p_value(m=1000, r=100, v=50, epsilon=0, delta=0) > 0.5
    assert one_run_p_value(m=1000, r=0, v=0, epsilon=1, delta=1e-5) == 1.0


def test_all_correct_bound_matches_the_closed_form():
    # delta = 0, v = r: p-value = p^r with p = e^eps / (1 + e^eps)
    r, alpha = 100, 0.05
    p = alpha ** (1 / r)
    expected = math.log(p / (1 - p))
    got = one_run_epsilon_lower_bound(m=1000, r=r, v=r, delta=0.0, alpha=alpha)
    assert got == pytest.approx(expected, rel=1e-6)
    assert one_run_epsilon_lower_bound(m=1000, r=r, v=50, delta=0.0, alpha=alpha) == 0.0


def test_random_guessing_gives_no_bound():
    rng = np.random.default_rng(0)
    scores, included = rng.normal(size=1000), rng.random(1000) < 0.5
    eps, _, _ = guess_epsilon_lower_bound(scores, included, delta=1e-5)
    assert eps < 0.3
    assert gaussian_fit_epsilon(scores[included], scores[~included], delta=1e-5) < 1.0


@pytest.fixture(scope="module")
def audits():
    results = {}
    for z in (0.0, 1.0):
        cfg = load_config(None, [*AUDIT_JOB, f"privacy.noise_multiplier={z}"])
        results[z] = run_canary_audit(cfg, canaries=1000)
    return results


@pytest.mark.slow
def test_no_noise_shows_a_large_empirical_epsilon(audits):
    result = audits[0.0]
    assert math.isinf(result.epsilon_accountant)
    assert result.epsilon_lower_bound > 3.0  # ~ the most 1000 canaries can show at 95%
    assert result.correct == result.guesses
    assert result.epsilon_estimate > 20


@pytest.mark.slow
def test_noise_keeps_the_lower_bound_below_the_accountant(audits):
    result = audits[1.0]
    assert 0 <= result.epsilon_lower_bound < result.epsilon_accountant
    assert result.epsilon_lower_bound < audits[0.0].epsilon_lower_bound
    assert result.epsilon_accountant == pytest.approx(8.2304, abs=1e-3)  # z=1, q=.5, T=5


@pytest.mark.slow
def test_cli_audit_prints_both_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    sets = [a for kv in [*AUDIT_JOB, "run.rounds=2", "privacy.noise_multiplier=1.0"]
            for a in ("--set", kv)]
    code, stdout, err = run_cli(["audit", *sets, "--canaries", "100", "-o", str(out)], capsys)
    assert code == 0, err
    assert "accountant ε = " in stdout and "empirical ε lower bound = " in stdout
    data = json.loads(out.read_text())
    assert data["canaries"] == 100 and data["epsilon_lower_bound"] < data["epsilon_accountant"]


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "set privacy.mode = 'central'"),
    (["--set", "privacy.mode='central'"], "needs privacy.noise_multiplier"),
    (["--set", "privacy.mode='central'", "--set", "privacy.noise_multiplier=1",
      "--canaries", "5"], "too few"),
])
def test_cli_audit_bad_input(args, fragment, capsys):
    code, _, err = run_cli(["audit", *args], capsys)
    assert_one_line_error(code, err)
    assert fragment in err

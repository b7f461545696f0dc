"""The canary audit's statistics (Steinke et al. 2023 bound) and ``confide audit`` (the audit
of each mechanism: test_dp_audit_mechanisms.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from confide_testing import assert_one_line_error, run_cli

from confide.privacy.audit import (
    gaussian_fit_epsilon,
    guess_epsilon_lower_bound,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

AUDIT_JOB = ["data.num_clients=20", "cohort.size=10", "run.rounds=5", "client.epochs=1",
             "client.device='cpu'"]


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


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "extra"), [
    ("central", []), ("dp-ftrl", ["cohort.sampling='cyclic'"]),
    ("distributed", ["secure_aggregation.enabled=true", "model.hidden_units=16"]),
    ("dp-sgd", []),
])
def test_cli_audit_prints_both_and_writes_json(mode, extra, tmp_path, capsys):
    out = tmp_path / "audit.json"
    sets = [a for kv in [*AUDIT_JOB, f"privacy.mode='{mode}'", *extra, "run.rounds=2",
                         "privacy.noise_multiplier=1.0"] for a in ("--set", kv)]
    code, stdout, err = run_cli(["audit", *sets, "--canaries", "100", "-o", str(out)], capsys)
    assert code == 0, err
    assert f"audited: privacy.mode = '{mode}'" in stdout
    assert "accountant ε = " in stdout and "empirical ε lower bound = " in stdout
    data = json.loads(out.read_text())
    assert data["mechanism"] == mode and data["canaries"] == 100
    assert data["epsilon_lower_bound"] < data["epsilon_accountant"]


def _sets(*kv: str) -> list[str]:
    return [a for x in kv for a in ("--set", x)]


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "set privacy.mode = 'central', 'distributed', 'dp-ftrl' or 'dp-sgd'"),
    (_sets("privacy.mode='central'"), "needs privacy.noise_multiplier"),
    ([*_sets("privacy.mode='central'", "privacy.noise_multiplier=1"), "--canaries", "5"],
     "too few"),
    (_sets("privacy.mode='distributed'", "privacy.target_epsilon=4",
           "secure_aggregation.enabled=true"), "needs privacy.noise_multiplier (a target"),
    (_sets("privacy.mode='distributed'", "privacy.noise_multiplier=1"),
     "needs secure_aggregation.enabled"),
    (_sets("privacy.mode='dp-sgd'", "privacy.noise_multiplier=1",
           "simulation.executor='vectorized'"), "simulation.executor = 'sequential'"),
    (_sets("privacy.mode='dp-sgd'", "privacy.target_epsilon=4"),
     "needs privacy.noise_multiplier alone"),
    ([*_sets("privacy.mode='dp-sgd'", "privacy.noise_multiplier=1", "model.name='logreg'"),
      "--canaries", "100000"], "trainable parameters"),
    (_sets("privacy.mode='dp-sgd'", "privacy.noise_multiplier=1", "strategy.name='fedbuff'"),
     "is asynchronous"),
    (_sets("privacy.mode='central'", "privacy.noise_multiplier=1", "compression.method='topk'"),
     "does not audit compressed updates"),
])
def test_cli_audit_bad_input(args, fragment, capsys):
    code, _, err = run_cli(["audit", *args], capsys)
    assert_one_line_error(code, err)
    assert fragment in err

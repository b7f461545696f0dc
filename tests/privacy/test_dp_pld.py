"""PLD accounting through Google's dp_accounting: the REFERENCES.md rows, the ledger, bad input."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import dp_accounting
import pytest
from confide_testing import assert_one_line_error, run_cli
from dp_accounting.pld import pld_privacy_accountant

from confide.exceptions import PrivacyError
from confide.privacy.accounting import (
    calibrate_noise_multiplier,
    compute_epsilon,
    epsilon_of,
    fold_gaussians,
)
from confide.privacy.ledger import LEDGER_NAME, PrivacyLedger

# ../shared/REFERENCES.md, "Privacy accounting": (z, q, T, delta, RDP epsilon).
TABLE = [
    ("1.0", "100/3400", 1500, "1/3400", "6.697"),
    ("0.83", "100/3400", 1500, "1/3400", "10.04"),
    ("1.3", "0.004", 3750, "1e-5", "0.922"),
]


def _dp_accounting_epsilon(z: float, q: float, steps: int, delta: float) -> float:
    """dp_accounting's own value, computed here without confide: a PLD accountant composing a
    Poisson-sampled Gaussian T times."""
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
                       steps)
    return float(accountant.get_epsilon(delta))


@pytest.mark.parametrize(("z", "q", "rounds", "delta", "rdp"), TABLE)
def test_cli_pld_reproduces_dp_accounting_and_is_below_rdp(z, q, rounds, delta, rdp, capsys):
    code, out, err = run_cli(["privacy", "epsilon", "--noise-multiplier", z, "--sample-rate", q,
                              "--rounds", str(rounds), "--delta", delta, "--accountant", "pld"],
                             capsys)
    assert code == 0, err
    match = re.search(r"ε = (\d+\.\d+)", out)
    assert match, out
    expected = _dp_accounting_epsilon(float(z), float(Fraction(q)), rounds,
                                      float(Fraction(delta)))
    assert match.group(1) == f"{expected:.3f}"
    assert float(match.group(1)) <= float(rdp)
    assert "PLD" in out


@pytest.mark.parametrize("delta", ["0", "-1e-5", "1", "1.5"])
def test_cli_pld_impossible_delta_is_one_line(delta, capsys):
    code, out, err = run_cli(["privacy", "epsilon", "-z", "1", "-q", "0.01", "-T", "10", "-d",
                              delta, "-a", "pld"], capsys)
    assert_one_line_error(code, err)
    assert code == PrivacyError.exit_code
    assert "out of range" in err
    assert out == ""


def test_pld_calibration_never_overspends():
    z = calibrate_noise_multiplier(target_epsilon=2.0, sample_rate=0.01, steps=100,
                                   delta=1e-5, accountant="pld")
    eps = compute_epsilon(noise_multiplier=z, sample_rate=0.01, steps=100, delta=1e-5,
                          accountant="pld")
    assert 2.0 - 0.02 <= eps <= 2.0
    # PLD is tighter than RDP: at PLD's multiplier, RDP's bound is already above the target.
    assert compute_epsilon(noise_multiplier=z, sample_rate=0.01, steps=100, delta=1e-5,
                           accountant="rdp") > 2.0


def test_folded_gaussians_equal_their_composition():
    history = [(2.0, 1.0, 1), (3.0, 1.0, 2), (1.0, 0.1, 5)]
    folded = fold_gaussians(history)
    assert folded[0] == (1.0, 0.1, 5)
    assert folded[1][0] == pytest.approx((1 / 4 + 2 / 9) ** -0.5)
    for accountant in ("rdp", "pld"):
        accountant_obj = (pld_privacy_accountant.PLDAccountant() if accountant == "pld"
                          else dp_accounting.rdp.RdpAccountant())
        accountant_obj.compose(dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(2.0),
            dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(3.0), 2),
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
                0.1, dp_accounting.GaussianDpEvent(1.0)), 5)]))
        independent = accountant_obj.get_epsilon(1e-5)
        assert epsilon_of(history, delta=1e-5, accountant=accountant) == pytest.approx(
            independent, rel=2e-2)


def test_ledger_reports_all_three_and_the_enforced_one(tmp_path, capsys):
    ledger = PrivacyLedger(mode="central", accountant="pld", delta=1e-5)
    for rnd in range(1, 4):
        ledger.record("population", rnd, (1.0, 0.05, 1))
    ledger.save(tmp_path)
    data = json.loads((tmp_path / LEDGER_NAME).read_text())
    assert data["enforced_accountant"] == "pld"
    by_name = ledger.epsilon_by_accountant()
    assert set(by_name) == {"rdp", "prv", "pld"}
    assert by_name["pld"] == pytest.approx(data["epsilon"])
    assert by_name["pld"] <= by_name["rdp"]
    code, out, err = run_cli(["privacy", "ledger", str(tmp_path)], capsys)
    assert code == 0, err
    assert f"PLD ε = {by_name['pld']:.3f} (enforced)" in out
    assert f"RDP ε = {by_name['rdp']:.3f}," in out
    code, _, err = run_cli(["privacy", "ledger", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err)


def test_pld_in_the_config_for_central_dp_and_refused_for_dp_sgd():
    from confide.config import load_config
    from confide.exceptions import ConfigError
    from confide.privacy import build_round_privacy

    base = ["data.num_clients=100", "cohort.size=10", "run.rounds=50", "privacy.delta=1e-5"]
    config = load_config(None, overrides=[*base, "privacy.mode='central'",
                                          "privacy.noise_multiplier=1.2",
                                          "privacy.accountant='pld'"])
    central = build_round_privacy(config, num_clients=100, dataset_size=1000)
    ledger = central.ledger  # type: ignore[attr-defined]
    assert ledger.accountant == "pld"
    eps = ledger.epsilon_after("population", (1.2, 0.1, 1))
    assert eps == pytest.approx(_dp_accounting_epsilon(1.2, 0.1, 1, 1e-5), rel=1e-12)
    config = load_config(None, overrides=[*base, "privacy.mode='dp-sgd'",
                                          "privacy.noise_multiplier=1.0",
                                          "privacy.accountant='pld'"])
    with pytest.raises(ConfigError, match="not wired into DP-SGD"):
        build_round_privacy(config, num_clients=100, dataset_size=1000)

"""Accounting through Opacus: the REFERENCES.md table, calibration, and bad input."""

from __future__ import annotations

import re
import warnings

import pytest
from confide_testing import assert_one_line_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant

from confide.exceptions import PrivacyError
from confide.privacy.accounting import (
    calibrate_noise_multiplier,
    compose,
    compute_epsilon,
    epsilon_of,
)
from confide.privacy.ledger import PrivacyLedger

# ../shared/REFERENCES.md, "Privacy accounting (checked with opacus 1.6.0 accountants)":
# (z, q, T, delta, RDP epsilon, PRV epsilon), written exactly as the table writes them.
TABLE = [
    ("1.0", "100/3400", 1500, "1/3400", "6.697", "5.979"),
    ("0.83", "100/3400", 1500, "1/3400", "10.04", "8.935"),
    ("1.3", "0.004", 3750, "1e-5", "0.922", "0.844"),
]
ROWS = [(z, q, t, d, acct, rdp if acct == "rdp" else prv)
        for z, q, t, d, rdp, prv in TABLE for acct in ("rdp", "prv")]


def _printed(out: str, symbol: str) -> str:
    match = re.search(rf"{symbol} = (\d+\.\d+)", out)
    assert match, out
    return match.group(1)


@pytest.mark.parametrize(("z", "q", "rounds", "delta", "accountant", "expected"), ROWS)
def test_cli_reproduces_reference_table(z, q, rounds, delta, accountant, expected, capsys):
    code, out, err = run_cli(["privacy", "epsilon", "--noise-multiplier", z, "--sample-rate", q,
                              "--rounds", str(rounds), "--delta", delta,
                              "--accountant", accountant], capsys)
    assert code == 0, err
    printed = _printed(out, "ε")
    decimals = len(expected.split(".")[1])  # "10.04" is given to 2 decimals
    assert round(float(printed), decimals) == float(expected)
    assert printed == f"{float(expected):.3f}" or decimals < 3


def test_cli_calibration_example(capsys):
    code, out, err = run_cli(["privacy", "epsilon", "--target-epsilon", "10", "--sample-rate",
                              "100/3400", "--rounds", "1500", "--delta", "1/3400",
                              "--accountant", "rdp"], capsys)
    assert code == 0, err
    assert _printed(out, "z") == "0.832"


def test_calibration_never_overspends():
    z = calibrate_noise_multiplier(target_epsilon=10, sample_rate=100 / 3400, steps=1500,
                                   delta=1 / 3400)
    assert abs(z - 0.832) < 5e-4
    eps = compute_epsilon(noise_multiplier=z, sample_rate=100 / 3400, steps=1500,
                          delta=1 / 3400)
    assert 10 - 0.011 <= eps <= 10


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-z", "1", "-q", "0.1", "-T", "10", "-d", "1"], "delta = 1.0 is out of range"),
        (["-z", "1", "-q", "0.1", "-T", "10", "-d", "1.5"], "delta = 1.5 is out of range"),
        (["-z", "1", "-q", "0.1", "-T", "10", "-d", "0"], "delta = 0.0 is out of range"),
        (["-z", "1", "-q", "1.2", "-T", "10", "-d", "1e-5"], "sample rate = 1.2"),
        (["-z", "1", "-q", "0", "-T", "10", "-d", "1e-5"], "sample rate = 0.0"),
        (["-z", "0", "-q", "0.1", "-T", "10", "-d", "1e-5"], "noise multiplier = 0.0"),
        (["-z", "-1", "-q", "0.1", "-T", "10", "-d", "1e-5"], "noise multiplier = -1.0"),
        (["-q", "0.1", "-T", "10", "-d", "1e-5"], "exactly one of"),
        (["-z", "1", "-e", "3", "-q", "0.1", "-T", "10", "-d", "1e-5"], "exactly one of"),
        (["-z", "1", "-q", "x/y", "-T", "10", "-d", "1e-5"], "not a number"),
        (["-z", "1", "-q", "0.1", "-T", "10", "-d", "1e-5", "-a", "gdp"], "'gdp' is not"),
        (["-e", "1e-4", "-q", "0.9", "-T", "100000", "-d", "1e-5"], "cannot reach epsilon"),
    ],
)
def test_cli_bad_input_is_one_line(args, fragment, capsys):
    code, out, err = run_cli(["privacy", "epsilon", *args], capsys)
    assert_one_line_error(code, err)
    assert code == PrivacyError.exit_code
    assert fragment in err
    assert out == ""


def test_cli_rounds_must_be_positive(capsys):
    code, _, err = run_cli(["privacy", "epsilon", "-z", "1", "-q", "0.1", "-T", "0", "-d",
                            "1e-5"], capsys)
    assert_one_line_error(code, err)


def test_compose_merges_runs_of_the_same_mechanism():
    assert compose([(1.0, 0.1, 2), (1.0, 0.1, 3), (2.0, 0.1, 1)]) == [(1.0, 0.1, 5),
                                                                        (2.0, 0.1, 1)]
    assert epsilon_of([], delta=1e-5) == 0.0
    assert epsilon_of([(1.0, 0.1, 2), (1.0, 0.1, 3)], delta=1e-5) == pytest.approx(
        compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=1e-5))


# Few distinct (z, q) pairs: each RDP curve costs Opacus ~0.3 s, steps vary freely.
events = st.tuples(st.sampled_from([0.5, 1.0, 2.3, 6.0]), st.sampled_from([0.004, 0.1, 0.5, 1.0]),
                   st.integers(1, 500))


@settings(max_examples=60, deadline=None)
@given(st.lists(events, min_size=1, max_size=12))
def test_epsilon_never_decreases_rdp(sequence):
    ledger = PrivacyLedger(mode="central", accountant="rdp", delta=1e-5)
    spent = [ledger.record("population", i + 1, e) for i, e in enumerate(sequence)]
    assert all(b >= a for a, b in zip(spent, spent[1:], strict=False))
    assert spent[0] > 0
    assert ledger.epsilon == spent[-1]


@settings(max_examples=12, deadline=None)
@given(st.lists(events, min_size=1, max_size=4))
def test_rdp_composition_equals_opacus_rdp_accountant(sequence):
    acc = RDPAccountant()
    acc.history = list(sequence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = acc.get_epsilon(delta=1e-5)
    assert epsilon_of(sequence, delta=1e-5, accountant="rdp") == pytest.approx(expected,
                                                                              rel=1e-12)


@settings(max_examples=3, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.8, 1.5]), st.sampled_from([0.05, 0.3]),
                          st.integers(1, 50)), min_size=2, max_size=3))
def test_epsilon_never_decreases_prv(sequence):
    ledger = PrivacyLedger(mode="central", accountant="prv", delta=1e-5)
    spent = [ledger.record("population", i + 1, e) for i, e in enumerate(sequence)]
    assert all(b >= a for a, b in zip(spent, spent[1:], strict=False))

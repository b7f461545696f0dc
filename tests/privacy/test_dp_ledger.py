"""The privacy ledger: persistence, reconciliation on resume, budget checks."""

from __future__ import annotations

import json

import pytest

from confide.exceptions import PrivacyBudgetExceeded, PrivacyError
from confide.privacy.accounting import compute_epsilon
from confide.privacy.ledger import (
    LEDGER_NAME,
    LedgeredPrivacy,
    PrivacyLedger,
    load_ledger,
)

EVENT = (1.0, 0.1, 1)


def _ledger(rounds: int) -> PrivacyLedger:
    ledger = PrivacyLedger(mode="central", accountant="rdp", delta=1e-5,
                           settings={"noise_multiplier": 1.0})
    for r in range(1, rounds + 1):
        ledger.record("population", r, EVENT)
    return ledger


def test_recorded_epsilon_is_the_accountants():
    ledger = _ledger(5)
    assert ledger.epsilon == pytest.approx(compute_epsilon(noise_multiplier=1.0,
                                                           sample_rate=0.1, steps=5,
                                                           delta=1e-5))
    assert [e["round"] for e in ledger.accounts["population"].entries] == [1, 2, 3, 4, 5]


def test_save_and_load_round_trip(tmp_path):
    ledger = _ledger(3)
    ledger.save(tmp_path)
    loaded = load_ledger(tmp_path)
    assert loaded is not None
    assert loaded.to_dict() == ledger.to_dict()
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no leftovers
    assert load_ledger(tmp_path / "nowhere") is None


@pytest.mark.parametrize("text", ["{not json", "[]", '{"format": 1}', '{"format": 99}'])
def test_malformed_ledger_is_a_privacy_error(tmp_path, text):
    (tmp_path / LEDGER_NAME).write_text(text)
    with pytest.raises(PrivacyError):
        load_ledger(tmp_path)


def test_reconcile_keeps_rounds_only_the_file_has():
    memory, disk = _ledger(2), _ledger(3)
    assert memory.reconcile(disk, source="ledger") is True
    assert memory.to_dict() == disk.to_dict()


def test_reconcile_keeps_memory_when_the_file_is_behind():
    memory, disk = _ledger(3), _ledger(2)
    assert memory.reconcile(disk, source="ledger") is False
    assert len(memory.accounts["population"].entries) == 3


def test_reconcile_refuses_a_different_history():
    memory, disk = _ledger(2), _ledger(0)
    disk.record("population", 1, (2.0, 0.1, 1))
    with pytest.raises(PrivacyError, match="does not match"):
        memory.reconcile(disk, source="ledger")
    other = PrivacyLedger(mode="central", accountant="prv", delta=1e-5)
    with pytest.raises(PrivacyError, match="accountant"):
        memory.reconcile(other, source="ledger")


class _Fixed(LedgeredPrivacy):
    """One population event per round (the shape of central DP)."""

    def __init__(self, target):
        super().__init__(mode="central", accountant="rdp", delta=1e-5, target_epsilon=target,
                         settings={})

    def planned_events(self, server_round, num_sampled_expected):
        return {"population": EVENT}

    def process(self):
        self.stage_event("population", EVENT)


def test_budget_stops_before_the_round_that_would_exceed(tmp_path):
    eps2 = compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=2, delta=1e-5)
    eps3 = compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=3, delta=1e-5)
    privacy = _Fixed(target=(eps2 + eps3) / 2)
    privacy.attach_run_dir(tmp_path)
    for rnd in (1, 2):
        privacy.check_budget(rnd, 10)
        privacy.process()
        assert privacy.account(rnd, tmp_path) == pytest.approx(
            compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=rnd, delta=1e-5))
    before = (tmp_path / LEDGER_NAME).read_bytes()
    with pytest.raises(PrivacyBudgetExceeded, match="round 3 would raise epsilon"):
        privacy.check_budget(3, 10)
    assert (tmp_path / LEDGER_NAME).read_bytes() == before
    assert json.loads(before)["epsilon"] == pytest.approx(eps2)


def test_budget_already_spent_is_refused(tmp_path):
    privacy = _Fixed(target=0.5)
    privacy.ledger = _ledger(4)  # far above 0.5
    with pytest.raises(PrivacyBudgetExceeded, match="already"):
        privacy.check_budget(5, 10)


def test_state_dict_round_trip_continues_the_ledger(tmp_path):
    a = _Fixed(target=None)
    for rnd in (1, 2):
        a.check_budget(rnd, 10)
        a.process()
        a.account(rnd, None)
    b = _Fixed(target=None)
    b.load_state_dict(a.state_dict())
    b.check_budget(3, 10)
    b.process()
    assert b.account(3, None) == pytest.approx(
        compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=3, delta=1e-5))


def test_state_from_a_run_without_privacy_is_refused():
    with pytest.raises(PrivacyError, match="no privacy ledger"):
        _Fixed(target=None).load_state_dict({})


def test_attach_adopts_a_round_the_checkpoint_missed(tmp_path):
    _ledger(3).save(tmp_path)  # the file saw round 3 ...
    privacy = _Fixed(target=None)
    privacy.ledger = _ledger(2)  # ... the checkpoint only round 2
    privacy.attach_run_dir(tmp_path)
    assert len(privacy.ledger.accounts["population"].entries) == 3

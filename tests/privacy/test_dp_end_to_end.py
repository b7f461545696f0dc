"""DP runs as a user meets them: epsilon in history.json and the ledger, resume, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
from confide_testing import FAST, assert_one_line_error, run_cli

from confide.exceptions import ConfigError, PrivacyError
from confide.privacy.accounting import compute_epsilon
from confide.privacy.ledger import LEDGER_NAME

CENTRAL = [*FAST, "cohort.size=5", "privacy.mode='central'", "privacy.noise_multiplier=1.0",
           "privacy.clip_norm=0.5"]  # 10 clients, q = 0.5, 3 rounds


def _sets(items):
    return [a for kv in items for a in ("--set", kv)]


def _simulate(args, capsys):
    return run_cli(["simulate", "-q", *args], capsys)


def _ledger(run_dir):
    return json.loads((run_dir / LEDGER_NAME).read_text())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    import torch

    from confide.app.simulate import run_simulation

    out = tmp_path_factory.mktemp("dp") / "straight"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests that compare against it (conftest.py)
    try:
        run_simulation(overrides=CENTRAL, output=out)
    finally:
        torch.set_num_threads(before)
    return out


@pytest.mark.slow
def test_epsilon_in_history_and_ledger(straight_run):
    history = json.loads((straight_run / "history.json").read_text())
    ledger = _ledger(straight_run)
    eps = [r["epsilon"] for r in history]
    expected = [compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=t, delta=1e-5)
                for t in (1, 2, 3)]
    assert eps == pytest.approx(expected)
    assert [e["epsilon"] for e in ledger["accounts"]["population"]] == eps
    assert [e["round"] for e in ledger["accounts"]["population"]] == [1, 2, 3]
    assert ledger["settings"]["sample_rate"] == 0.5
    assert (straight_run / "plots" / "accuracy.png").is_file()


@pytest.mark.slow
def test_resumed_run_continues_the_ledger(straight_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    code, _, err = _simulate(["-o", str(out), "--stop-after", "2", *_sets(CENTRAL)], capsys)
    assert code == 0, err
    assert len(_ledger(out)["accounts"]["population"]) == 2
    code, _, err = _simulate(["--resume", str(out)], capsys)
    assert code == 0, err
    # same seed -> same run: the interrupted-and-resumed run equals the straight one
    assert _ledger(out) == _ledger(straight_run)
    assert (json.loads((out / "history.json").read_text())
            == json.loads((straight_run / "history.json").read_text()))


@pytest.mark.slow
def test_target_already_exceeded_at_resume(straight_run, tmp_path, capsys):
    # a run whose budget allows exactly its 3 rounds, then resumed for 2 more
    out = tmp_path / "budget"
    eps3 = compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=3, delta=1e-5)
    code, _, err = _simulate(["-o", str(out), *_sets([*CENTRAL,
                                                       f"privacy.target_epsilon={eps3 + 1e-6}"])],
                             capsys)
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    code, _, err = _simulate(["--resume", str(out), "--set", "run.rounds=5"], capsys)
    assert_one_line_error(code, err)
    assert code == PrivacyError.exit_code
    assert "round 4 would raise epsilon" in err and "target_epsilon" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after[LEDGER_NAME] == before[LEDGER_NAME]
    assert after["checkpoint.pt"] == before["checkpoint.pt"]


@pytest.mark.slow
def test_budget_stops_a_fresh_run_before_it_overspends(tmp_path, capsys):
    out = tmp_path / "stops"
    eps2 = compute_epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=2, delta=1e-5)
    code, _, err = _simulate(["-o", str(out), *_sets([*CENTRAL,
                                                       f"privacy.target_epsilon={eps2 + 0.01}"])],
                             capsys)
    assert_one_line_error(code, err)
    assert "round 3 would raise epsilon" in err
    assert len(_ledger(out)["accounts"]["population"]) == 2
    assert len(json.loads((out / "history.json").read_text())) == 2


@pytest.mark.slow
def test_tampered_ledger_is_refused_at_resume(straight_run, tmp_path, capsys):
    out = tmp_path / "tampered"
    shutil.copytree(straight_run, out)
    data = _ledger(out)
    data["accounts"]["population"][0]["noise_multiplier"] = 5.0
    (out / LEDGER_NAME).write_text(json.dumps(data))
    before = (out / LEDGER_NAME).read_bytes()
    code, _, err = _simulate(["--resume", str(out), "--set", "run.rounds=4"], capsys)
    assert_one_line_error(code, err)
    assert "does not match" in err
    assert (out / LEDGER_NAME).read_bytes() == before


@pytest.mark.parametrize(("extra", "fragment", "exit_code"), [
    (["privacy.clip_norm=0"], "privacy.clip_norm = 0.0 is out of range", ConfigError.exit_code),
    (["privacy.clip_norm=-1"], "privacy.clip_norm = -1.0 is out of range",
     ConfigError.exit_code),
    (["privacy.delta=1"], "privacy.delta = 1.0 is out of range", ConfigError.exit_code),
    (["privacy.delta=2.5"], "privacy.delta = 2.5 is out of range", ConfigError.exit_code),
    (["privacy.noise_multiplier=0"], "adds no noise", ConfigError.exit_code),
    (["strategy.name='krum'"], "combines individual client updates", ConfigError.exit_code),
    (["privacy.adaptive_clipping=true", "privacy.noise_multiplier=9"],
     "adaptive clipping needs", PrivacyError.exit_code),
])
def test_bad_privacy_input_is_one_line(extra, fragment, exit_code, tmp_path, capsys):
    out = tmp_path / "new"
    code, _, err = _simulate(["-o", str(out), *_sets([*CENTRAL, *extra])], capsys)
    assert_one_line_error(code, err)
    assert fragment in err
    assert code == exit_code
    assert not out.exists()


def test_missing_noise_is_one_line(tmp_path, capsys):
    out = tmp_path / "new"
    code, _, err = _simulate(["-o", str(out), *_sets([*FAST, "privacy.mode='central'"])],
                             capsys)
    assert_one_line_error(code, err)
    assert "needs privacy.noise_multiplier or privacy.target_epsilon" in err


def test_dp_sgd_refuses_batchnorm_model(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    out = tmp_path / "new"
    code, _, err = _simulate(["-o", str(out), *_sets([
        *FAST, "model.name='dp_test_models:batchnorm_mlp'", "privacy.mode='dp-sgd'",
        "privacy.noise_multiplier=1.0"])], capsys)
    assert_one_line_error(code, err)
    assert code == PrivacyError.exit_code
    assert "BatchNorm1d" in err and "GroupNorm" in err
    assert not out.exists()


@pytest.mark.slow
def test_dp_sgd_run_tracks_each_hospital(tmp_path, capsys):
    out = tmp_path / "heart"
    sets = _sets(["run.rounds=2", "privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0",
                  "client.device='cpu'"])
    from confide_testing import ROOT

    code, _, err = _simulate([str(ROOT / "examples" / "heart-disease.toml"), "-o", str(out),
                              "--stop-after", "1", *sets], capsys)
    assert code == 0, err
    code, _, err = _simulate(["--resume", str(out)], capsys)
    assert code == 0, err
    ledger = _ledger(out)
    assert sorted(ledger["accounts"]) == ["client:0", "client:1", "client:2", "client:3"]
    for entries in ledger["accounts"].values():
        assert [e["round"] for e in entries] == [1, 2]
        z, q, steps = (entries[0][k] for k in ("noise_multiplier", "sample_rate", "steps"))
        assert entries[1]["epsilon"] == pytest.approx(compute_epsilon(
            noise_multiplier=z, sample_rate=q, steps=2 * steps, delta=1e-5))
    history = json.loads((out / "history.json").read_text())
    assert history[-1]["epsilon"] == pytest.approx(ledger["epsilon"])
    assert ledger["epsilon"] == max(e[-1]["epsilon"] for e in ledger["accounts"].values())


@pytest.mark.slow
def test_budget_lowered_below_what_was_spent_is_refused(straight_run, tmp_path, capsys):
    import tomllib

    import tomli_w

    out = tmp_path / "lowered"
    shutil.copytree(straight_run, out)
    config = tomllib.loads((out / "config.toml").read_text())
    config["privacy"]["target_epsilon"] = 1.0  # the run has already spent ~4.9
    (out / "config.toml").write_text(tomli_w.dumps(config))
    before = (out / LEDGER_NAME).read_bytes()
    code, _, err = _simulate(["--resume", str(out), "--set", "run.rounds=4"], capsys)
    assert_one_line_error(code, err)
    assert code == PrivacyError.exit_code
    assert "epsilon spent is already" in err
    assert (out / LEDGER_NAME).read_bytes() == before

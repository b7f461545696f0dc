"""DP-FTRL as a user meets it: ``confide simulate`` on digits, resume, and bad input."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from confide_testing import FAST, assert_one_line_error, run_cli
from opacus.accountants import RDPAccountant

from confide.exceptions import ConfigError
from confide.privacy.ftrl import KEK_NAME
from confide.privacy.ftrl_matrix import sqrt_prefix_coefficients
from confide.privacy.ledger import LEDGER_NAME

# 10 clients, 5 per round in a fixed cyclic order: each client every 2 rounds; band 2.
FTRL = [*FAST, "cohort.size=5", "cohort.sampling='cyclic'", "privacy.mode='dp-ftrl'",
        "privacy.ftrl_mechanism='banded'", "privacy.band=2", "privacy.noise_multiplier=2.0",
        "privacy.clip_norm=0.5"]


def _sets(items):
    return [a for kv in items for a in ("--set", kv)]


def _simulate(args, capsys):
    return run_cli(["simulate", "-q", *args], capsys)


def _ledger(run_dir):
    return json.loads((run_dir / LEDGER_NAME).read_text())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    from confide.app.simulate import run_simulation

    out = tmp_path_factory.mktemp("ftrl") / "straight"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(overrides=FTRL, output=out)
    finally:
        torch.set_num_threads(before)
    return out


def _independent_epsilon(rounds: int, separation: int, band: int, z: float) -> float:
    c = sqrt_prefix_coefficients(band)
    c = c / np.linalg.norm(c)
    enc = sum(c[k] * np.eye(rounds, k=-k) for k in range(band))
    # a client's rounds: every `separation` rounds from its first; C >= 0, so equal updates
    sens = max(float(np.linalg.norm(enc[:, first::separation].sum(axis=1)))
               for first in range(separation))
    acc = RDPAccountant()
    acc.history = [(z / sens, 1.0, 1)]
    return float(acc.get_epsilon(delta=1e-5))


@pytest.mark.slow
def test_simulate_dp_ftrl_records_the_enforced_epsilon(straight_run):
    ledger = _ledger(straight_run)
    assert ledger["mode"] == "dp-ftrl" and ledger["enforced_accountant"] == "rdp"
    assert ledger["settings"]["mechanism"] == "banded" and ledger["settings"]["band"] == 2
    assert ledger["settings"]["min_separation"] == 2
    assert ledger["settings"]["amplification"] == "none"
    history = json.loads((straight_run / "history.json").read_text())
    assert [r["refused_clients"] for r in history] == [0.0, 0.0, 0.0]  # cyclic: none needed
    assert history[-1]["epsilon"] == pytest.approx(ledger["epsilon"])
    assert ledger["epsilon"] == pytest.approx(_independent_epsilon(3, 2, 2, 2.0), rel=1e-9)
    assert history[-1]["test_accuracy"] is not None
    kek = straight_run / KEK_NAME
    assert kek.stat().st_mode & 0o777 == 0o600
    state = torch.load(straight_run / "checkpoint.pt", weights_only=True)["privacy"]
    assert set(state["noise"]) == {"wrapped_key", "dim", "rounds"}
    assert state["noise"]["rounds"] == 3


@pytest.mark.slow
def test_resumed_dp_ftrl_run_continues_the_ledger(straight_run, tmp_path, capsys):
    out = tmp_path / "resumed"
    code, _, err = _simulate(["-o", str(out), "--stop-after", "2", *_sets(FTRL)], capsys)
    assert code == 0, err
    assert len(_ledger(out)["accounts"]["population"]) == 2
    code, _, err = _simulate(["--resume", str(out)], capsys)
    assert code == 0, err
    # the noise key differs between runs (OS CSPRNG), the privacy record does not
    assert _ledger(out) == _ledger(straight_run)
    (out / KEK_NAME).unlink()
    code, _, err = _simulate(["--resume", str(out), "--set", "run.rounds=4"], capsys)
    assert_one_line_error(code, err)
    assert "key-encryption key" in err and "is missing" in err


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "fragment"), [
    (["strategy.name='fedmedian'"], "combines individual client updates"),
    (["privacy.band=9"], "privacy.band = 9 is larger than run.rounds = 3"),
    (["privacy.band=3", "run.rounds=6"], "privacy.band = 3 exceeds privacy.min_separation = 2"),
    (["privacy.min_separation=4"], "privacy.min_separation = 4 exceeds the 2 rounds"),
    (["privacy.ftrl_mechanism='tree'", "privacy.tree_restart=3"], "tree_restart = 3 exceeds"),
    (["privacy.participation='single'"], "lasts 2 rounds"),
    (["privacy.noise_multiplier=0"], "adds no noise"),
    (["privacy.adaptive_clipping=true"], "adaptive_clipping is not available"),
])
def test_bad_dp_ftrl_input_is_one_line_and_the_ledger_intact(straight_run, extra, fragment,
                                                              tmp_path, capsys):
    import tomllib

    import tomli_w

    from confide.config import parse_overrides

    out = tmp_path / "bad"
    shutil.copytree(straight_run, out)
    # --resume reads the run's own config.toml: edit it as a user would
    config = tomllib.loads((out / "config.toml").read_text())
    for section, values in parse_overrides(extra).items():
        config.setdefault(section, {}).update(values)
    (out / "config.toml").write_text(tomli_w.dumps(config))
    before = {p: (out / p).read_bytes() for p in (LEDGER_NAME, "checkpoint.pt")}
    code, _, err = _simulate(["--resume", str(out)], capsys)
    assert_one_line_error(code, err)
    assert code == ConfigError.exit_code
    assert fragment in err
    assert {p: (out / p).read_bytes() for p in before} == before
    fresh = tmp_path / "fresh"
    code, _, err = _simulate(["-o", str(fresh), *_sets([*FTRL, *extra])], capsys)
    assert_one_line_error(code, err)
    assert fragment in err
    assert not (fresh / LEDGER_NAME).exists()


def test_target_epsilon_is_calibrated_for_the_enforced_pattern():
    from confide.config import load_config
    from confide.privacy import build_round_privacy

    sets = [kv for kv in FTRL if not kv.startswith("privacy.noise_multiplier")]
    config = load_config(None, overrides=[*sets, "run.rounds=6", "privacy.target_epsilon=4.0"])
    dp = build_round_privacy(config, num_clients=10, dataset_size=100)
    eps = dp.epsilon_after_rounds(6)  # type: ignore[attr-defined]
    assert 4.0 - 0.05 <= eps <= 4.0
    assert math.isclose(dp.noise_multiplier / dp.sensitivity(6),  # type: ignore[attr-defined]
                        dp.ledger.settings["effective_noise_multiplier"])

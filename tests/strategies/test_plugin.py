"""The example plugin (examples/strategy-plugin): installed, found by name, run; its maths."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from confide_testing import ROOT, cli_command

PLUGIN = ROOT / "examples" / "strategy-plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """``pip install`` the example plugin into a private folder (no change to Confide)."""
    tmp = tmp_path_factory.mktemp("plugin")
    src = tmp / "src"
    shutil.copytree(PLUGIN, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    site = tmp / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(src)],
        capture_output=True, text=True,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert proc.returncode == 0, proc.stderr
    assert (site / "confide_feddyn").is_dir()
    return site


def _confide(args, site, cwd):
    env = {**os.environ, "PYTHONPATH": str(site), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([*cli_command(), *args], capture_output=True, text=True, env=env,
                          cwd=cwd)


@pytest.mark.slow
def test_installed_plugin_is_listed_and_runs_by_name(plugin_site, tmp_path):
    listing = _confide(["strategies", "list"], plugin_site, tmp_path)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("feddyn "))
    assert row.split()[1:4] == ["plugin", "confide-feddyn", "yes"], row
    assert "Acar et al. 2021" in row

    run = _confide(["simulate", "-q", "-o", str(tmp_path / "run"),
                    "--set", "run.rounds=2", "--set", "strategy.name='feddyn'",
                    "--set", "strategy.alpha=0.05", "--set", "client.device='cpu'",
                    "--set", "data.num_clients=10", "--set", "client.epochs=1"],
                   plugin_site, tmp_path)
    assert run.returncode == 0, run.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["round"] for r in history] == [1, 2]
    assert history[-1]["test_accuracy"] > 0.2
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state["strategy"]) == {"h"}  # the plugin's server state is checkpointed
    assert all("grad" in s for s in state["client_states"].values())

    bad = _confide(["simulate", "-q", "-o", str(tmp_path / "bad"), "--set",
                    "strategy.name='feddyn'", "--set", "strategy.alpha=-1"], plugin_site, tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("error: strategy.alpha = -1.0 is out of range; it must be > 0")


def test_feddyn_two_rounds_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN))
    from confide_feddyn import FedDyn

    s = FedDyn.from_options({"alpha": 0.5})
    ins = s.configure_round(1)
    rule = s.client_rule(ins, {})
    assert rule.proximal_mu == 0.5 and rule.gradient_correction is None
    aux, state = s.client_finalize(ins, {}, torch.tensor([1.0, -2.0]), num_steps=3, lr=0.1)
    assert aux == {}
    assert torch.allclose(state["grad"], torch.tensor([-0.5, 1.0]))  # 0 - α Δ
    rule = s.client_rule(ins, state)
    assert torch.allclose(rule.gradient_correction, torch.tensor([0.5, -1.0]))
    # server: h = 0 - α |P|/m Δ = -0.5 * 0.5 * [2, 4] = [-0.5, -1]; θ = θ + Δ - h/α
    x1 = s.apply(torch.zeros(2), torch.tensor([2.0, 4.0]), {}, 1, num_clients=2,
                 total_clients=4)
    assert torch.allclose(s.h, torch.tensor([-0.5, -1.0]))
    assert torch.allclose(x1, torch.tensor([3.0, 6.0]))
    x2 = s.apply(x1, torch.tensor([0.0, 0.0]), {}, 2, num_clients=2, total_clients=4)
    assert torch.allclose(x2, torch.tensor([4.0, 8.0]))  # h unchanged, θ moves by -h/α again

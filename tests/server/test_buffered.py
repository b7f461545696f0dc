"""FedBuff's asynchronous schedule on the virtual clock (confide.server.buffered)."""

import json

import pytest
from confide_testing import FAST, assert_one_line_error, run_cli

from confide.app.simulate import run_simulation
from confide.exceptions import ConfigError
from confide.server.buffered import BufferedCoordinator

FEDBUFF = [*FAST, "strategy.name='fedbuff'", "strategy.buffer_size=3",
           "simulation.concurrency=6", "run.rounds=6"]


def _run(tmp_path, name, extra=()):
    return run_simulation(None, overrides=[*FEDBUFF, *extra], output=tmp_path / name)


def test_same_seed_same_asynchronous_run(tmp_path):
    a, ha = _run(tmp_path, "a")
    b, hb = _run(tmp_path, "b")
    assert (a / "history.json").read_text() == (b / "history.json").read_text()
    times = [r["virtual_time_s"] for r in ha]
    assert times == sorted(times) and times[0] > 0  # the clock only moves forward
    assert all(r["num_clients"] == 3 for r in ha)  # every server update is one full buffer
    assert any(r["mean_staleness"] > 0 for r in ha[1:])  # clients start from older models
    c, _ = _run(tmp_path, "c", ["run.seed=1"])
    assert (c / "history.json").read_text() != (a / "history.json").read_text()


def test_synchronous_rounds_wait_for_their_slowest_client(tmp_path):
    _, history = run_simulation(None, overrides=[*FAST], output=tmp_path / "sync")
    times = [r["virtual_time_s"] for r in history]
    steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(s > 0 for s in steps)


def test_fedbuff_with_central_dp_accounts_each_buffer_without_sampling_credit(tmp_path):
    from opacus.accountants import RDPAccountant

    run_dir, history = _run(tmp_path, "dp", ["privacy.mode='central'",
                                              "privacy.noise_multiplier=1.5",
                                              "privacy.clip_norm=1.0", "privacy.delta=1e-3"])
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    acc = RDPAccountant()
    for _ in range(len(history)):
        acc.step(noise_multiplier=1.5, sample_rate=1.0)  # one event per buffer, q = 1
    assert history[-1]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-6)
    assert ledger["epsilon"] == pytest.approx(history[-1]["epsilon"])


def test_buffer_larger_than_concurrency_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["simulate", "--set", "strategy.name='fedbuff'", "--set",
                            "strategy.buffer_size=9", "--set", "simulation.concurrency=4",
                            "-o", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err)
    assert "buffer_size = 9 is larger than the concurrency" in err


def test_needs_an_asynchronous_strategy(tmp_path):
    from confide.app.simulate import build_simulation
    from confide.config import load_config

    sim = build_simulation(load_config(None, FAST))
    c = sim.coordinator
    with pytest.raises(ConfigError, match="synchronous"):
        BufferedCoordinator(config=c.config, strategy=c.strategy, executor=c.executor,
                            aggregator=c.aggregator, privacy=c.privacy, params=c.params,
                            num_clients=c.num_clients, client_sizes=c.client_sizes,
                            latency=c.latency)

"""Deployments that outlive their failures (issue 12), end to end on loopback.

Three client processes, secure aggregation (t = 2) and central DP: a client revoked
mid-job, a client SIGKILLed at each secure-aggregation stage (and restarted), and the
coordinator SIGKILLed mid-round and resumed with ``server start --resume``. Every run must
finish all its rounds. Offline enrolment (in process) keeps the set-up short; clients are
killed at an exact stage by ``CONFIDE_FAULT_KILL_AT`` (a real SIGKILL from inside).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from confide_testing import run_cli
from deploy_testing import (
    free_port,
    offline_federation,
    port_open,
    processes,
    read_json,
    wait_for,
    write_partitions,
)

pytestmark = pytest.mark.slow

NAMES = ["c0", "c1", "c2"]
JOB = """
[run]
seed = 0
rounds = {rounds}
[data]
dataset = "digits"
num_clients = 3
partition = "iid"
[client]
epochs = 1
device = "cpu"
[cohort]
min_clients = 2
train_timeout_s = 60
[privacy]
mode = "central"
noise_multiplier = 0.0005
clip_norm = 5.0
[secure_aggregation]
enabled = true
threshold = 2
stage_timeout_s = 10
"""


class Job:
    """A federation of three enrolled clients and a job, ready to start."""

    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], rounds: int):
        self.tmp = tmp_path
        self.port = free_port()
        self.job = tmp_path / "job.toml"
        self.job.write_text(JOB.format(rounds=rounds))
        self.data = write_partitions(self.job, tmp_path)
        self.fed = offline_federation(tmp_path, NAMES, self.port, run_cli, capsys)
        self.run = tmp_path / "run"

    def server_args(self, *extra: str) -> list[str]:
        return ["server", "start", "--ca", str(self.fed), "--port", str(self.port), "--wait",
                "120", "--round-timeout", "60", *extra]

    def start_server(self, procs, name: str = "server", *extra: str):
        args = self.server_args(*(extra or ("--config", str(self.job), "--output",
                                            str(self.run))))
        server = procs.start(name, args)
        wait_for(lambda: port_open(self.port) or server.popen.poll() is not None, 120,
                 "the coordinator to listen")
        assert server.popen.poll() is None, server.stderr()[-3000:]
        return server

    def start_client(self, procs, i: int, name: str | None = None,
                     env: dict[str, str] | None = None):
        return procs.start(name or f"client{i}", [
            "client", "start", "--dir", str(self.tmp / NAMES[i]), "--data", str(self.data[i]),
            "--threads", "1", "--connect-timeout", "120"], env=env)

    def history(self) -> list[dict]:
        return read_json(self.run / "history.json") or []  # type: ignore[return-value]


def _kill(proc) -> None:
    os.killpg(proc.popen.pid, signal.SIGKILL)
    proc.popen.wait(timeout=20)


def _check_run(job: Job, rounds: int) -> list[dict]:
    """History, ledger and checkpoint agree: every round once, epsilon never under-counted."""
    import torch

    history = job.history()
    assert [r["round"] for r in history] == list(range(1, rounds + 1))
    ledger = read_json(job.run / "privacy_ledger.json")
    assert isinstance(ledger, dict)
    entries = [e for account in ledger["accounts"].values() for e in account]
    assert {e["round"] for e in entries} >= set(range(1, rounds + 1))
    assert max(e["epsilon"] for e in entries) >= history[-1]["epsilon"] > 0
    eps = [r["epsilon"] for r in history]
    assert eps == sorted(eps)
    state = torch.load(job.run / "checkpoint.pt", weights_only=True)
    assert state["round"] == rounds and len(state["history"]) == rounds
    return history


def test_a_client_revoked_after_round_two_leaves_two_that_finish(tmp_path, capsys):
    rounds = 4
    job = Job(tmp_path, capsys, rounds)
    with processes(tmp_path) as procs:
        server = job.start_server(procs)
        clients = [job.start_client(procs, i) for i in range(3)]
        wait_for(lambda: len(job.history()) >= 2, 300, "two rounds")
        code, _, err = run_cli(["clients", "revoke", "c2", "--ca", str(job.fed)], capsys)
        assert code == 0, err
        assert server.wait(300) == 0, server.stderr()[-3000:]
        assert clients[2].wait(60) == 9, clients[2].stderr()[-2000:]
    history = _check_run(job, rounds)
    assert history[0]["num_clients"] == 3
    assert history[-1]["num_clients"] == 2 and history[-1]["num_sampled"] == 3


STAGES = ["advertise_keys", "share_keys", "masked_input", "unmask"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_client_killed_at_each_secagg_stage_leaves_two_that_finish(tmp_path, capsys, stage):
    # The restarted client needs rounds more: its process starts (torch) while the other two
    # go on, and a round without a dead client's wait takes a second or two.
    rounds = 10 if stage == "share_keys" else 3
    job = Job(tmp_path, capsys, rounds)
    with processes(tmp_path) as procs:
        server = job.start_server(procs)
        victim = job.start_client(procs, 2, env={"CONFIDE_FAULT_KILL_AT": f"2:{stage}"})
        for i in (0, 1):
            job.start_client(procs, i)
        assert victim.wait(300) == -signal.SIGKILL, victim.stderr()[-2000:]
        restarted = None
        if stage == "share_keys":  # a killed client that is restarted rejoins
            restarted = job.start_client(procs, 2, name="client2-again")
        assert server.wait(300) == 0, server.stderr()[-3000:]
        if restarted is not None:
            assert restarted.wait(60) == 0, restarted.stderr()[-2000:]
    history = _check_run(job, rounds)
    # Leaving after its masked input was sent, it is in the sum (Bonawitz et al. 2017).
    assert history[1]["num_clients"] == (3 if stage == "unmask" else 2)
    if stage == "share_keys":
        assert history[-1]["num_clients"] == 3


def test_a_killed_coordinator_resumes_and_clients_reconnect(tmp_path, capsys):
    rounds = 4
    job = Job(tmp_path, capsys, rounds)
    with processes(tmp_path) as procs:
        server = job.start_server(procs)
        clients = [job.start_client(procs, i) for i in range(3)]
        wait_for(lambda: len(job.history()) >= 2, 300, "two rounds")
        _kill(server)  # in the middle of round 3
        done = len(job.history())
        assert done < rounds
        resumed = job.start_server(procs, "server-resumed", "--resume", str(job.run))
        assert resumed.wait(300) == 0, resumed.stderr()[-3000:]
        for c in clients:  # the same processes: they reconnected on their own
            assert c.wait(60) == 0, c.stderr()[-2000:]
    assert "resuming" in resumed.stderr()
    history = _check_run(job, rounds)
    assert all(r["num_clients"] == 3 for r in history[done:])

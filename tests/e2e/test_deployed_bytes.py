"""Issue 14, acceptance 4: deployed FedBuff and deployed compression, three client processes
on loopback TLS; the bytes the history counts match an independent socket-level count.

The history's ``bytes_up`` / ``bytes_down`` are counted by the coordinator's Grid executor:
the records of every message it pushed and pulled (``flower_app.message_bytes``). The
socket count is the recording proxy's: every byte the clients' TCP connections carried
after enrolment, i.e. TLS records holding HTTP requests (polls, heartbeats, the Flower
message envelopes) around those messages. So the socket count is the larger, and the
messages must be all but the whole of it.
"""

from __future__ import annotations

import pytest
from confide_testing import run_cli
from deploy_testing import run_deployed_job

pytestmark = pytest.mark.slow

JOB = """
[run]
seed = 0
rounds = {rounds}

[data]
dataset = "digits"
num_clients = 3
partition = "iid"

[model]
hidden_units = {hidden}

[client]
epochs = 1
device = "cpu"
{extra}
"""

TOLERANCE = 0.05


def _totals(history: list[dict]) -> tuple[int, int]:
    return sum(r["bytes_up"] for r in history), sum(r["bytes_down"] for r in history)


def _check_against_socket(run) -> None:  # type: ignore[no-untyped-def]
    up, down = _totals(run.history)
    assert run.socket_up >= up and run.socket_down >= down  # framing only adds
    assert run.socket_up / up - 1 <= TOLERANCE, (run.socket_up, up)
    assert run.socket_down / down - 1 <= TOLERANCE, (run.socket_down, down)


def test_deployed_fedbuff_bytes_match_the_socket_count(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(rounds=5, hidden=512, extra=(
        '[strategy]\nname = "fedbuff"\nbuffer_size = 2\n[simulation]\nconcurrency = 3\n')))
    run = run_deployed_job(tmp_path, job, run_cli, capsys)
    history = run.history
    assert [r["round"] for r in history] == [1, 2, 3, 4, 5]
    assert all(r["num_clients"] == 2 for r in history)  # every server update is one buffer
    # asynchronous: the client left out of a buffer keeps training on the older model
    assert any(r["mean_staleness"] > 0 for r in history)
    assert "dropped" not in run.server_stderr  # every task sent was answered and used
    assert history[-1]["test_accuracy"] > 0.5
    _check_against_socket(run)


def test_deployed_compression_bytes_match_the_socket_count(tmp_path, capsys):
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(rounds=3, hidden=1536, extra=(
        '[compression]\nmethod = "qsgd"\nbits = 8\n')))
    run = run_deployed_job(tmp_path, job, run_cli, capsys)
    history = run.history
    assert [r["num_clients"] for r in history] == [3, 3, 3]
    for r in history:  # 8-bit codes up, float32 weights down: about 4x fewer bytes up
        assert 3.9 < r["bytes_down"] / r["bytes_up"] < 4.1
    assert history[-1]["test_accuracy"] > 0.5
    _check_against_socket(run)

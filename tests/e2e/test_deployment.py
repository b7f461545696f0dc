"""End to end on loopback: a federation, a coordinator and three client processes.

Every process a test starts is stopped by it (``deploy_testing.processes``); ports are
picked at run time; clients reach the coordinator through a recording proxy, so the test
also sees every byte that crossed the network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from confide_testing import run_cli
from deploy_testing import (
    RecordingProxy,
    contains_any_window,
    free_port,
    port_open,
    processes,
    tls_records,
    wait_for,
    write_partitions,
)

pytestmark = pytest.mark.slow

JOB = """
[run]
seed = 0
rounds = {rounds}

[data]
dataset = "digits"
num_clients = 3
partition = "iid"

[client]
epochs = {epochs}
device = "cpu"

[cohort]
min_clients = {min_clients}

[privacy]
mode = "central"
noise_multiplier = 0.0005
clip_norm = 5.0
{secagg}
"""


def _job(path: Path, *, rounds: int = 3, epochs: int = 2, min_clients: int = 1,
         secure: bool = True) -> Path:
    secagg = "[secure_aggregation]\nenabled = true\n" if secure else ""
    path.write_text(JOB.format(rounds=rounds, epochs=epochs, min_clients=min_clients,
                               secagg=secagg))
    return path


def _federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, list[str]]:
    fed = tmp_path / "fed"
    code, _, err = run_cli(["ca", "init", str(fed), "--name", "e2e"], capsys)
    assert code == 0, err
    tokens = []
    for i in range(3):
        code, out, err = run_cli(["enrol", "token", "--ca", str(fed), "--name", f"c{i}",
                                  "--expires", "1h"], capsys)
        assert code == 0, err
        tokens.append(out.strip())
    return fed, tokens


def _simulated_accuracy(job: Path, noise_seed: int | None) -> float:
    from confide.app.simulate import build_simulation
    from confide.config import load_config

    sim = build_simulation(load_config(job))
    if noise_seed is not None:
        sim.coordinator.privacy.seed = noise_seed  # type: ignore[attr-defined]
    return float(sim.coordinator.run()[-1]["test_accuracy"])


def _initial_params(job: Path) -> torch.Tensor:
    from confide.app.simulate import build_simulation
    from confide.config import load_config

    return build_simulation(load_config(job)).coordinator.params


def test_three_clients_match_simulation_over_tls_only(tmp_path, capsys):
    """Acceptance 1 and 3: three enrolled client processes, FedAvg with secure aggregation
    and client-level DP; the final accuracy matches the simulation of the same job within
    one point, and the recorded traffic is TLS records only."""
    job = _job(tmp_path / "job.toml")
    data = write_partitions(job, tmp_path)
    fed, tokens = _federation(tmp_path, capsys)
    port = free_port()
    with processes(tmp_path) as procs:
        server = procs.start("server", ["server", "start", "--ca", str(fed), "--config",
                                        str(job), "--port", str(port), "--output",
                                        str(tmp_path / "run"), "--wait", "240",
                                        "--round-timeout", "120"])
        wait_for(lambda: port_open(port) or server.popen.poll() is not None, 120,
                 "the coordinator to listen")
        assert server.popen.poll() is None, server.stderr()
        proxy = RecordingProxy(port)
        try:
            enrols = [procs.start(f"enrol{i}", [
                "client", "enrol", "--coordinator", f"127.0.0.1:{proxy.port}", "--token",
                tokens[i], "--dir", str(tmp_path / f"c{i}")]) for i in range(3)]
            for p in enrols:
                assert p.wait(120) == 0, p.stderr()
            clients = [procs.start(f"client{i}", [
                "client", "start", "--dir", str(tmp_path / f"c{i}"), "--data", str(data[i]),
                "--threads", "1"]) for i in range(3)]
            assert server.wait(400) == 0, server.stderr()[-3000:]
            for c in clients:
                assert c.wait(60) == 0, c.stderr()[-3000:]
        finally:
            proxy.close()

    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["num_clients"] for r in history] == [3, 3, 3]
    assert server.stderr().count("secure aggregation, round") == 3
    assert all(r["epsilon"] is not None and r["epsilon"] > 0 for r in history)
    assert (tmp_path / "run" / "privacy_ledger.json").is_file()

    # The deployed coordinator draws its DP noise from a secret (CSPRNG) seed, the simulation
    # from run.seed: the same job in simulation is compared over three noise draws.
    deployed = history[-1]["test_accuracy"]
    # With 359 test images one point is 3.6 images, about the spread between noise draws, so
    # the deployed run must lie within one point of the simulation's range over five draws.
    simulated = sorted(_simulated_accuracy(job, noise_seed)
                       for noise_seed in (None, 1, 2, 3, 4))
    assert simulated[0] - 0.01 <= deployed <= simulated[-1] + 0.01, (deployed, simulated)
    assert deployed > 0.9

    # Acceptance 3: every recorded connection is TLS records only, and the model the
    # coordinator sent in round 1 (its initial weights, float32) is nowhere in the clear.
    assert len(proxy.streams) >= 6  # 2 per enrolment + at least one per client
    model = _initial_params(job).numpy().astype("float32").tobytes()
    for up, down in proxy.streams:
        for stream in (bytes(up), bytes(down)):
            records = tls_records(stream)
            assert records, "an empty connection"
            assert not contains_any_window(stream, model)
    assert sum(len(d) for _, d in proxy.streams) > len(model)  # the model did travel


def test_detector_finds_model_bytes_in_plaintext_messages():
    """The capture checks above would catch a plaintext model: Flower's Array carries the
    float32 bytes verbatim, which ``contains_any_window`` finds and ``tls_records`` rejects."""
    from confide.client.messages import tensor_to_array

    params = torch.randn(5000)
    array = tensor_to_array(params)
    wire = b"POST /v1/fleet/push-object HTTP/1.1\r\n\r\n" + array.data
    assert contains_any_window(wire, params.numpy().tobytes())
    with pytest.raises(ValueError):
        tls_records(wire)


def test_revoked_client_refused_and_excluded_next_round(tmp_path, capsys):
    """Acceptance 2 (revocation): revoking a client during a job refuses its next request
    and a fresh connection, and it is left out of the following rounds."""
    # Without secure aggregation (with it: tests/e2e/test_deploy_failures.py).
    job = _job(tmp_path / "job.toml", rounds=40, epochs=1, min_clients=2, secure=False)
    data = write_partitions(job, tmp_path)
    fed, tokens = _federation(tmp_path, capsys)
    port = free_port()
    run = tmp_path / "run"
    with processes(tmp_path) as procs:
        server = procs.start("server", ["server", "start", "--ca", str(fed), "--config",
                                        str(job), "--port", str(port), "--output", str(run),
                                        "--wait", "240", "--round-timeout", "60"])
        wait_for(lambda: port_open(port) or server.popen.poll() is not None, 120,
                 "the coordinator to listen")
        enrols = [procs.start(f"enrol{i}", [
            "client", "enrol", "--coordinator", f"127.0.0.1:{port}", "--token", tokens[i],
            "--dir", str(tmp_path / f"c{i}")]) for i in range(3)]
        for p in enrols:
            assert p.wait(120) == 0, p.stderr()
        clients = [procs.start(f"client{i}", [
            "client", "start", "--dir", str(tmp_path / f"c{i}"), "--data", str(data[i]),
            "--threads", "1"]) for i in range(3)]

        def rounds_done() -> int:
            try:
                return len(json.loads((run / "history.json").read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                return 0

        wait_for(lambda: rounds_done() >= 1, 240, "the first round")
        code, _, err = run_cli(["clients", "revoke", "c2", "--ca", str(fed)], capsys)
        assert code == 0, err
        revoked_after = rounds_done()

        # Its next request is refused: the running client stops with a security error.
        assert clients[2].wait(60) == 9, clients[2].stderr()
        assert "refused" in clients[2].stderr()
        # A fresh connection is refused at the TLS handshake (the CRL).
        again = procs.start("client2-again", ["client", "start", "--dir", str(tmp_path / "c2"),
                                              "--data", str(data[2]),
                                              "--connect-timeout", "20"])
        assert again.wait(120) == 9, again.stderr()
        lines = [ln for ln in again.stderr().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1 and "refused" in lines[0], again.stderr()

        wait_for(lambda: rounds_done() >= revoked_after + 2, 240, "two more rounds")
        assert server.popen.poll() is None, server.stderr()[-3000:]
    history = json.loads((run / "history.json").read_text())
    assert history[0]["num_clients"] == 3
    later = history[revoked_after + 1:]
    assert later and all(r["num_clients"] == 2 and r["num_sampled"] == 3 for r in later)
    # The coordinator stopped its SuperLink when it was stopped: its socket and private
    # folder are gone, and nothing listens on the public port.
    log = (run / "superlink.log").read_text()
    link_socket = Path(log.split("Uvicorn running on unix socket ")[1].split()[0])
    assert not link_socket.exists() and not link_socket.parent.exists()
    time.sleep(0.5)
    assert not port_open(port)

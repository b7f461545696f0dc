"""Deployment commands: the operator's and the client's flows, and bad input (acceptance 5):
one line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from confide_testing import assert_one_line_error, run_cli

from confide.client.enrol import enrol_online
from confide.server.ca import load_federation
from confide.server.enrolment import EnrolmentAuthority
from confide.server.gateway import Gateway


@pytest.fixture
def fed(tmp_path, capsys):
    code, out, err = run_cli(["ca", "init", str(tmp_path / "fed"), "--name", "cli",
                              "--host", "127.0.0.1"], capsys)
    assert code == 0, err
    assert "CA fingerprint" in out
    return tmp_path / "fed"


@pytest.fixture
def gateway(fed):
    authority = EnrolmentAuthority(load_federation(fed))
    gw = Gateway(federation=authority.federation, host="127.0.0.1", port=0, upstream=None,
                 authority=authority)
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()


def _token(fed, capsys, *extra: str) -> str:
    code, out, err = run_cli(["enrol", "token", "--ca", str(fed), *extra], capsys)
    assert code == 0, err
    return out.strip()


def test_operator_flow(fed, gateway, tmp_path, capsys):
    token = _token(fed, capsys, "--name", "alice", "--expires", "30m")
    code, out, err = run_cli(["client", "enrol", "--coordinator",
                              f"127.0.0.1:{gateway.bound_port}", "--token", token, "--dir",
                              str(tmp_path / "alice")], capsys)
    assert code == 0, err
    assert "'alice' enrolled" in out
    code, out, _ = run_cli(["clients", "list", "--ca", str(fed), "--tokens"], capsys)
    assert code == 0 and "alice" in out and "active" in out
    code, out, _ = run_cli(["clients", "revoke", "alice", "--ca", str(fed)], capsys)
    assert code == 0 and "revoked" in out
    code, out, _ = run_cli(["clients", "list", "--ca", str(fed)], capsys)
    assert "revoked" in out


def test_offline_flow(fed, tmp_path, capsys):
    token = _token(fed, capsys)
    request, answer = tmp_path / "req.json", tmp_path / "ans.json"
    code, _, err = run_cli(["client", "enrol", "--token", token, "--dir", str(tmp_path / "c"),
                            "--name", "silo", "--offline-request", str(request)], capsys)
    assert code == 0, err
    code, _, err = run_cli(["enrol", "answer", "--ca", str(fed), str(request), "-o",
                            str(answer), "--coordinator", "127.0.0.1:9092"], capsys)
    assert code == 0, err
    assert json.loads(answer.read_text())["name"] == "silo"
    code, out, err = run_cli(["client", "enrol", "--import", str(answer), "--dir",
                              str(tmp_path / "c")], capsys)
    assert code == 0, err
    # answering the same request again: the token is spent
    code, _, err = run_cli(["enrol", "answer", "--ca", str(fed), str(request), "-o",
                            str(tmp_path / "again.json")], capsys)
    assert_one_line_error(code, err)
    assert "already used" in err and not (tmp_path / "again.json").exists()


@pytest.mark.parametrize("args, match", [
    (["enrol", "token", "--ca", "{fed}", "--expires", "90d"], "out of range"),
    (["enrol", "token", "--ca", "{tmp}/nowhere"], "not found"),
    (["enrol", "token", "--ca", "{fed}", "--name", "bad name!"], "--name"),
    (["clients", "revoke", "nobody", "--ca", "{fed}"], "no client named"),
    (["ca", "init", "{fed}"], "not empty"),
])
def test_operator_mistakes(fed, tmp_path, capsys, args, match):
    args = [a.format(fed=fed, tmp=tmp_path) for a in args]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err)
    assert match in err


@pytest.mark.parametrize("job, match", [
    ("[run]\nrounds = 0\n", "run.rounds"),
    ("[data]\nnum_clients = 3\ncolour = 'red'\n", "unknown key data.colour"),
    ("[run\nrounds = 2\n", "not valid TOML"),
    ("[data]\nnum_clients = 3\n[simulation]\ndropout_rate = 0.2\n", "simulation only"),
    ("[data]\nnum_clients = 3\npath = 'pooled.csv'\n", "--test-data"),
    ("[data]\nnum_clients = 3\n[privacy]\nmode = 'central'\nnoise_multiplier = 1.0\n"
     "adaptive_clipping = true\n", "adaptive_clipping"),
    ("[data]\nnum_clients = 3\n[strategy]\nname = 'fedbuff'\nbuffer_size = 2\n"
     "[secure_aggregation]\nenabled = true\n", "FedBuff with secure aggregation"),
    ("[data]\nnum_clients = 3\n[strategy]\nname = 'fedbuff'\nbuffer_size = 3\n"
     "[simulation]\nconcurrency = 2\n", "larger than the concurrency"),
])
def test_job_file_with_errors(fed, tmp_path, capsys, job, match):
    (tmp_path / "job.toml").write_text(job)
    out_dir = tmp_path / "run"
    code, _, err = run_cli(["server", "start", "--ca", str(fed), "--config",
                            str(tmp_path / "job.toml"), "--output", str(out_dir), "--port",
                            "0", "--wait", "1"], capsys)
    assert_one_line_error(code, err)
    assert match in err
    assert not out_dir.exists()  # nothing written, nothing started


def test_more_enrolled_clients_than_the_job_expects(fed, gateway, tmp_path, capsys):
    for i in range(2):
        enrol_online(coordinator=f"127.0.0.1:{gateway.bound_port}",
                     token=_token(fed, capsys), directory=tmp_path / f"c{i}")
    (tmp_path / "job.toml").write_text("[data]\nnum_clients = 1\n")
    capsys.readouterr()  # the in-process gateway's own log lines
    code, _, err = run_cli(["server", "start", "--ca", str(fed), "--config",
                            str(tmp_path / "job.toml"), "--output", str(tmp_path / "run")],
                           capsys)
    assert_one_line_error(code, err)
    assert "2 clients are enrolled" in err and not (tmp_path / "run").exists()


def test_wrong_coordinator_address(fed, gateway, tmp_path, capsys):
    code, _, err = run_cli(["client", "enrol", "--coordinator", "127.0.0.1:1", "--token",
                            _token(fed, capsys), "--dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(code, err)
    assert "cannot reach" in err and not (tmp_path / "c").exists()
    code, _, err = run_cli(["client", "enrol", "--coordinator", "no-port", "--token",
                            _token(fed, capsys), "--dir", str(tmp_path / "c")], capsys)
    assert_one_line_error(code, err)
    # an enrolled client whose coordinator is gone
    enrol_online(coordinator=f"127.0.0.1:{gateway.bound_port}", token=_token(fed, capsys),
                 directory=tmp_path / "d")
    gateway.stop()
    np.savez(tmp_path / "data.npz", x=np.ones((4, 64)), y=np.array([0, 1, 2, 3]))
    capsys.readouterr()
    code, _, err = run_cli(["client", "start", "--dir", str(tmp_path / "d"), "--data",
                            str(tmp_path / "data.npz"), "--connect-timeout", "1", "-q"], capsys)
    assert_one_line_error(code, err)
    assert "cannot reach the coordinator" in err


def test_client_started_with_another_federations_files(fed, gateway, tmp_path, capsys):
    code, _, _ = run_cli(["ca", "init", str(tmp_path / "other"), "--host", "127.0.0.1"], capsys)
    other = EnrolmentAuthority(load_federation(tmp_path / "other"))
    other_gw = Gateway(federation=other.federation, host="127.0.0.1", port=0, upstream=None,
                       authority=other)
    other_gw.start()
    try:
        enrol_online(coordinator=f"127.0.0.1:{other_gw.bound_port}",
                     token=other.issue_token(), directory=tmp_path / "c")
    finally:
        other_gw.stop()
    manifest = tmp_path / "c" / "client.toml"
    manifest.write_text(manifest.read_text().replace(
        str(other_gw.bound_port), str(gateway.bound_port)))
    np.savez(tmp_path / "data.npz", x=np.ones((4, 64)), y=np.array([0, 1, 2, 3]))
    capsys.readouterr()
    code, _, err = run_cli(["client", "start", "--dir", str(tmp_path / "c"), "--data",
                            str(tmp_path / "data.npz"), "--connect-timeout", "5", "-q"], capsys)
    assert_one_line_error(code, err)
    assert code == 9 and "another federation" in err


@pytest.mark.parametrize("setup, match", [
    ("missing-dir", "not found"),
    ("missing-data", "not found"),
    ("bad-data", "must hold arrays"),
])
def test_client_start_bad_input(fed, gateway, tmp_path, capsys, setup, match):
    if setup != "missing-dir":
        enrol_online(coordinator=f"127.0.0.1:{gateway.bound_port}", token=_token(fed, capsys),
                     directory=tmp_path / "c")
    np.savez(tmp_path / "bad.npz", features=np.ones(3))
    data = {"missing-data": tmp_path / "none.npz", "bad-data": tmp_path / "bad.npz"}.get(
        setup, tmp_path / "bad.npz")
    capsys.readouterr()
    code, _, err = run_cli(["client", "start", "--dir", str(tmp_path / "c"), "--data",
                            str(data), "-q"], capsys)
    assert_one_line_error(code, err)
    assert match in err


@pytest.mark.parametrize("edit", [
    lambda r: {**r, "csr": r["csr"].replace("BEGIN", "BÉGIN")},  # issue 12: non-ASCII csr
    lambda r: {**r, "csr": r["csr"][:40]},
    lambda r: [r],
])
def test_enrol_answer_on_a_malformed_request_is_one_line(fed, tmp_path, capsys, edit):
    """A damaged offline request: exit code 9, one line naming the file, no answer, token kept."""
    token = _token(fed, capsys)
    request, answer = tmp_path / "req.json", tmp_path / "ans.json"
    code, _, err = run_cli(["client", "enrol", "--token", token, "--dir", str(tmp_path / "c"),
                            "--offline-request", str(request)], capsys)
    assert code == 0, err
    request.write_text(json.dumps(edit(json.loads(request.read_text())), ensure_ascii=False),
                       encoding="utf-8")
    code, _, err = run_cli(["enrol", "answer", "--ca", str(fed), str(request), "-o",
                            str(answer)], capsys)
    assert_one_line_error(code, err)
    assert code == 9 and not answer.exists()
    registry = EnrolmentAuthority(load_federation(fed)).registry
    assert all(t.used_at is None for t in registry.tokens())

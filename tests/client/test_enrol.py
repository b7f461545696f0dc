"""Client enrolment: online over TLS, offline by files, and what a failure leaves behind."""

from __future__ import annotations

import json
import stat

import pytest

from confide.client.enrol import (
    enrol_online,
    import_answer,
    load_identity,
    parse_address,
    write_offline_request,
)
from confide.exceptions import ConfigError, SecurityError
from confide.server.ca import init_federation, load_federation
from confide.server.enrolment import EnrolmentAuthority
from confide.server.gateway import Gateway


@pytest.fixture
def coordinator(tmp_path):
    init_federation(tmp_path / "fed", name="t", hosts=["127.0.0.1", "localhost"])
    authority = EnrolmentAuthority(load_federation(tmp_path / "fed"))
    gw = Gateway(federation=authority.federation, host="127.0.0.1", port=0, upstream=None,
                 authority=authority)
    gw.start()
    try:
        yield authority, f"127.0.0.1:{gw.bound_port}"
    finally:
        gw.stop()


def test_online_enrolment_keeps_the_key_local(coordinator, tmp_path):
    authority, address = coordinator
    name = enrol_online(coordinator=address, token=authority.issue_token(name="alice"),
                        directory=tmp_path / "alice")
    identity = load_identity(tmp_path / "alice")
    assert name == identity.name == "alice"
    assert identity.coordinator == address
    assert stat.S_IMODE((tmp_path / "alice" / "client.key").stat().st_mode) == 0o600
    record = authority.registry.active_clients()[0]
    # the registry holds the public key only
    assert "PRIVATE" not in json.dumps(authority.registry.path.read_text())
    from confide.server.ca import public_key_pem
    assert record.public_key == public_key_pem(identity.key.public_key()).decode()


def test_client_chooses_its_name_when_the_token_does_not(coordinator, tmp_path):
    authority, address = coordinator
    assert enrol_online(coordinator=address, token=authority.issue_token(),
                        directory=tmp_path / "x", name="hospital-a") == "hospital-a"


def test_refused_enrolment_leaves_nothing(coordinator, tmp_path):
    authority, address = coordinator
    token = authority.issue_token()
    enrol_online(coordinator=address, token=token, directory=tmp_path / "first")
    with pytest.raises(SecurityError, match="already used"):
        enrol_online(coordinator=address, token=token, directory=tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".second")]


def test_token_for_another_federation_is_never_sent(coordinator, tmp_path):
    """The CA pin in the token is checked before the token leaves the client."""
    authority, address = coordinator
    init_federation(tmp_path / "other", name="o", hosts=["127.0.0.1"])
    other = EnrolmentAuthority(load_federation(tmp_path / "other"))
    token = other.issue_token()
    with pytest.raises(SecurityError, match="another federation than the token"):
        enrol_online(coordinator=address, token=token, directory=tmp_path / "c")
    assert authority.registry.tokens() == []  # this coordinator never saw a token
    assert not (tmp_path / "c").exists()


def test_wrong_address_is_one_clear_error(tmp_path):
    with pytest.raises(SecurityError, match="cannot reach the coordinator"):
        enrol_online(coordinator="127.0.0.1:1", directory=tmp_path / "c",
                     token="cfd1." + "A" * 22 + "." + "A" * 43 + "." + "A" * 22, timeout=2)
    assert not (tmp_path / "c").exists()
    for bad in ["nohost", "host:", "host:0", "host:99999", "[::1", ":80"]:
        with pytest.raises(ConfigError):
            parse_address(bad)
    assert parse_address("[::1]:9092") == ("::1", 9092)


def test_existing_folder_is_not_overwritten(coordinator, tmp_path):
    authority, address = coordinator
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        enrol_online(coordinator=address, token=authority.issue_token(),
                     directory=tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"


def test_offline_enrolment(coordinator, tmp_path):
    authority, address = coordinator
    token = authority.issue_token(name="silo")
    write_offline_request(token=token, directory=tmp_path / "silo",
                          request_file=tmp_path / "request.json", coordinator=address)
    with pytest.raises(ConfigError, match="not finished"):
        load_identity(tmp_path / "silo")
    request = json.loads((tmp_path / "request.json").read_text())
    assert "PRIVATE" not in json.dumps(request)
    result = authority.enrol(token=request["token"], csr_pem=request["csr"].encode())
    (tmp_path / "answer.json").write_text(json.dumps(result.to_json()))
    assert import_answer(directory=tmp_path / "silo",
                         answer_file=tmp_path / "answer.json") == "silo"
    identity = load_identity(tmp_path / "silo")
    assert identity.coordinator == address


def test_offline_answer_for_another_key_is_refused(coordinator, tmp_path):
    authority, address = coordinator
    for name in ("a", "b"):
        write_offline_request(token=authority.issue_token(name=name),
                              directory=tmp_path / name, request_file=tmp_path / f"{name}.json",
                              coordinator=address)
    request_b = json.loads((tmp_path / "b.json").read_text())
    answer_b = authority.enrol(token=request_b["token"], csr_pem=request_b["csr"].encode())
    (tmp_path / "answer_b.json").write_text(json.dumps(answer_b.to_json()))
    with pytest.raises(SecurityError, match="different key"):
        import_answer(directory=tmp_path / "a", answer_file=tmp_path / "answer_b.json")
    with pytest.raises(ConfigError, match="not finished"):
        load_identity(tmp_path / "a")  # still pending, untouched


def test_mixed_federation_files_are_detected(coordinator, tmp_path):
    authority, address = coordinator
    enrol_online(coordinator=address, token=authority.issue_token(), directory=tmp_path / "c")
    init_federation(tmp_path / "other", name="o", hosts=["127.0.0.1"])
    other_ca = (tmp_path / "other" / "ca.pem").read_bytes()
    (tmp_path / "c" / "ca.pem").write_bytes(other_ca)
    with pytest.raises(SecurityError, match="different federations"):
        load_identity(tmp_path / "c")


def test_expired_token_refused_by_the_coordinator(coordinator, tmp_path):
    import datetime as dt
    import time

    authority, address = coordinator
    token = authority.issue_token(expires=dt.timedelta(seconds=1))
    time.sleep(1.5)
    with pytest.raises(SecurityError, match="expired"):
        enrol_online(coordinator=address, token=token, directory=tmp_path / "late")
    assert not (tmp_path / "late").exists()
    assert authority.registry.clients() == []


def test_forged_token_refused_by_the_coordinator(coordinator, tmp_path):
    authority, address = coordinator
    prefix, tid, mac, pin = authority.issue_token().split(".")
    forged = ".".join([prefix, tid, ("B" if mac[0] != "B" else "C") + mac[1:], pin])
    with pytest.raises(SecurityError, match="forged"):
        enrol_online(coordinator=address, token=forged, directory=tmp_path / "f")
    assert authority.registry.clients() == []


@pytest.mark.parametrize("reply", [b"garbage\r\n\r\n", b"HTTP/1.1 99999 x\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nab", b""])
def test_a_coordinator_answering_broken_http_is_one_security_error(tmp_path, reply):
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply)

    thread = threading.Thread(target=answer)
    thread.start()
    try:
        with pytest.raises(SecurityError):
            enrol_online(coordinator=f"127.0.0.1:{server.getsockname()[1]}",
                         directory=tmp_path / "c", insecure=True, timeout=5,
                         token="cfd1." + "A" * 22 + "." + "A" * 43 + "." + "A" * 22)
    finally:
        thread.join(timeout=10)
        server.close()
    assert not (tmp_path / "c").exists()

"""The exposure of Flower's SuperLink, and the gateway that closes it.

Finding (Flower 1.41 OSS): the SuperLink serves its Control API (``/v1/control/*``) on the
same HTTP server as the Fleet API, and without Flower's enterprise account plugins the Control
API authenticates nobody. ``test_superlink_control_api_authenticates_nobody`` shows it against
a real SuperLink with SuperNode authentication: whoever reaches it registers its own node key
and starts a run. Confide therefore serves the SuperLink on a Unix socket only the
coordinator's uid can reach (``tests/server/test_superlink.py``) and exposes only the gateway,
whose refusals are tested below (acceptance 2: other CA, unenrolled key, revoked client,
plaintext).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from confide.client.enrol import enrol_online, load_identity
from confide.client.node import NodeOptions, _Fleet, _Refused
from confide.exceptions import SecurityError
from confide.server.ca import CertificateAuthority, init_federation, load_federation
from confide.server.enrolment import EnrolmentAuthority
from confide.server.gateway import Gateway
from confide.server.superlink import FAB_PYPROJECT, SuperLinkClient, SuperLinkProcess


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gw")
    init_federation(root / "fed", name="gw", hosts=["127.0.0.1", "localhost"])
    fed = load_federation(root / "fed")
    authority = EnrolmentAuthority(fed)
    link = SuperLinkProcess(federation=fed, log_path=root / "superlink.log")
    link.start()
    runtime = SuperLinkClient(link)
    gateway = Gateway(federation=fed, host="127.0.0.1", port=0, upstream=link.address,
                      authority=authority)
    try:
        runtime.start_run("test")
        gateway.start()
        yield {"root": root, "fed": fed, "authority": authority, "link": link,
               "runtime": runtime, "gateway": gateway, "port": gateway.bound_port}
    finally:
        gateway.stop()
        runtime.finish_run(ok=True, details="")
        link.stop()


def _enrolled(setup, name: str):
    authority = setup["authority"]
    directory = setup["root"] / name
    enrol_online(coordinator=f"127.0.0.1:{setup['port']}", directory=directory,
                 token=authority.issue_token(name=name))
    record = next(c for c in authority.registry.clients() if c.name == name)
    setup["runtime"].register(record)
    return load_identity(directory)


def _client_context(setup, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                    folder: Path) -> ssl.SSLContext:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "c.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    ctx = ssl.create_default_context(cafile=str(setup["fed"].paths.ca_cert))
    ctx.load_cert_chain(str(folder / "c.pem"), str(folder / "c.key"))
    return ctx


def _csr(key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256()))


def _alert(exc: BaseException) -> str:
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return str(exc)


# ----------------------------------------------------------------- the finding


def test_superlink_control_api_authenticates_nobody(setup):
    """Whoever reaches the SuperLink needs no credentials for its Control API."""
    from flwr.cli.build import build_fab_from_files
    from flwr.common.serde import fab_to_proto
    from flwr.proto.control_pb2 import RegisterNodeRequest, StartRunRequest
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.fab import Fab

    attacker = setup["link"].connect(ControlHttpClient)  # no credentials of any kind
    try:
        key = ec.generate_private_key(ec.SECP384R1())
        pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        node = attacker.RegisterNode(RegisterNodeRequest(public_key=pem))
        assert node.node_id != 0  # an unenrolled key became a SuperNode
        fab, _ = build_fab_from_files({"pyproject.toml": FAB_PYPROJECT.encode()})
        run = attacker.StartRun(StartRunRequest(fab=fab_to_proto(Fab("", fab, {}))))
        assert run.HasField("run_id")  # and a stranger started a run
    finally:
        attacker.close()


def test_superlink_listens_on_no_tcp_port(setup):
    """The SuperLink's only listening socket is its Unix socket: no TCP port, not even loopback."""
    pid = setup["link"].process.pid
    inodes = {os.readlink(f) for f in Path(f"/proc/{pid}/fd").iterdir()
              if os.readlink(f).startswith("socket:")}
    listening = set()
    for table in ("tcp", "tcp6"):
        rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        listening |= {f"socket:[{r.split()[9]}]" for r in rows if r.split()[3] == "0A"}
    assert inodes and not inodes & listening
    unix = Path(f"/proc/{pid}/net/unix").read_text()
    assert str(setup["link"].socket_path) in unix


# ----------------------------------------------------------------- the gateway


@pytest.mark.parametrize("path", ["/v1/control/register-node", "/v1/control/start-run",
                                  "/v1/runtime/acquire-task", "/v1/runtime/pull-task-input",
                                  "/v1/fleet/register-node", "/docs", "/health"])
def test_gateway_does_not_expose_control_or_runtime(setup, path):
    """Without a client certificate (and with one), only enrolment and Fleet routes exist."""
    ctx = ssl.create_default_context(cafile=str(setup["fed"].paths.ca_cert))
    res = httpx.post(f"https://127.0.0.1:{setup['port']}{path}", content=b"\x00",
                     verify=ctx)
    assert res.status_code == 404


def test_fleet_routes_need_a_client_certificate(setup):
    ctx = ssl.create_default_context(cafile=str(setup["fed"].paths.ca_cert))
    res = httpx.post(f"https://127.0.0.1:{setup['port']}/v1/fleet/pull-messages",
                     content=b"", verify=ctx)
    assert res.status_code == 403
    assert "certificate is required" in res.json()["error"]


def test_enrolled_client_reaches_the_superlink(setup):
    identity = _enrolled(setup, "alice")
    fleet = _Fleet(identity, NodeOptions())
    try:
        assert fleet.activate() != 0
        assert fleet.pull() is None  # no work yet, but the Fleet API answered
    finally:
        fleet.deactivate()
        fleet.client.close()


def test_certificate_from_another_ca_is_refused_at_the_handshake(setup, tmp_path):
    other = CertificateAuthority.create(federation_name="other", federation_id="o")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = other.issue_client(csr=_csr(key), name="mallory", validity=dt.timedelta(days=1))
    ctx = _client_context(setup, cert, key, tmp_path)
    with pytest.raises(httpx.HTTPError) as info:
        httpx.post(f"https://127.0.0.1:{setup['port']}/v1/fleet/pull-messages",
                   content=b"", verify=ctx)
    assert "unknown ca" in _alert(info.value).lower()


def test_self_signed_certificate_is_refused_at_the_handshake(setup, tmp_path):
    ca = CertificateAuthority.create(federation_name="self", federation_id="s")
    ctx = _client_context(setup, ca.cert, ca.key, tmp_path)
    with pytest.raises(httpx.HTTPError):
        httpx.post(f"https://127.0.0.1:{setup['port']}/v1/fleet/pull-messages",
                   content=b"", verify=ctx)


def test_unenrolled_key_is_refused(setup, tmp_path):
    """A certificate of this CA whose key was never enrolled (not in the registry)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = setup["fed"].ca.issue_client(csr=_csr(key), name="ghost",
                                        validity=dt.timedelta(days=1))
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    ctx = _client_context(setup, cert, key, tmp_path)
    from flwr.supernode.fleet_http_client import FleetHttpClient

    client = FleetHttpClient(f"https://127.0.0.1:{setup['port']}", verify=ctx,
                             interceptors=[NodeAuthHttpInterceptor(key, key.public_key())])
    from flwr.proto.fleet_pb2 import ActivateNodeRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    try:
        with pytest.raises(httpx.HTTPStatusError) as info:
            client.ActivateNode(ActivateNodeRequest(
                public_key=public_key_to_bytes(key.public_key()), heartbeat_interval=30))
        assert info.value.response.status_code == 403
        assert "not enrolled" in info.value.response.json()["error"]
    finally:
        client.close()


def test_node_key_must_be_the_certificate_key(setup):
    """An enrolled client cannot sign Flower requests as another node."""
    identity = _enrolled(setup, "bob")
    identity.key = ec.generate_private_key(ec.SECP256R1())  # a different node-auth key
    fleet = _Fleet(identity, NodeOptions())
    identity.key = load_identity(identity.directory).key
    try:
        with pytest.raises(_Refused, match="not the certificate's key"):
            fleet.activate()
    finally:
        fleet.client.close()


def test_revoked_client_refused_on_the_open_connection_and_the_next(setup):
    identity = _enrolled(setup, "carol")
    fleet = _Fleet(identity, NodeOptions())
    try:
        fleet.activate()
        setup["authority"].revoke("carol")
        with pytest.raises(_Refused, match="revoked"):
            fleet.pull()  # the open connection: refused at its next request
    finally:
        fleet.client.close()
    fresh = _Fleet(identity, NodeOptions())
    try:
        with pytest.raises(httpx.HTTPError) as info:
            fresh.activate()  # a new connection: the CRL refuses the handshake
        assert "certificate revoked" in _alert(info.value).lower()
    finally:
        fresh.client.close()


def test_plaintext_connection_to_the_tls_port_gets_no_http_answer(setup):
    before = dict(setup["gateway"].refusals)
    with socket.create_connection(("127.0.0.1", setup["port"]), timeout=10) as s:
        s.sendall(b"POST /v1/control/start-run HTTP/1.1\r\nHost: x\r\nContent-Length: 0"
                  b"\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert b"HTTP/" not in data  # no HTTP response: the TLS layer refused the bytes
    if data:
        assert data[0] == 21  # at most a TLS alert record
    assert setup["gateway"].refusals.get("tls-handshake", 0) > before.get("tls-handshake", 0)


def test_wrong_federation_client_folder_fails_with_one_line(setup, tmp_path):
    """A client folder from another federation pointed at this coordinator."""
    init_federation(tmp_path / "other", name="other", hosts=["127.0.0.1"])
    other = EnrolmentAuthority(load_federation(tmp_path / "other"))
    gw = Gateway(federation=other.federation, host="127.0.0.1", port=0, upstream=None,
                 authority=other)
    gw.start()
    try:
        enrol_online(coordinator=f"127.0.0.1:{gw.bound_port}", directory=tmp_path / "c",
                     token=other.issue_token())
    finally:
        gw.stop()
    identity = load_identity(tmp_path / "c")
    identity.coordinator = f"127.0.0.1:{setup['port']}"
    from confide.client.node import _connect

    fleet = _Fleet(identity, NodeOptions(connect_timeout=5))
    try:
        with pytest.raises(SecurityError, match="not from this client's federation"):
            _connect(fleet, NodeOptions(connect_timeout=5))
    finally:
        fleet.client.close()


def test_insecure_mode_still_authenticates_nodes(setup, tmp_path):
    """--insecure: plain HTTP on the public port, clients identified by their node key."""
    gw = Gateway(federation=setup["fed"], host="127.0.0.1", port=0,
                 upstream=setup["link"].address, insecure=True, authority=setup["authority"])
    gw.start()
    try:
        address = f"127.0.0.1:{gw.bound_port}"
        enrol_online(coordinator=address, directory=tmp_path / "plain", insecure=True,
                     token=setup["authority"].issue_token(name="plain"))
        record = next(c for c in setup["authority"].registry.clients() if c.name == "plain")
        setup["runtime"].register(record)
        identity = load_identity(tmp_path / "plain")
        fleet = _Fleet(identity, NodeOptions(insecure=True))
        try:
            assert fleet.activate() != 0
        finally:
            fleet.deactivate()
            fleet.client.close()
        stranger = load_identity(tmp_path / "plain")
        stranger.key = ec.generate_private_key(ec.SECP256R1())  # not an enrolled key
        fleet = _Fleet(stranger, NodeOptions(insecure=True))
        try:
            with pytest.raises(_Refused, match="not enrolled"):
                fleet.activate()
        finally:
            fleet.client.close()
        res = httpx.post(f"http://{address}/v1/control/start-run", content=b"")
        assert res.status_code == 404
    finally:
        gw.stop()

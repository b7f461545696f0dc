"""The gateway's limits before authentication, on loopback with real TLS (issue 12).

Found before: the gateway read whole bodies (up to 256 MiB) before it looked at the route or
the certificate; ``?x=1`` on the enrolment path lifted its 64 KiB limit; a handshaked
connection that sent nothing stayed open. Here a request is refused from its head, the
gateway's memory stays flat while a 100 MB body is pushed at it, slow or idle connections are
closed, and open connections are bounded.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from confide.exceptions import ConfigError
from confide.server.ca import init_federation, load_federation
from confide.server.enrolment import EnrolmentAuthority
from confide.server.gateway import Gateway, GatewayLimits

MB = 1_000_000
CHUNK = b"\0" * 65536
SHORT = GatewayLimits(handshake_timeout_s=1, idle_timeout_s=1, header_timeout_s=1,
                      body_timeout_s=1, linger_s=0.2)


@pytest.fixture(scope="module")
def fed_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gwlim")
    init_federation(root / "fed", name="gwlim", hosts=["127.0.0.1", "localhost"])
    return root / "fed"


@pytest.fixture
def start_gateway(fed_dir):
    started: list[Gateway] = []

    def start(limits: GatewayLimits = SHORT) -> Gateway:
        authority = EnrolmentAuthority(load_federation(fed_dir))
        gw = Gateway(federation=authority.federation, host="127.0.0.1", port=0, upstream=None,
                     authority=authority, limits=limits)
        gw.start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def _tls(port: int, fed_dir: Path) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(load_federation(fed_dir).paths.ca_cert))
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def _read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def _status(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:100]
    return int(response.split(b" ", 2)[1])


def _head(target: str, *headers: str, method: str = "POST") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


# ------------------------------------------------------------- refused from the head alone


@pytest.mark.parametrize(("target", "method", "extra", "status"), [
    ("/nope", "POST", (), 404),
    ("/confide/v1/enrol?x=1", "POST", (), 400),      # the query-string bypass
    ("/confide/v1/enrol/", "POST", (), 404),          # trailing slash
    ("//confide/v1/enrol", "POST", (), 404),          # doubled slash
    ("/confide%2Fv1/enrol", "POST", (), 404),         # encoded slash
    ("/confide/v1/./enrol", "POST", (), 404),         # dot segment
    ("/confide/v1/enrol#x", "POST", (), 404),         # a fragment is not part of a target
    ("http://127.0.0.1/confide/v1/enrol", "POST", (), 400),  # absolute-form
    ("/confide/v1/enrol", "GET", (), 405),
    ("/confide/v1/enrol", "POST", (), 413),           # 100 MB declared, 64 KiB allowed
    ("/v1/fleet/push-object", "POST", (), 403),       # no client certificate
    ("/v1/fleet/pull-messages", "POST", ("Transfer-Encoding: chunked",), 400),  # CL and TE
])
def test_request_is_refused_before_its_body(start_gateway, fed_dir, target, method, extra,
                                            status):
    """Only the head is sent (declaring 100 MB): the answer cannot have waited for the body."""
    gw = start_gateway()
    with _tls(gw.bound_port, fed_dir) as s:
        s.sendall(_head(target, f"Content-Length: {100 * MB}", *extra, method=method))
        response = _read_to_eof(s)
    assert _status(response) == status
    assert b"connection: close" in response.lower()


def test_enrolment_limit_holds_for_a_chunked_body(start_gateway, fed_dir):
    """No declared length: refused as soon as the body passes 64 KiB, not at its end."""
    gw = start_gateway()
    with _tls(gw.bound_port, fed_dir) as s:
        s.sendall(_head("/confide/v1/enrol", "Transfer-Encoding: chunked"))
        for _ in range(2):
            s.sendall(b"10000\r\n" + CHUNK + b"\r\n")  # 2 x 64 KiB, never terminated
        response = _read_to_eof(s)
    assert _status(response) == 413
    assert gw.refusals.get("body-size") == 1


def test_admitted_enrolment_within_the_limit_is_served(start_gateway, fed_dir):
    gw = start_gateway()
    ctx = ssl.create_default_context(cafile=str(load_federation(fed_dir).paths.ca_cert))
    res = httpx.post(f"https://127.0.0.1:{gw.bound_port}/confide/v1/enrol", content=b"{}",
                     verify=ctx)
    assert res.status_code == 400 and "malformed" in res.json()["error"]
    res = httpx.get(f"https://127.0.0.1:{gw.bound_port}/confide/v1/ca", verify=ctx)
    assert res.status_code == 200 and res.content == load_federation(fed_dir).ca_pem()
    # deeply nested JSON within the limit (RecursionError in a naive json.loads) is a 400
    nested = b"[" * 60_000 + b"]" * 60_000
    res = httpx.post(f"https://127.0.0.1:{gw.bound_port}/confide/v1/enrol",
                     content=nested[:64 * 1024 - 1], verify=ctx)
    assert res.status_code == 400 and "malformed" in res.json()["error"]


# ------------------------------------------------------------- memory while 100 MB is pushed

_GATEWAY_PROCESS = textwrap.dedent("""
    import sys
    from confide.server.ca import load_federation
    from confide.server.gateway import Gateway
    gw = Gateway(federation=load_federation(sys.argv[1]), host="127.0.0.1", port=0,
                 upstream=None)
    gw.start()
    print(gw.bound_port, flush=True)
    sys.stdin.read()
    gw.stop()
""")


@pytest.fixture(scope="module")
def gateway_process(fed_dir):
    """A gateway in its own process, so its memory is measured apart from the client's."""
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY_PROCESS, str(fed_dir)],  # noqa: S603
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=fed_dir.parent,
                            env=dict(os.environ, PYTHONPATH=os.environ.get(
                                "CONFIDE_TEST_GATEWAY_PATH", os.environ.get("PYTHONPATH", ""))))
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        yield proc, port
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("head", "chunked", "size"), [
    (_head("/nope", f"Content-Length: {100 * MB}"), False, 100 * MB),
    (_head("/v1/fleet/push-object", f"Content-Length: {100 * MB}"), False, 100 * MB),
    (_head("/confide/v1/enrol?x=1", "Transfer-Encoding: chunked"), True, 50 * MB),
    (_head("/confide/v1/enrol", "Transfer-Encoding: chunked"), True, 100 * MB),
], ids=["unknown-route", "fleet-without-certificate", "enrol-query-bypass", "enrol-chunked"])
def test_refused_body_is_not_buffered(gateway_process, fed_dir, head, chunked, size):
    """The gateway's peak resident memory grows by far less than the body pushed at it."""
    proc, port = gateway_process
    with _tls(port, fed_dir) as warm:  # first-use allocations happen before the baseline
        warm.sendall(_head("/confide/v1/ca", "Connection: close", method="GET"))
        _read_to_eof(warm)
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset the peak (VmHWM) to now
    baseline = _kib(proc.pid, "VmRSS")
    assert _kib(proc.pid, "VmHWM") <= baseline + 1024
    sent = 0
    with _tls(port, fed_dir) as s:
        s.settimeout(20)
        try:
            s.sendall(head)
            while sent < size:
                s.sendall(b"10000\r\n" + CHUNK + b"\r\n" if chunked else CHUNK)
                sent += len(CHUNK)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass  # the gateway refused and closed while the body was still coming
    growth_kib = _kib(proc.pid, "VmHWM") - baseline
    assert growth_kib < 16 * 1024, f"gateway memory grew by {growth_kib} KiB"
    assert sent < size  # it stopped reading: the client could not push the whole body


# ------------------------------------------------------------- idle and slow connections


def test_idle_handshaked_connection_is_closed(start_gateway, fed_dir):
    """A client that completes the handshake and then says nothing gets EOF (1 s limit)."""
    gw = start_gateway()
    with _tls(gw.bound_port, fed_dir) as s:
        assert s.recv(1) == b""  # EOF: the gateway closed it (the socket waits up to 20 s)
    assert gw.refusals.get("idle-timeout") == 1


def test_connection_that_never_handshakes_is_closed(start_gateway):
    gw = start_gateway()
    with socket.create_connection(("127.0.0.1", gw.bound_port), timeout=20) as s:
        assert _read_to_eof(s) == b""
    assert gw.refusals.get("tls-handshake") == 1


def test_slowloris_head_is_cut_off(start_gateway, fed_dir):
    """A head sent a byte at a time gets 408 once the header deadline passes."""
    gw = start_gateway()
    drip = _head("/confide/v1/enrol", "Content-Length: 2", "X-Pad: " + "a" * 200)
    response = b""
    with _tls(gw.bound_port, fed_dir) as s:
        s.settimeout(0.1)
        for byte in drip:
            try:
                s.sendall(bytes([byte]))
                response = s.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionError, ssl.SSLError):
                break
            break  # the gateway answered (or closed) before the head was complete
    assert response and _status(response) == 408
    assert gw.refusals.get("header-timeout") == 1


def test_slow_body_is_cut_off(start_gateway, fed_dir):
    gw = start_gateway()
    with _tls(gw.bound_port, fed_dir) as s:
        s.sendall(_head("/confide/v1/enrol", "Content-Length: 1000") + b"{")
        response = _read_to_eof(s)  # nothing more is sent
    assert _status(response) == 408
    assert gw.refusals.get("body-timeout") == 1


# ------------------------------------------------------------- concurrent connections


def _wait_for(condition, what: str) -> None:
    for _ in range(200):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"never: {what}")


def test_open_connections_are_bounded(start_gateway, fed_dir):
    gw = start_gateway(GatewayLimits(max_connections=3, handshake_timeout_s=30))
    held = [socket.create_connection(("127.0.0.1", gw.bound_port), timeout=20)
            for _ in range(3)]
    try:
        _wait_for(lambda: gw.open_connections == 3, "three connections open")
        with socket.create_connection(("127.0.0.1", gw.bound_port), timeout=20) as extra:
            assert _read_to_eof(extra) == b""  # closed at once, no handshake
        assert gw.refusals.get("connections") == 1
        held.pop().close()
        _wait_for(lambda: gw.open_connections == 2, "a slot freed")
        ctx = ssl.create_default_context(cafile=str(load_federation(fed_dir).paths.ca_cert))
        res = httpx.get(f"https://127.0.0.1:{gw.bound_port}/confide/v1/ca", verify=ctx)
        assert res.status_code == 200
    finally:
        for s in held:
            s.close()


def test_limits_must_be_positive():
    with pytest.raises(ConfigError, match="max_connections"):
        GatewayLimits(max_connections=0)


# ------------------------------------------------------------- routing, for any target

@pytest.fixture(scope="module")
def router(fed_dir) -> Gateway:
    """A gateway that is never started: only its routing decision is exercised."""
    return Gateway(federation=load_federation(fed_dir), host="127.0.0.1", port=0,
                   upstream=None, insecure=True)


_ROUTES = ["/confide/v1/ca", "/confide/v1/enrol", "/v1/fleet/pull-messages",
           "/v1/fleet/push-object"]


@given(target=st.one_of(
    st.sampled_from(_ROUTES).flatmap(lambda r: st.tuples(
        st.just(r), st.sampled_from(["", "/", "?", "?x=1", "#f", "%2F", "/.", "//", "%00"]),
        st.sampled_from(["", "/", "//", "/./"])).map(lambda t: t[2] + t[0].lstrip("/")
                                                      if t[2] else t[0] + t[1])),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
            max_size=40)))
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_request_is_routed_on_its_exact_path_or_refused(router, target):
    """Whatever the target, a route is chosen only for exactly a route's path, and anything
    else (query, fragment, doubled or encoded slash, dot segment) is refused from the head."""
    import h11

    from confide.server.gateway import _Refusal

    gw = router
    for method in ("GET", "POST"):
        req = h11.Request(method=method, target=target, headers=[("host", "x"),
                                                                ("content-length", "0")])
        try:
            route = gw._check_head(req, None)  # noqa: SLF001
        except _Refusal as refusal:
            assert refusal.status in (400, 403, 404, 405)
            continue
        assert route.path == target and route.method == method

"""The coordinator's public port: mutual TLS in front of Flower's SuperLink.

Flower 1.41's open-source SuperLink serves its Control API (register SuperNodes, start and
stop runs), its Runtime API (the ServerApp's own channel) and its Fleet API on one HTTP port,
and its Control API has no authentication without Flower's enterprise plugins. Anyone who
reaches that port can therefore register a node key, start a run with their own app bundle,
or read the run's messages (``tests/server/test_gateway.py`` demonstrates it against a bare
SuperLink). Confide serves the SuperLink on a Unix socket that only the coordinator's uid
can reach (:mod:`confide.server.superlink`) and exposes only this gateway:

* TLS 1.2+ with the federation's server certificate; a client certificate is requested and,
  when sent, must chain to the federation CA and not be listed in the CRL (checked by
  OpenSSL during the handshake; the CRL is reloaded for every new connection, so a
  revocation refuses the client's next connection);
* ``GET /confide/v1/ca`` and ``POST /confide/v1/enrol`` are the only routes open without a
  client certificate;
* Fleet routes a SuperNode needs are forwarded to the SuperLink only for an enrolled,
  non-revoked client certificate, re-checked against the registry on every request, and
  only when the Flower node-authentication key in the request headers is the certificate's
  key (a client cannot act as another node). ``register-node``/``unregister-node`` are not
  forwarded: the coordinator registers enrolled keys itself;
* every other path (Control, Runtime, health, docs) answers 404.

Before a client is authenticated it costs little (:class:`GatewayLimits`): a request is routed
on its exact path and authorised from its request line and headers, and refused (400, 403,
404, 405, 413) before a byte of its body is read; an admitted body is held to its route's
limit as it arrives. Handshakes, idle connections, heads and bodies have deadlines, and open
connections are bounded.

With ``--insecure`` the gateway speaks plain HTTP (it warns) and identifies clients by the
Flower node-authentication key alone; the SuperLink still verifies the signatures.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import h11
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from confide.exceptions import ConfideError, SecurityError
from confide.server.ca import Federation, same_public_key
from confide.server.delivery import Delivery, objects_requested, pull_found_nothing
from confide.server.enrolment import (
    ClientRecord,
    EnrolmentAuthority,
    Registry,
    parse_enrolment_request,
)
from confide.server.gateway_limits import (
    CA_PATH,
    ENROL_PATH,
    FLEET_ROUTES,
    GatewayLimits,
    Route,
    route_table,
)
from confide.server.tls_stream import PlainStream, Stream, TLSStream, server_tls_context

__all__ = ["Gateway", "GatewayLimits", "FLEET_ROUTES", "server_tls_context"]

log = logging.getLogger("confide.gateway")

PUBLIC_KEY_HEADER = "flwr-public-key"
PULL_PATH, PUSH_MESSAGES_PATH, PUSH_OBJECT_PATH = (
    "/v1/fleet/pull-messages", "/v1/fleet/push-messages", "/v1/fleet/push-object")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "transfer-encoding", "upgrade", "host", "content-length", "expect"}


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _error(status: int, message: str) -> _Response:
    body = json.dumps({"error": message}).encode()
    return _Response(status, [("content-type", "application/json")], body)


class _Refusal(Exception):  # noqa: N818 - control flow inside the gateway, never raised out
    """A request refused before it was served; the connection closes after the answer."""

    def __init__(self, status: int, message: str, reason: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.reason, self.headers = status, message, reason, headers


@dataclass
class _Client:
    """Who is on one connection (its authorised client's name) and how it ended."""

    name: str | None = None
    #: the gateway closed it (idle, refused, shutting down), not the client
    closed_here: bool = False


class Gateway:
    """Serves the public port in a background thread (its own asyncio loop).

    ``delivery`` (:mod:`confide.server.delivery`) makes it hold clients' empty pulls until the
    coordinator pushes, report replies that arrived whole, and report clients whose
    connections all closed.
    """

    def __init__(self, *, federation: Federation, host: str, port: int, upstream: str | None,
                 insecure: bool = False, authority: EnrolmentAuthority | None = None,
                 on_enrolled: Callable[[ClientRecord], None] | None = None,
                 limits: GatewayLimits | None = None,
                 upstream_timeout: float = 120.0, delivery: Delivery | None = None) -> None:
        self.federation = federation
        self.host, self.port = host, port
        #: the SuperLink: ``unix:PATH`` (its socket, see confide.server.superlink) or host:port
        self.upstream = upstream
        self.insecure = insecure
        self.authority = authority or EnrolmentAuthority(federation)
        self.registry: Registry = self.authority.registry
        self.on_enrolled = on_enrolled
        self.limits = limits or GatewayLimits()
        self._routes = route_table(self.limits)
        self.upstream_timeout = upstream_timeout
        self.delivery = delivery
        self._ctx: ssl.SSLContext | None = None
        self._ctx_stamp: tuple[float, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._client: httpx.AsyncClient | None = None
        self._ca_pem = federation.ca_pem()
        self.bound_port: int | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        #: counts of refused connections/requests, for tests and the operator's log
        self.refusals: dict[str, int] = {}

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind and serve; raises a ConfideError if the port cannot be bound."""
        self._thread = threading.Thread(target=self._run, name="confide-gateway", daemon=True)
        self._thread.start()
        self._started.wait(timeout=30)
        if self._startup_error is not None:
            err = self._startup_error
            if isinstance(err, ConfideError):
                raise err
            raise ConfideError(f"cannot serve on {self.host}:{self.port} ({err})")
        if not self._started.is_set():
            raise ConfideError("the gateway did not start within 30 s")

    def stop(self) -> None:
        """Stop serving and close every connection (calling it twice is harmless)."""
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in the meantime
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            if not self._started.is_set():
                self._startup_error = exc
                self._started.set()
            else:
                log.error("gateway stopped: %s", exc)

    def _upstream_client(self, upstream: str) -> httpx.AsyncClient:
        if upstream.startswith("unix:"):
            # The SuperLink's socket lies in a folder only the coordinator's uid can enter;
            # the kernel authenticates this hop, so it carries plain HTTP.
            return httpx.AsyncClient(base_url="http://superlink", timeout=self.upstream_timeout,
                                     transport=httpx.AsyncHTTPTransport(uds=upstream[5:]))
        upstream_ctx = ssl.create_default_context(cafile=str(self.federation.paths.ca_cert))
        return httpx.AsyncClient(base_url=f"https://{upstream}", verify=upstream_ctx,
                                 timeout=self.upstream_timeout)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if self.delivery is not None:
            self.delivery.attach(self._loop)
        if not self.insecure:
            self._context()  # fail early on unreadable certificates
        if self.upstream is not None:
            self._client = self._upstream_client(self.upstream)
        connections = self._connections

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if len(connections) >= self.limits.max_connections:
                # Over the bound: closed at once, before a handshake costs anything.
                self._refuse("connections")
                writer.close()
                return
            task = asyncio.current_task()
            if task is not None:
                connections[task] = writer
            try:
                await self._serve(reader, writer)
            finally:
                if task is not None:
                    connections.pop(task, None)

        try:
            self._server = await asyncio.start_server(on_connect, self.host, self.port)
        except OSError as exc:
            raise ConfideError(f"cannot listen on {self.host}:{self.port} "
                               f"({exc.strerror or exc}); is the port in use?") from None
        self.bound_port = self._server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            # Abort the connections rather than cancel their tasks: each handler then
            # returns normally (a cancelled handler task makes asyncio log a traceback).
            for writer in list(connections.values()):
                writer.transport.abort()
            if connections:
                await asyncio.wait(list(connections), timeout=5)
            await self._server.wait_closed()
            if self._client is not None:
                await self._client.aclose()

    @property
    def open_connections(self) -> int:
        """Connections being served now (at most ``limits.max_connections``)."""
        return len(self._connections)

    def _refuse(self, reason: str) -> None:
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    # ------------------------------------------------------------------ TLS
    def _context(self) -> ssl.SSLContext:
        """The current TLS context, rebuilt when the CRL file changes."""
        st = self.federation.paths.crl.stat()
        stamp = (st.st_mtime, st.st_size)
        if self._ctx is None or stamp != self._ctx_stamp:
            self._ctx = server_tls_context(self.federation)
            self._ctx_stamp = stamp
        return self._ctx

    # ------------------------------------------------------------------ connections
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        stream: Stream = PlainStream(reader, writer)
        client = _Client()
        try:
            cert = None
            if not self.insecure:
                tls = TLSStream(reader, writer, self._context())
                try:  # a peer that starts a handshake (RFC 8446, Sec. 4) must finish it in time
                    await asyncio.wait_for(tls.handshake(),
                                           timeout=self.limits.handshake_timeout_s)
                except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
                    self._refuse("tls-handshake")
                    log.info("refused connection from %s: TLS handshake failed (%s)", peer,
                             getattr(exc, "reason", None) or exc or "timed out")
                    return
                stream = tls
                der = tls.peer_certificate()
                cert = x509.load_der_x509_certificate(der) if der else None
            conn = h11.Connection(h11.SERVER,
                                  max_incomplete_event_size=self.limits.max_header_bytes)
            while True:
                try:
                    req = await self._read_head(conn, stream, client)
                    if req is None:
                        # RFC 8446, Sec. 6.1: close_notify marks the close as deliberate, so
                        # the client does not take it for a truncation attack.
                        await stream.close_notify()
                        return
                    route = self._check_head(req, cert, client)
                    body = await self._read_body(conn, stream, route)
                except _Refusal as refusal:
                    client.closed_here = True
                    self._refuse(refusal.reason)
                    log.info("refused a request from %s: %s", peer, refusal.message)
                    await self._send_refusal(conn, stream, refusal)
                    return
                response = await self._handle(route, req, body, cert, client)
                keep = await self._send(conn, stream, response)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    client.closed_here = True
                    await stream.close_notify()
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, ssl.SSLError,
                OSError, TimeoutError):
            return
        finally:
            if client.name is not None and self.delivery is not None:
                stopping = self._stopping is not None and self._stopping.is_set()
                self.delivery.connection_closed(
                    client.name, by_client=not (client.closed_here or stopping))
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=2)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001, S110
                pass

    async def _receive(self, stream: Stream, deadline: float) -> bytes | None:
        """The next bytes from the client, or None if the deadline passes first."""
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            return None
        try:
            return await asyncio.wait_for(stream.read(), remaining)
        except TimeoutError:
            return None

    async def _read_head(self, conn: h11.Connection, stream: Stream,
                         client: _Client | None = None) -> h11.Request | None:
        """The next request line and headers; None when the client is done or sat idle.

        The wait for a request's first byte is bounded by the idle timeout; from that byte
        on the whole head must arrive within the header timeout (a slowloris sends it a
        byte at a time), and it may not exceed ``max_header_bytes`` (h11 answers 431).
        """
        loop = asyncio.get_running_loop()
        started = bool(conn.trailing_data[0])
        deadline = loop.time() + (self.limits.header_timeout_s if started
                                  else self.limits.idle_timeout_s)
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Refusal(exc.error_status_hint, f"malformed request ({exc})",
                               "malformed") from None
            if isinstance(event, h11.Request):
                return event
            if event is not h11.NEED_DATA:  # ConnectionClosed: the client is done
                return None
            data = await self._receive(stream, deadline)
            if data is None:
                if not started:  # RFC 9112, Sec. 9.5: an idle connection may be closed
                    self._refuse("idle-timeout")
                    if client is not None:
                        client.closed_here = True
                    return None
                raise _Refusal(408, "the request head took too long", "header-timeout")
            if data and not started:
                started = True
                deadline = loop.time() + self.limits.header_timeout_s
            conn.receive_data(data)

    def _check_head(self, req: h11.Request, cert: x509.Certificate | None,
                    client: _Client | None = None) -> Route:
        """The request's route, decided and authorised from its head alone."""
        # RFC 9112, Sec. 3.2.1: a server's own resources are asked for in origin-form
        # (absolute-path ["?" query]); absolute-form, authority-form and "*" are for proxies.
        if not req.target.startswith(b"/"):
            raise _Refusal(400, "the request target must be a path", "target")
        path, query_mark, _query = req.target.partition(b"?")
        # The exact path, neither decoded nor normalised: "//", "%2F", "/./", a trailing "/"
        # or a fragment names no route and is refused here, before the body. Only the
        # route's own path, never the client's spelling of it, reaches the SuperLink.
        route = self._routes.get(path.decode("latin-1"))
        if route is None:
            raise _Refusal(404, "not found", "route")
        if query_mark:  # no route takes a query; one cannot select another route or limit
            raise _Refusal(400, "query strings are not accepted", "query")
        if req.method.decode("latin-1") != route.method:
            # RFC 9110, Sec. 15.5.6: a 405 names the methods the resource supports.
            raise _Refusal(405, "method not allowed", "method", (("allow", route.method),))
        lengths = [v for k, v in req.headers if k == b"content-length"]
        if lengths and any(k == b"transfer-encoding" for k, _ in req.headers):
            # RFC 9112, Sec. 6.3 (3): both framings at once is how requests are smuggled
            # past an intermediary; refuse rather than pick one.
            raise _Refusal(400, "both Transfer-Encoding and Content-Length", "framing")
        if lengths and int(lengths[0]) > route.max_body:
            # RFC 9112, Sec. 6.2: a declared length over the limit is refused unread.
            raise _Refusal(413, "request body too large", "body-size")
        if route.fleet:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in req.headers}
            record = self._authorise(cert, headers)
            if isinstance(record, str):
                raise _Refusal(403, record, record)
            if client is not None and client.name != record.name:
                client.name = record.name
                if self.delivery is not None:
                    self.delivery.connection_opened(record.name)
        return route

    async def _read_body(self, conn: h11.Connection, stream: Stream, route: Route) -> bytes:
        """The body of an admitted request, up to its route's limit, arriving steadily."""
        if conn.they_are_waiting_for_100_continue:
            # RFC 9110, Sec. 10.1.1: the client holds the body back until this arrives.
            await self._write(stream, conn.send(h11.InformationalResponse(
                status_code=100, headers=[])) or b"")
        start = asyncio.get_running_loop().time()
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Refusal(exc.error_status_hint, f"malformed request body ({exc})",
                               "malformed") from None
            if isinstance(event, h11.Data):
                if len(body) + len(event.data) > route.max_body:
                    # RFC 9112, Sec. 7.1: a chunked body declares no length; it is refused
                    # as soon as it passes the limit.
                    raise _Refusal(413, "request body too large", "body-size")
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif event is h11.NEED_DATA:
                deadline = (start + self.limits.body_timeout_s
                            + len(body) / self.limits.min_transfer_rate)
                data = await self._receive(stream, deadline)
                if data is None:
                    raise _Refusal(408, "the request body arrived too slowly", "body-timeout")
                conn.receive_data(data)
            else:
                raise ConnectionError("the client closed the connection mid-request")

    async def _write(self, stream: Stream, data: bytes) -> None:
        timeout = self.limits.send_timeout_s + len(data) / self.limits.min_transfer_rate
        await asyncio.wait_for(stream.write(data), timeout)

    async def _send_refusal(self, conn: h11.Connection, stream: Stream,
                            refusal: _Refusal) -> None:
        """Answer a refused request and close, without reading the rest of it."""
        body = json.dumps({"error": refusal.message}).encode()
        headers = [("content-type", "application/json"), ("content-length", str(len(body))),
                   ("connection", "close"), *refusal.headers]
        try:
            data = conn.send(h11.Response(status_code=refusal.status, headers=headers,
                                          reason=HTTPStatus(refusal.status).phrase)) or b""
            data += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
        except h11.LocalProtocolError:
            return
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, ssl.SSLError):
            await self._write(stream, data)
            await stream.close_notify()
            # RFC 9112, Sec. 9.6: closing while the client is still sending makes the kernel
            # reset the connection, which can destroy the answer before the client reads it.
            # Unread bytes are dropped for a bounded time and amount instead (never kept).
            await stream.linger(seconds=self.limits.linger_s, max_bytes=self.limits.linger_bytes)

    async def _send(self, conn: h11.Connection, stream: Stream, response: _Response) -> bool:
        headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
        headers.append(("content-length", str(len(response.body))))
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await self._write(stream, data)
        return response.status < 400 or response.status in (404,)

    # ------------------------------------------------------------------ routing
    async def _handle(self, route: Route, req: h11.Request, body: bytes,
                      cert: x509.Certificate | None = None,
                      client: _Client | None = None) -> _Response:
        """Serve an admitted request (its route and client were checked from its head)."""
        if route.path == CA_PATH:
            return _Response(200, [("content-type", "application/x-pem-file")], self._ca_pem)
        if route.path == ENROL_PATH:
            return await asyncio.get_running_loop().run_in_executor(None, self._enrol, body)
        delivery, name = self.delivery, None if client is None else client.name
        if delivery is None or name is None:
            return await self._forward(route.method, route.path, list(req.headers), body)
        if route.path == PULL_PATH:  # a long poll (confide.server.delivery)
            delivered = await delivery.before_pull()
            response = await self._forward(route.method, route.path, list(req.headers), body)
            if response.status == 200 and pull_found_nothing(response.body) \
                    and await delivery.hold(delivered):
                try:  # authorised again: the registry may have changed while it was held
                    self._check_head(req, cert)
                except _Refusal:
                    return response  # empty; the client's next request is refused
                response = await self._forward(route.method, route.path, list(req.headers),
                                               body)
            return response
        response = await self._forward(route.method, route.path, list(req.headers), body)
        if response.status == 200 and route.path == PUSH_MESSAGES_PATH:
            due = objects_requested(response.body)
            delivery.reply_started(name, 0 if due is None else due)
        elif response.status == 200 and route.path == PUSH_OBJECT_PATH:
            delivery.object_pushed(name)
        return response

    def _authorise(self, cert: x509.Certificate | None,
                   headers: dict[str, str]) -> str | ClientRecord:
        """The client's record if the request may reach the SuperLink, else why not."""
        if not self.insecure and cert is None:
            return "a client certificate is required (enrol with 'confide client enrol')"
        try:
            header_key = serialization.load_pem_public_key(
                base64.b64decode(headers.get(PUBLIC_KEY_HEADER, ""), validate=True))
        except (ValueError, TypeError, binascii.Error):
            return "missing or malformed node-authentication key"
        if cert is None:  # --insecure: the node-authentication key is the identity
            pem = header_key.public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
            record = self.registry.by_public_key(pem)
        else:
            record = self.registry.by_fingerprint(cert.fingerprint(hashes.SHA256()).hex())
            if record is not None and not same_public_key(cert.public_key(), header_key):
                return "the node-authentication key is not the certificate's key"
        if record is None:
            return "this client is not enrolled in the federation"
        if not record.active:
            return f"client {record.name!r} is revoked"
        return record

    async def _forward(self, method: str, path: str, raw_headers: list[tuple[bytes, bytes]],
                       body: bytes) -> _Response:
        if self._client is None:
            return _error(503, "the coordinator is not running a job")
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers
                   if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        try:
            request = self._client.build_request(method, path, headers=headers, content=body)
            upstream = await self._client.send(request, stream=True)
            try:
                content = b"".join([chunk async for chunk in upstream.aiter_raw()])
            finally:
                await upstream.aclose()
        except httpx.HTTPError as exc:
            log.warning("upstream SuperLink error on %s: %s", path, exc)
            return _error(502, "the coordinator's runtime is unavailable")
        out_headers = [(k, v) for k, v in upstream.headers.multi_items()
                       if k.lower() not in _HOP_BY_HOP]
        return _Response(upstream.status_code, out_headers, content)

    # ------------------------------------------------------------------ enrolment
    def _enrol(self, body: bytes) -> _Response:
        try:  # the one decoder of enrolment requests (bounded, fuzzed; nested JSON included)
            request = parse_enrolment_request(body)
        except SecurityError as exc:
            return _error(400, f"malformed enrolment request: {exc}")
        try:
            result = self.authority.enrol(token=request.token, csr_pem=request.csr_pem,
                                          requested_name=request.name)
        except ConfideError as exc:
            self._refuse("enrolment")
            log.info("enrolment refused: %s", exc)
            return _error(403, str(exc))
        log.info("enrolled client %r", result.name)
        if self.on_enrolled is not None:
            record = next(c for c in self.registry.clients() if c.name == result.name)
            try:
                self.on_enrolled(record)
            except Exception as exc:  # noqa: BLE001 - enrolment itself succeeded
                log.warning("could not register the new client with the runtime: %s", exc)
        return _Response(200, [("content-type", "application/json")],
                         json.dumps(result.to_json()).encode())


def read_crl_serials(path: Path) -> set[int]:
    """Serial numbers listed in a PEM CRL (for tests and ``confide clients list``)."""
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return {r.serial_number for r in crl}


def _check_security_imports() -> None:  # pragma: no cover - import-time sanity
    if not hasattr(ssl, "VERIFY_CRL_CHECK_LEAF"):
        raise SecurityError("this Python's ssl module cannot check CRLs")


_check_security_imports()

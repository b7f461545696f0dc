"""The coordinator's public port: mutual TLS in front of Flower's SuperLink.

Flower 1.41's open-source SuperLink serves its Control API (register SuperNodes, start and
stop runs), its Runtime API (the ServerApp's own channel) and its Fleet API on one HTTP port,
and its Control API has no authentication without Flower's enterprise plugins. Anyone who
reaches that port can therefore register a node key, start a run with their own app bundle,
or read the run's messages (``tests/server/test_gateway.py`` demonstrates it against a bare
SuperLink). Confide binds the SuperLink to 127.0.0.1 and exposes only this gateway:

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
from pathlib import Path

import h11
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from confide.exceptions import ConfideError, SecurityError
from confide.server.ca import Federation, same_public_key
from confide.server.enrolment import ClientRecord, EnrolmentAuthority, Registry

__all__ = ["Gateway", "FLEET_ROUTES", "server_tls_context"]

log = logging.getLogger("confide.gateway")

#: Fleet API routes a Confide client node uses (Flower 1.41 paths).
FLEET_ROUTES = frozenset(f"/v1/fleet/{m}" for m in (
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "push-object", "pull-object", "confirm-message-received"))
ENROL_PATH = "/confide/v1/enrol"
CA_PATH = "/confide/v1/ca"
PUBLIC_KEY_HEADER = "flwr-public-key"
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "transfer-encoding", "upgrade", "host", "content-length"}
_MAX_ENROL_BODY = 64 * 1024
_HANDSHAKE_TIMEOUT = 15.0


def server_tls_context(federation: Federation) -> ssl.SSLContext:
    """The gateway's TLS context: server cert, optional client certs checked with the CRL."""
    p = federation.paths
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(p.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(p.server_cert), str(p.server_key))
    ctx.load_verify_locations(cafile=str(p.crl))
    # RFC 5280, Sec. 6.3: check the leaf against the CA's CRL; a missing CRL fails closed.
    ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    # Ask for a certificate; OpenSSL rejects the handshake when one is sent and does not
    # verify. Routes other than enrolment then require that one was sent.
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


@dataclass
class _Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _error(status: int, message: str) -> _Response:
    body = json.dumps({"error": message}).encode()
    return _Response(status, [("content-type", "application/json")], body)


class _Stream:
    """The byte stream of one connection (plain TCP or TLS)."""

    async def read(self) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close_notify(self) -> None:
        """Say goodbye at the TLS layer (nothing for plain TCP)."""


class _PlainStream(_Stream):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        return await self.reader.read(65536)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


class _TLSStream(_Stream):
    """Server-side TLS over memory BIOs.

    asyncio's own TLS layer closes a connection whose handshake failed without sending the
    TLS alert OpenSSL produced, so a refused client would only see "disconnected". Driving
    ``SSLObject`` directly lets the alert (``certificate revoked``, ``unknown ca`` ...; RFC
    8446, Sec. 6.2) reach the client before the connection closes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:
        self.reader, self.writer = reader, writer
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def _fill(self) -> bool:
        data = await self.reader.read(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the client closed the connection") from None
                continue
            except ssl.SSLError:
                with contextlib.suppress(ConnectionError, OSError):
                    await self._flush()  # the alert that tells the client why
                raise
            await self._flush()
            return

    def peer_certificate(self) -> bytes | None:
        return self.tls.getpeercert(binary_form=True)

    async def read(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:
        self.tls.write(data)
        await self._flush()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            self.tls.unwrap()
        with contextlib.suppress(ConnectionError, OSError):
            await self._flush()


class Gateway:
    """Serves the public port in a background thread (its own asyncio loop)."""

    def __init__(self, *, federation: Federation, host: str, port: int, upstream: str | None,
                 insecure: bool = False, authority: EnrolmentAuthority | None = None,
                 on_enrolled: Callable[[ClientRecord], None] | None = None,
                 max_body_bytes: int = 256 * 1024 * 1024,
                 upstream_timeout: float = 120.0) -> None:
        self.federation = federation
        self.host, self.port = host, port
        self.upstream = upstream
        self.insecure = insecure
        self.authority = authority or EnrolmentAuthority(federation)
        self.registry: Registry = self.authority.registry
        self.on_enrolled = on_enrolled
        self.max_body_bytes = max_body_bytes
        self.upstream_timeout = upstream_timeout
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

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        if not self.insecure:
            self._context()  # fail early on unreadable certificates
        if self.upstream is not None:
            upstream_ctx = ssl.create_default_context(cafile=str(self.federation.paths.ca_cert))
            self._client = httpx.AsyncClient(base_url=f"https://{self.upstream}",
                                             verify=upstream_ctx, timeout=self.upstream_timeout)
        connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        stream: _Stream = _PlainStream(reader, writer)
        try:
            cert = None
            if not self.insecure:
                tls = _TLSStream(reader, writer, self._context())
                try:
                    await asyncio.wait_for(tls.handshake(), timeout=_HANDSHAKE_TIMEOUT)
                except (ssl.SSLError, ConnectionError, TimeoutError, OSError) as exc:
                    self._refuse("tls-handshake")
                    log.info("refused connection from %s: TLS handshake failed (%s)", peer,
                             getattr(exc, "reason", None) or exc)
                    return
                stream = tls
                der = tls.peer_certificate()
                cert = x509.load_der_x509_certificate(der) if der else None
            conn = h11.Connection(h11.SERVER)
            while True:
                request = await self._read_request(conn, stream)
                if request is None:
                    return
                req, body = request
                if isinstance(body, _Response):
                    response = body
                else:
                    response = await self._route(req, body, cert)
                keep = await self._send(conn, stream, response)
                if not keep or conn.our_state is h11.MUST_CLOSE:
                    await stream.close_notify()
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, ssl.SSLError,
                OSError):
            return
        finally:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), timeout=2)
            except (Exception, asyncio.CancelledError):  # noqa: BLE001, S110
                pass

    async def _read_request(self, conn: h11.Connection, stream: _Stream
                            ) -> tuple[h11.Request, bytes | _Response] | None:
        req: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        too_large = False
        limit = self.max_body_bytes
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.read())
                continue
            if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                req = event
                if event.target == ENROL_PATH.encode():
                    limit = _MAX_ENROL_BODY
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    too_large = True
                    chunks.clear()
                else:
                    chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if req is None:
                    return None
                if too_large:
                    return req, _error(413, "request body too large")
                return req, b"".join(chunks)

    async def _send(self, conn: h11.Connection, stream: _Stream, response: _Response) -> bool:
        headers = [(k, v) for k, v in response.headers if k.lower() not in _HOP_BY_HOP]
        headers.append(("content-length", str(len(response.body))))
        data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body:
            data += conn.send(h11.Data(data=response.body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.write(data)
        return response.status < 400 or response.status in (404,)

    # ------------------------------------------------------------------ routing
    async def _route(self, req: h11.Request, body: bytes,
                     cert: x509.Certificate | None) -> _Response:
        path = req.target.decode("latin-1").split("?", 1)[0]
        method = req.method.decode("latin-1")
        if path == CA_PATH and method == "GET":
            return _Response(200, [("content-type", "application/x-pem-file")], self._ca_pem)
        if path == ENROL_PATH and method == "POST":
            return await asyncio.get_running_loop().run_in_executor(None, self._enrol, body)
        if path in FLEET_ROUTES and method == "POST":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                       for k, v in req.headers}
            refusal = self._authorise(cert, headers)
            if refusal is not None:
                self._refuse(refusal)
                log.info("refused %s: %s", path, refusal)
                return _error(403, refusal)
            return await self._forward(method, path, list(req.headers), body)
        self._refuse("route")
        return _error(404, "not found")

    def _authorise(self, cert: x509.Certificate | None, headers: dict[str, str]) -> str | None:
        """None if the request may reach the SuperLink, else why not."""
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
        return None

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
        try:
            request = json.loads(body)
            token, csr = str(request["token"]), str(request["csr"]).encode("ascii")
            name = request.get("name")
            if name is not None and not isinstance(name, str):
                raise TypeError
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError,
                AttributeError):
            return _error(400, "malformed enrolment request")
        try:
            result = self.authority.enrol(token=token, csr_pem=csr, requested_name=name)
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

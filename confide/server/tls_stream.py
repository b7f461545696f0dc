"""The gateway's byte streams (plain TCP, or server-side TLS driven over memory BIOs) and
its TLS context.

Kept apart from :mod:`confide.server.gateway`, which owns what is said over them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from confide.server.ca import Federation

__all__ = ["Stream", "PlainStream", "TLSStream", "server_tls_context"]


class Stream:
    """The byte stream of one connection (plain TCP or TLS)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> bytes:
        """Up to 64 KiB of what the peer sent; empty at its end."""
        return await self.reader.read(65536)

    async def write(self, data: bytes) -> None:
        """Send ``data`` and wait until the transport took it."""
        self.writer.write(data)
        await self.writer.drain()

    async def close_notify(self) -> None:
        """Say goodbye at the TLS layer (nothing for plain TCP)."""

    async def linger(self, *, seconds: float, max_bytes: int) -> None:
        """Half-close, then drop (never keep) what the peer still sends, within bounds."""
        if self.writer.can_write_eof():
            self.writer.write_eof()
        deadline = asyncio.get_running_loop().time() + seconds
        dropped = 0
        while dropped < max_bytes:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                return
            if not data:
                return
            dropped += len(data)


class PlainStream(Stream):
    """Plain TCP (``--insecure``)."""


class TLSStream(Stream):
    """Server-side TLS over memory BIOs.

    asyncio's own TLS layer closes a connection whose handshake failed without sending the
    TLS alert OpenSSL produced, so a refused client would only see "disconnected". Driving
    ``SSLObject`` directly lets the alert (``certificate revoked``, ``unknown ca`` ...; RFC
    8446, Sec. 6.2) reach the client before the connection closes.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 context: ssl.SSLContext) -> None:
        super().__init__(reader, writer)
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
        """Run the server side of the handshake; an alert reaches a refused client."""
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
        """The client's certificate (DER), verified during the handshake, if it sent one."""
        return self.tls.getpeercert(binary_form=True)

    async def read(self) -> bytes:  # noqa: D102
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    async def write(self, data: bytes) -> None:  # noqa: D102
        self.tls.write(data)
        await self._flush()

    async def close_notify(self) -> None:  # noqa: D102
        with contextlib.suppress(ssl.SSLError, ConnectionError, OSError):
            self.tls.unwrap()
        with contextlib.suppress(ConnectionError, OSError):
            await self._flush()


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

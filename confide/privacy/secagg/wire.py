"""The wire format of secure aggregation: explicit, fixed-layout, length-checked bytes.

Nothing that crosses the wire is pickled. Every message is a 46-byte header followed by a
body whose layout is fixed by the header's ``kind``; all integers are big-endian, except the
packed vector of a masked input, whose ``bits``-wide entries are packed little-endian.

Header (``>4sBB16sIQQI``)::

    magic      4  b"CFSA"
    version    1  1
    kind       1  MessageKind
    session   16  random id the coordinator chose for this round's protocol instance
    round      4  server round
    sender     8  client id, or SERVER_ID (2^64 - 1) for the coordinator
    recipient  8  client id, or SERVER_ID
    length     4  body length in bytes (must equal what follows, exactly)

Bodies (``u32``/``u64`` big-endian; ``id`` = u64 client id; ``pk`` = 32-byte X25519 key):

=====================  ======================================================================
SETUP (server)         threshold u32, bits u8, input_mode u8, vector_length u32,
                       cohort_size u32, max_weight u32, clipping_range f64,
                       neighbour count u32, neighbour ids
ADVERTISE_KEYS         enc pk, mask pk
SHARE_KEYS (server)    count u32, count x (id, enc pk, mask pk) of the neighbours that
                       advertised keys
SHARE_KEYS (client)    self-mask commitment (32, SHA-256), count u32,
                       count x (recipient id, sealed share 110)
MASKED_INPUT (server)  count u32, count x (sender id, sealed share 110) addressed to the client
MASKED_INPUT (client)  rejected count u32, rejected sender ids, packed vector
                       (vector_length entries of ``bits`` bits, ceil(vector_length*bits/8) bytes)
UNMASK (server)        alive count u32, alive ids, dropped count u32, dropped ids
UNMASK (client)        count u32, count x (owner id, share kind u8, share 33)
=====================  ======================================================================

A sealed share is AES-256-GCM ``nonce(12) || ciphertext(82) || tag(16)`` of
``sender id, recipient id, self-mask-seed share (33), mask-key share (33)``, with associated
data binding the session, round, sender and recipient (so a share replayed into another round
or to another client fails authentication).

Decoding checks the magic, version, kind, session, round, sender and recipient against what
the receiver expects, the body length against the header and the body layout, every count
against a bound, and that no id repeats; any mismatch is a :class:`ProtocolError` naming it.
"""

from __future__ import annotations

import enum
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from confide.exceptions import ProtocolError
from confide.privacy.secagg.primitives import (
    KEY_BYTES,
    NONCE_BYTES,
    SHARE_BYTES,
    TAG_BYTES,
    mask_dtype,
)

__all__ = [
    "MAGIC",
    "VERSION",
    "SERVER_ID",
    "SESSION_BYTES",
    "HEADER",
    "SHARE_PLAINTEXT_BYTES",
    "SEALED_SHARE_BYTES",
    "MessageKind",
    "Header",
    "SetupBody",
    "encode",
    "decode_header",
    "open_message",
    "BodyReader",
    "pack_words",
    "unpack_words",
    "packed_size",
    "share_associated_data",
    "encode_share_plaintext",
    "decode_share_plaintext",
]

MAGIC = b"CFSA"
VERSION = 1
SERVER_ID = 2**64 - 1
SESSION_BYTES = 16
HEADER = struct.Struct(">4sBB16sIQQI")
#: sender, recipient, self-mask-seed share, mask-key share
SHARE_PLAINTEXT_BYTES = 8 + 8 + 2 * SHARE_BYTES
SEALED_SHARE_BYTES = NONCE_BYTES + SHARE_PLAINTEXT_BYTES + TAG_BYTES
#: hard cap on any message (the body length field is a u32)
MAX_BODY_BYTES = 2**32 - 1


class MessageKind(enum.IntEnum):
    """What a message is; one request and one reply kind per protocol stage."""

    SETUP = 1
    ADVERTISE_KEYS = 2
    SHARE_KEYS_REQUEST = 3
    SHARE_KEYS = 4
    MASKED_INPUT_REQUEST = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK = 8


@dataclass(frozen=True)
class Header:
    """A decoded message header."""

    kind: MessageKind
    session: bytes
    server_round: int
    sender: int
    recipient: int
    body_length: int


def encode(kind: MessageKind, *, session: bytes, server_round: int, sender: int,
           recipient: int, body: bytes) -> bytes:
    """Header plus body."""
    if len(session) != SESSION_BYTES:
        raise ProtocolError(f"a session id has {SESSION_BYTES} bytes")
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"a {kind.name} body of {len(body)} bytes is too large to send")
    return HEADER.pack(MAGIC, VERSION, int(kind), session, server_round, sender, recipient,
                       len(body)) + body


def decode_header(message: bytes) -> Header:
    """Parse and sanity-check the header of ``message`` (magic, version, kind, length)."""
    if not isinstance(message, bytes | bytearray | memoryview):
        raise ProtocolError(f"a message must be bytes, got {type(message).__name__}")
    if len(message) < HEADER.size:
        raise ProtocolError(f"message truncated: {len(message)} bytes, shorter than the "
                            f"{HEADER.size}-byte header")
    magic, version, kind, session, rnd, sender, recipient, length = HEADER.unpack_from(message)
    if magic != MAGIC:
        raise ProtocolError("not a secure-aggregation message (bad magic bytes)")
    if version != VERSION:
        raise ProtocolError(f"unsupported secure-aggregation wire version {version}")
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown message kind {kind}") from None
    actual = len(message) - HEADER.size
    if actual < length:
        raise ProtocolError(f"{kind.name} message truncated: body has {actual} bytes, the "
                            f"header announces {length}")
    if actual > length:
        raise ProtocolError(f"{kind.name} message oversized: body has {actual} bytes, the "
                            f"header announces {length}")
    return Header(kind, bytes(session), rnd, sender, recipient, length)


def open_message(message: bytes, *, kind: MessageKind, session: bytes, server_round: int,
                 sender: int, recipient: int) -> BodyReader:
    """Check ``message`` is the expected one (kind, session, round, parties); read its body.

    A message from another round or protocol instance is rejected as a replay.
    """
    header = decode_header(message)
    if header.kind != kind:
        raise ProtocolError(f"expected a {kind.name} message, got {header.kind.name}")
    if header.server_round != server_round or header.session != session:
        raise ProtocolError(f"replayed or stale {kind.name} message: it belongs to round "
                            f"{header.server_round} (session {header.session.hex()[:8]}), "
                            f"this is round {server_round} (session {session.hex()[:8]})")
    if header.sender != sender:
        raise ProtocolError(f"{kind.name} message claims sender {_who(header.sender)} but "
                            f"arrived from {_who(sender)}")
    if header.recipient != recipient:
        raise ProtocolError(f"{kind.name} message is addressed to {_who(header.recipient)}, "
                            f"not {_who(recipient)}")
    return BodyReader(memoryview(message)[HEADER.size:], kind)


def _who(party: int) -> str:
    return "the coordinator" if party == SERVER_ID else f"client {party}"


class BodyReader:
    """Reads a body field by field; any read past the end, or bytes left over, is an error."""

    def __init__(self, body: memoryview, kind: MessageKind) -> None:
        self.body = body
        self.kind = kind
        self.offset = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self.offset + n > len(self.body):
            raise ProtocolError(f"{self.kind.name} message truncated: its body ends before "
                                "the fields it announces")
        view = self.body[self.offset:self.offset + n]
        self.offset += n
        return view

    def u8(self) -> int:
        """One unsigned byte."""
        return self._take(1)[0]

    def u32(self) -> int:
        """A big-endian u32."""
        return int.from_bytes(self._take(4), "big")

    def u64(self) -> int:
        """A big-endian u64."""
        return int.from_bytes(self._take(8), "big")

    def f64(self) -> float:
        """A big-endian IEEE double."""
        return float(struct.unpack(">d", self._take(8))[0])

    def raw(self, n: int) -> bytes:
        """``n`` bytes."""
        return bytes(self._take(n))

    def count(self, *, limit: int, item_bytes: int, what: str) -> int:
        """A u32 count, bounded by ``limit`` and by the bytes actually left."""
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{self.kind.name} message lists {n} {what}, more than the "
                                f"{limit} allowed")
        if n * item_bytes > len(self.body) - self.offset:
            raise ProtocolError(f"{self.kind.name} message truncated: it announces {n} {what} "
                                "but the body ends first")
        return n

    def ids(self, *, limit: int, what: str) -> list[int]:
        """A u32 count then that many distinct u64 ids."""
        n = self.count(limit=limit, item_bytes=8, what=what)
        ids = [self.u64() for _ in range(n)]
        if len(set(ids)) != n:
            raise ProtocolError(f"{self.kind.name} message lists a client twice among {what}")
        return ids

    def remaining(self) -> int:
        """Bytes not read yet."""
        return len(self.body) - self.offset

    def done(self) -> None:
        """Assert the whole body was consumed."""
        if self.offset != len(self.body):
            raise ProtocolError(f"{self.kind.name} message oversized: "
                                f"{len(self.body) - self.offset} unexpected trailing bytes")


# --------------------------------------------------------------------------- setup body


@dataclass(frozen=True)
class SetupBody:
    """The round's public protocol parameters and the client's neighbours."""

    threshold: int
    bits: int
    input_mode: int
    vector_length: int
    cohort_size: int
    max_weight: int
    clipping_range: float
    neighbours: tuple[int, ...]

    _FIXED = struct.Struct(">IBBIIId")

    def encode(self) -> bytes:
        """The SETUP body."""
        return (self._FIXED.pack(self.threshold, self.bits, self.input_mode, self.vector_length,
                                 self.cohort_size, self.max_weight, self.clipping_range)
                + struct.pack(">I", len(self.neighbours))
                + b"".join(n.to_bytes(8, "big") for n in self.neighbours))

    @classmethod
    def decode(cls, reader: BodyReader) -> SetupBody:
        """Read a SETUP body (values are validated by the protocol)."""
        threshold, bits, mode = reader.u32(), reader.u8(), reader.u8()
        length, cohort, max_weight, clip = reader.u32(), reader.u32(), reader.u32(), reader.f64()
        neighbours = reader.ids(limit=max(cohort, 1), what="neighbours")
        reader.done()
        return cls(threshold, bits, mode, length, cohort, max_weight, clip, tuple(neighbours))


# --------------------------------------------------------------------------- shares


def share_associated_data(session: bytes, server_round: int, sender: int,
                          recipient: int) -> bytes:
    """AES-GCM associated data of a sealed share: binds it to the round and the two parties."""
    return b"share|" + session + struct.pack(">IQQ", server_round, sender, recipient)


def encode_share_plaintext(sender: int, recipient: int, seed_share: int, key_share: int) -> bytes:
    """The 82-byte plaintext of a sealed share."""
    return (struct.pack(">QQ", sender, recipient) + seed_share.to_bytes(SHARE_BYTES, "big")
            + key_share.to_bytes(SHARE_BYTES, "big"))


def decode_share_plaintext(plaintext: bytes) -> tuple[int, int, int, int]:
    """``(sender, recipient, seed_share, key_share)`` of an opened share."""
    if len(plaintext) != SHARE_PLAINTEXT_BYTES:
        raise ProtocolError(f"a decrypted share has {len(plaintext)} bytes, expected "
                            f"{SHARE_PLAINTEXT_BYTES}")
    sender, recipient = struct.unpack_from(">QQ", plaintext)
    seed_share = int.from_bytes(plaintext[16:16 + SHARE_BYTES], "big")
    key_share = int.from_bytes(plaintext[16 + SHARE_BYTES:], "big")
    return sender, recipient, seed_share, key_share


# --------------------------------------------------------------------------- packed vectors


def packed_size(count: int, bits: int) -> int:
    """Bytes of ``count`` entries of ``bits`` bits, packed."""
    return math.ceil(count * bits / 8)


def pack_words(values: np.ndarray, bits: int) -> bytes:
    """Pack entries of Z_{2^bits} (unsigned words) into ``ceil(n*bits/8)`` bytes, little-endian.

    At ``bits = 32`` a masked vector is exactly as large as the float32 update it hides.
    """
    dtype = np.dtype(mask_dtype(bits)).newbyteorder("<")
    words = np.ascontiguousarray(values, dtype=dtype)
    width = dtype.itemsize
    as_bytes = words.view(np.uint8).reshape(-1, width)
    if bits % 8 == 0:
        return as_bytes[:, :bits // 8].tobytes()
    bit_rows = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_rows.reshape(-1), bitorder="little").tobytes()


def unpack_words(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_words`; the padding bits of the last byte must be zero."""
    if len(data) != packed_size(count, bits):
        raise ProtocolError(f"a packed vector of {count} {bits}-bit entries has "
                            f"{packed_size(count, bits)} bytes, got {len(data)}")
    dtype = np.dtype(mask_dtype(bits))
    width = dtype.itemsize
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits % 8 == 0:
        nbytes = bits // 8
        if nbytes == width:
            return raw.view(dtype.newbyteorder("<")).astype(dtype)
        out = np.zeros((count, width), dtype=np.uint8)
        out[:, :nbytes] = raw.reshape(count, nbytes)
        return out.view(dtype.newbyteorder("<")).reshape(-1).astype(dtype)
    bit_rows = np.unpackbits(raw, bitorder="little")
    if bit_rows[count * bits:].any():
        raise ProtocolError("a packed vector has non-zero padding bits")
    full = np.zeros((count, 8 * width), dtype=np.uint8)
    full[:, :bits] = bit_rows[:count * bits].reshape(count, bits)
    return np.packbits(full, axis=1, bitorder="little").view(
        dtype.newbyteorder("<")).reshape(-1).astype(dtype)


def max_message_bytes(*, vector_length: int, bits: int, cohort_size: int) -> int:
    """The largest message of a round with these parameters (a bound for the transport).

    From the body table above: the largest body is a client's MASKED_INPUT (count, up to
    ``cohort_size`` rejected ids and the packed vector) or a list of ``cohort_size`` entries
    of at most ``8 + 110`` bytes (sealed shares) after a 36-byte fixed part (commitment and
    count; SETUP's fixed part is 30 bytes).
    """
    per_client = 8 + SEALED_SHARE_BYTES
    largest = max(4 + 8 * cohort_size + packed_size(vector_length, bits),
                  36 + per_client * cohort_size)
    return HEADER.size + min(largest, MAX_BODY_BYTES)


#: no message is larger than this, whatever the round (the body length field is a u32)
MAX_MESSAGE_BYTES = HEADER.size + MAX_BODY_BYTES


def encode_ids(ids: Sequence[int]) -> bytes:
    """A u32 count then the u64 ids."""
    return struct.pack(">I", len(ids)) + b"".join(i.to_bytes(8, "big") for i in ids)


__all__ += ["encode_ids", "KEY_BYTES", "max_message_bytes", "MAX_MESSAGE_BYTES"]

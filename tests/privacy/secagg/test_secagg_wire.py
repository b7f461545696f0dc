"""The wire format: headers, length checks and packed vectors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.exceptions import ProtocolError
from confide.privacy.secagg.wire import (
    HEADER,
    SERVER_ID,
    MessageKind,
    SetupBody,
    decode_header,
    encode,
    open_message,
    pack_words,
    packed_size,
    unpack_words,
)

SESSION = bytes(range(16))


def _msg(body: bytes = b"abc", **kw) -> bytes:
    args = dict(session=SESSION, server_round=3, sender=5, recipient=SERVER_ID, body=body)
    args.update(kw)
    return encode(MessageKind.ADVERTISE_KEYS, **args)


def test_header_round_trips():
    h = decode_header(_msg())
    assert (h.kind, h.session, h.server_round, h.sender, h.recipient, h.body_length) == (
        MessageKind.ADVERTISE_KEYS, SESSION, 3, 5, SERVER_ID, 3)
    assert HEADER.size == 46


@pytest.mark.parametrize("mangle, error", [
    (lambda m: m[:10], "truncated"),
    (lambda m: m[:-1], "truncated"),
    (lambda m: m + b"x", "oversized"),
    (lambda m: b"XXXX" + m[4:], "magic"),
    (lambda m: m[:4] + bytes([9]) + m[5:], "version"),
    (lambda m: m[:5] + bytes([99]) + m[6:], "unknown message kind"),
])
def test_malformed_headers_are_rejected(mangle, error):
    with pytest.raises(ProtocolError, match=error):
        decode_header(mangle(_msg()))


def test_non_bytes_are_rejected():
    with pytest.raises(ProtocolError, match="must be bytes"):
        decode_header("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("field, value, error", [
    ("server_round", 2, "replayed or stale"),
    ("session", bytes(16), "replayed or stale"),
    ("sender", 6, "claims sender"),
    ("recipient", 7, "addressed to"),
])
def test_messages_from_another_round_or_party_are_rejected(field, value, error):
    msg = _msg(**{field: value})
    with pytest.raises(ProtocolError, match=error):
        open_message(msg, kind=MessageKind.ADVERTISE_KEYS, session=SESSION, server_round=3,
                     sender=5, recipient=SERVER_ID)


def test_wrong_kind_is_rejected():
    with pytest.raises(ProtocolError, match="expected a SHARE_KEYS message"):
        open_message(_msg(), kind=MessageKind.SHARE_KEYS, session=SESSION, server_round=3,
                     sender=5, recipient=SERVER_ID)


def test_setup_body_round_trips_and_checks_counts():
    body = SetupBody(threshold=3, bits=20, input_mode=0, vector_length=11, cohort_size=9,
                     max_weight=100, clipping_range=2.5, neighbours=(1, 4, 7))
    msg = encode(MessageKind.SETUP, session=SESSION, server_round=1, sender=SERVER_ID,
                 recipient=2, body=body.encode())
    reader = open_message(msg, kind=MessageKind.SETUP, session=SESSION, server_round=1,
                          sender=SERVER_ID, recipient=2)
    assert SetupBody.decode(reader) == body
    # a count that announces more neighbours than the body holds
    bad = body.encode()[:-8]
    msg = encode(MessageKind.SETUP, session=SESSION, server_round=1, sender=SERVER_ID,
                 recipient=2, body=bad)
    with pytest.raises(ProtocolError, match="truncated"):
        SetupBody.decode(open_message(msg, kind=MessageKind.SETUP, session=SESSION,
                                      server_round=1, sender=SERVER_ID, recipient=2))
    dup = SetupBody(3, 20, 0, 11, 9, 100, 2.5, (1, 1, 7)).encode()
    msg = encode(MessageKind.SETUP, session=SESSION, server_round=1, sender=SERVER_ID,
                 recipient=2, body=dup)
    with pytest.raises(ProtocolError, match="twice"):
        SetupBody.decode(open_message(msg, kind=MessageKind.SETUP, session=SESSION,
                                      server_round=1, sender=SERVER_ID, recipient=2))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(8, 62), n=st.integers(1, 300), seed=st.integers(0, 2**32))
def test_pack_unpack_round_trip(bits, n, seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 2**bits, size=n, dtype=np.uint64)
    dtype = np.uint32 if bits <= 32 else np.uint64
    values = values.astype(dtype)
    packed = pack_words(values, bits)
    assert len(packed) == packed_size(n, bits)
    assert np.array_equal(unpack_words(packed, n, bits), values)


def test_unpack_rejects_wrong_sizes_and_padding():
    packed = pack_words(np.array([1, 2, 3], dtype=np.uint32), 12)
    with pytest.raises(ProtocolError, match="has 5 bytes"):
        unpack_words(packed + b"\0", 3, 12)
    with pytest.raises(ProtocolError, match="padding"):
        unpack_words(packed[:-1] + bytes([packed[-1] | 0x80]), 3, 12)

"""SecAgg+ end to end over the in-process path: exact sums, dropouts, aborts, bad peers."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_helpers import make_round

from confide.exceptions import ProtocolError, RoundFailedError
from confide.privacy.secagg import SecAggClient
from confide.privacy.secagg.wire import (
    HEADER,
    SEALED_SHARE_BYTES,
    SERVER_ID,
    MessageKind,
    decode_header,
    encode,
    unpack_words,
)

# --------------------------------------------------------------------------- exact sums


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(4, 24), dim=st.integers(1, 40), num_aux=st.integers(0, 2),
       fraction=st.sampled_from([0.0, 0.1, 0.3]),
       stage=st.sampled_from(["advertise_keys", "share_keys", "masked_input"]),
       bits=st.sampled_from([20, 32, 41]), seed=st.integers(0, 2**16))
def test_unmasked_sum_equals_the_plaintext_quantised_sum(n, dim, num_aux, fraction, stage,
                                                         bits, seed):
    """Random cohorts, 0/10/30% dropping after each stage: the sum is exact."""
    rnd = make_round(n, dim, seed=seed, bits=bits, num_aux=num_aux, dropout=fraction)
    rng = np.random.default_rng(seed + 1)
    leaving = rng.choice(rnd.server.cohort, size=int(round(fraction * n)), replace=False)
    rnd.drop_after = {int(c): stage for c in leaving}
    result, _ = rnd.run()
    summed = set(rnd.server.cohort) - (set(rnd.drop_after) if stage != "masked_input" else set())
    assert set(result.included) == summed
    assert np.array_equal(result.words, rnd.expected(result.included))
    # and the decoded sums are the weighted sums, to quantisation accuracy
    update, weight, aux = rnd.quantiser.decode(result.words, dim=dim, num_aux=num_aux)
    contributions = [rnd.contributions[c] for c in result.included]
    assert weight == sum(c.weight for c in contributions)
    clip = rnd.quantiser.clipping_range
    want = sum(c.weight * np.clip(c.update, -clip, clip) for c in contributions)
    assert np.allclose(update, want, atol=len(contributions) / rnd.quantiser.update_scale)


def test_a_single_masked_vector_is_uniform():
    """The masked input of a client whose input is constant: chi-square over Z_{2^8}."""
    rnd = make_round(5, 2**16, seed=3, bits=8, max_weight=1, dropout=0.0)
    for c in rnd.contributions.values():
        c.update = np.zeros_like(c.update)
        c.weight = 1
    _, path = rnd.run()
    cid = rnd.server.cohort[0]
    reply = path.replies[("masked_input", cid)]
    body = reply[HEADER.size:]
    (rejected,) = struct.unpack_from(">I", body)
    assert rejected == 0
    masked = unpack_words(body[4:], rnd.server.vector_length, 8)
    counts = np.bincount(masked, minlength=256)
    expected = masked.size / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 150 < chi2 < 400  # 255 degrees of freedom
    # the plaintext quantised input is all zeros with a weight of 1: nothing of it shows
    assert np.count_nonzero(masked) > 0.99 * masked.size


# --------------------------------------------------------------------------- aborts


def test_too_few_survivors_abort_without_a_sum():
    rnd = make_round(6, 10, degree=5, threshold=4)
    rnd.drop_after = {c: "share_keys" for c in rnd.server.cohort[:3]}
    with pytest.raises(RoundFailedError, match="3 masked inputs survived.*no sum is released"):
        rnd.run()
    assert rnd.server.result.words.size == 0


def test_too_few_unmask_replies_abort_without_a_sum():
    rnd = make_round(6, 10, degree=5, threshold=4)
    rnd.drop_after = {c: "masked_input" for c in rnd.server.cohort[:3]}
    with pytest.raises(RoundFailedError, match="fewer than the threshold 4.*no sum"):
        rnd.run()
    assert rnd.server.result.words.size == 0


def test_too_few_keys_abort_at_the_first_stage():
    rnd = make_round(6, 10, degree=5, threshold=4)
    rnd.drop_after = {c: "advertise_keys" for c in rnd.server.cohort[:3]}
    with pytest.raises(RoundFailedError, match="no sum is released"):
        rnd.run()


# --------------------------------------------------------------------------- bad peers


def _bad_peer_round(n: int = 8):
    return make_round(n, 12, seed=11, dropout=0.1)


def _only(stage: str, cid: int, change):
    def tamper(s, c, reply):
        return change(reply) if (s, c) == (stage, cid) else reply
    return tamper


@pytest.mark.parametrize("stage", ["advertise_keys", "share_keys", "masked_input", "unmask"])
@pytest.mark.parametrize("change, reason", [
    (lambda m: m[:-3], "truncated"),
    (lambda m: m + b"\x00" * 5, "oversized"),
    (lambda m: m[:HEADER.size - 4] + (len(m) - HEADER.size + 8).to_bytes(4, "big")
     + m[HEADER.size:] + bytes(8), "trailing|oversized|expected"),
    (lambda m: m[:6] + bytes(16) + m[22:], "replayed or stale"),
    (lambda m: m[:5] + bytes([int(MessageKind.UNMASK_REQUEST)]) + m[6:], "expected a"),
])
def test_malformed_replies_exclude_their_sender_and_the_round_goes_on(stage, change, reason):
    rnd = _bad_peer_round()
    bad = rnd.server.cohort[2]
    result, _ = rnd.run(tamper=_only(stage, bad, change))
    assert bad in result.rejected
    assert any(part in result.rejected[bad] for part in reason.split("|"))
    if stage == "unmask":  # its input is in the sum; only its shares are lost
        assert bad in result.included
    else:
        assert bad not in result.included
    assert len(result.included) >= rnd.server.threshold
    assert np.array_equal(result.words, rnd.expected(result.included))


def test_a_tampered_share_fails_authentication_and_excludes_its_sender():
    rnd = _bad_peer_round()
    bad = rnd.server.cohort[4]

    def flip_first_sealed_share(reply: bytes) -> bytes:
        # body: commitment(32) count(4) then (recipient u64, sealed 110) ...
        at = HEADER.size + 32 + 4 + 8 + 30
        return reply[:at] + bytes([reply[at] ^ 0x01]) + reply[at + 1:]

    result, path = rnd.run(tamper=_only("share_keys", bad, flip_first_sealed_share))
    assert bad not in result.included
    assert "failed authentication" in result.rejected[bad]
    assert np.array_equal(result.words, rnd.expected(result.included))
    assert set(result.included) == set(rnd.server.cohort) - {bad}


def test_a_share_sealed_for_someone_else_fails_authentication():
    """Swap two sealed shares of one client: each lands with the wrong recipient."""
    rnd = _bad_peer_round()
    bad = rnd.server.cohort[1]

    def swap(reply: bytes) -> bytes:
        body = bytearray(reply[HEADER.size:])
        entry = 8 + SEALED_SHARE_BYTES
        first, second = 36, 36 + entry
        a = bytes(body[first + 8:first + entry])
        b = bytes(body[second + 8:second + entry])
        body[first + 8:first + entry], body[second + 8:second + entry] = b, a
        return reply[:HEADER.size] + bytes(body)

    result, _ = rnd.run(tamper=_only("share_keys", bad, swap))
    assert bad not in result.included and "failed authentication" in result.rejected[bad]
    assert np.array_equal(result.words, rnd.expected(result.included))


def test_a_wrong_unmask_share_is_identified_and_the_sum_stays_exact():
    rnd = make_round(10, 8, seed=5, dropout=0.0, degree=9, threshold=4)
    liar = rnd.server.cohort[3]

    def corrupt_first_share(reply: bytes) -> bytes:
        at = HEADER.size + 4 + 8 + 1 + 32  # last byte of the first share
        return reply[:at] + bytes([reply[at] ^ 0x01]) + reply[at + 1:]

    result, _ = rnd.run(tamper=_only("unmask", liar, corrupt_first_share))
    assert "wrong share" in result.rejected[liar]
    assert np.array_equal(result.words, rnd.expected(result.included))
    assert set(result.included) == set(rnd.server.cohort)


def test_a_replayed_masked_input_from_a_previous_round_is_rejected():
    ids = [3, 8, 12, 20, 31, 40, 52, 60]
    first = make_round(8, 12, seed=1, ids=ids, server_round=1)
    _, path = first.run()
    old = path.replies[("masked_input", 12)]
    second = make_round(8, 12, seed=2, ids=ids, server_round=2)
    result, _ = second.run(tamper=_only("masked_input", 12, lambda _m: old))
    assert 12 not in result.included
    assert "replayed or stale" in result.rejected[12]
    assert np.array_equal(result.words, second.expected(result.included))


def test_a_replayed_setup_is_refused_by_the_client():
    rnd = make_round(5, 4, server_round=7)
    requests = rnd.server.advertise_keys()
    cid = rnd.server.cohort[0]
    stale = SecAggClient(cid, server_round=8)
    with pytest.raises(ProtocolError, match="replayed"):
        stale.advertise_keys(requests[cid])
    client = rnd.clients[cid]
    client.advertise_keys(requests[cid])
    with pytest.raises(ProtocolError, match="second SETUP"):
        client.advertise_keys(requests[cid])


def _drive_to_unmask(rnd):
    from confide.privacy.secagg.transport import InProcessMessagePath

    path = InProcessMessagePath(rnd.clients, rnd.contributions)
    requests = rnd.server.advertise_keys()
    for stage, step in zip(("advertise_keys", "share_keys", "masked_input"),
                           (rnd.server.share_keys, rnd.server.masked_input, rnd.server.unmask),
                           strict=True):
        requests = step(path.exchange(stage, requests))
    return requests


def test_a_client_never_reveals_both_shares_of_one_neighbour():
    rnd = make_round(6, 4, degree=5, threshold=3, dropout=0.0)
    requests = _drive_to_unmask(rnd)
    cid = rnd.server.cohort[0]
    header = decode_header(requests[cid])
    other = rnd.server.cohort[1]
    ids = struct.pack(">IQ", 1, other)
    evil = encode(MessageKind.UNMASK_REQUEST, session=header.session,
                  server_round=header.server_round, sender=SERVER_ID, recipient=cid,
                  body=ids + ids)
    with pytest.raises(ProtocolError, match="both shares"):
        rnd.clients[cid].unmask(evil)


def test_a_client_refuses_out_of_order_and_misaddressed_requests():
    rnd = make_round(5, 4, dropout=0.0)
    requests = rnd.server.advertise_keys()
    a, b = rnd.server.cohort[:2]
    with pytest.raises(ProtocolError, match="not from the coordinator to this client"):
        rnd.clients[a].advertise_keys(requests[b])
    rnd.clients[a].advertise_keys(requests[a])
    with pytest.raises(ProtocolError, match="expected a SHARE_KEYS_REQUEST"):
        rnd.clients[a].unmask(requests[a])
    with pytest.raises(ProtocolError, match="second SETUP"):
        rnd.clients[a].handle(requests[a])


def test_setup_with_a_threshold_below_two_is_refused():
    rnd = make_round(5, 4, dropout=0.0)
    rnd.server.threshold = 1  # a coordinator trying to weaken the protocol
    requests = rnd.server.advertise_keys()
    cid = rnd.server.cohort[0]
    with pytest.raises(ProtocolError, match="unacceptable SETUP.*threshold 1"):
        rnd.clients[cid].advertise_keys(requests[cid])


def test_a_client_serves_one_round_only():
    rnd = make_round(5, 4, dropout=0.0)
    requests = _drive_to_unmask(rnd)
    cid = rnd.server.cohort[0]
    rnd.clients[cid].unmask(requests[cid])
    with pytest.raises(ProtocolError, match="no round in progress|expected a"):
        rnd.clients[cid].unmask(requests[cid])
    fresh = make_round(5, 4, dropout=0.0, ids=rnd.server.cohort, server_round=1)
    with pytest.raises(ProtocolError, match="second SETUP"):
        rnd.clients[cid].advertise_keys(fresh.server.advertise_keys()[cid])


def test_a_client_that_refuses_is_treated_as_dropped():
    rnd = make_round(8, 6, seed=9, dropout=0.1)
    bad = rnd.server.cohort[5]

    def drop_reply(stage, cid, reply):
        return None if (stage, cid) == ("share_keys", bad) else reply

    result, _ = rnd.run(tamper=drop_reply)
    assert bad not in result.included
    assert result.dropped[bad].startswith("share_keys")
    assert np.array_equal(result.words, rnd.expected(result.included))

"""Fuzzing the SecAgg+ wire: headers, bodies, and both parties' stage handlers.

Cases come from one real round recorded stage by stage (``decoder_fuzzing``): each mutates a
request a client receives or 1-3 replies the coordinator receives (bit flips, truncation,
extension, length-field and header edits, replays of other stages' messages), or is random
bytes. 2,000 cases per decoder. A client may only answer or raise ProtocolError; the
coordinator excludes the senders of malformed replies and may only go on, raise
ProtocolError, or RoundFailedError when too few clients are left.
"""

from __future__ import annotations

import logging

import pytest
from decoder_fuzzing import CASES_PER_EXAMPLE, _RecordedRound, batches, check_batch
from hypothesis import HealthCheck, given, settings

from confide.exceptions import ProtocolError
from confide.privacy.secagg.flower_stage import pack, request_bound, unpack
from confide.privacy.secagg.wire import max_message_bytes

FUZZ = settings(max_examples=2000 // CASES_PER_EXAMPLE, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _quiet(caplog):
    # every excluded client is logged as a warning; thousands of them are expected here
    caplog.set_level(logging.ERROR, logger="confide")


@FUZZ
@given(batch=batches())
def test_fuzz_wire_decoders(batch):
    check_batch("secagg_wire", batch)


@FUZZ
@given(batch=batches())
def test_fuzz_client_stages(batch):
    check_batch("secagg_client", batch)


@FUZZ
@given(batch=batches())
def test_fuzz_coordinator_stages(batch):
    check_batch("secagg_server", batch)


def test_every_message_of_a_round_fits_the_bound():
    """The transport's size bound admits every message a real round sends, and no more."""
    rnd = _RecordedRound()
    server = rnd.server
    bound = max_message_bytes(vector_length=server.vector_length, bits=server.bits,
                              cohort_size=len(rnd.ids))
    requests = [m for _, m in rnd.client_states]
    replies = [m for _, _, r in rnd.server_states for m in r.values()]
    assert max(len(m) for m in requests + replies) <= bound
    assert max(len(m) for m in requests) <= request_bound(num_clients=len(rnd.ids))
    big = pack(bytes(bound + 1))
    with pytest.raises(ProtocolError, match="at most"):
        unpack(big, "reply", max_bytes=bound)

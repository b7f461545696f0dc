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
from decoder_fuzzing import CASES_PER_EXAMPLE, batches, check_batch
from hypothesis import HealthCheck, given, settings

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

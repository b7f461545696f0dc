"""Fuzzing enrolment tokens (:func:`confide.pki.parse_token`): 2,000 cases.

Cases are random bytes or real tokens edited (characters replaced by non-ASCII or
separators, fields emptied, lengthened, reversed, truncated). Only SecurityError may escape.
"""

from __future__ import annotations

import pytest
from decoder_fuzzing import CASES_PER_EXAMPLE, batches, check_batch
from hypothesis import HealthCheck, given, settings

from confide.exceptions import SecurityError
from confide.pki import parse_token

FUZZ = settings(max_examples=2000 // CASES_PER_EXAMPLE, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("token", [b"cfd1.a.b.c", None, "cfd1." + "A" * 10000,
                                   "cfd1.\u00e9\u00e9.AAAA.AAAA", "cfd1.!!!!.AAAA.AAAA"])
def test_non_tokens_are_one_security_error(token):
    with pytest.raises(SecurityError):
        parse_token(token)


@FUZZ
@given(batch=batches())
def test_fuzz_tokens(batch):
    for outcome, token in check_batch("token", batch):
        if outcome == "decoded":
            tid, mac, pin = parse_token(token)
            assert (len(tid), len(mac), len(pin)) == (16, 32, 16)

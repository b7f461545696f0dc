"""Fuzzing enrolment requests as the gateway and ``confide enrol answer`` decode them.

A request is parsed (:func:`parse_enrolment_request`) and then enrolled against a real
federation folder; cases are random bytes or a valid request mutated (fields of other types
or removed, non-ASCII and truncated CSRs and tokens, deep nesting, byte edits). 2,000 cases;
only SecurityError may escape.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from decoder_fuzzing import CASES_PER_EXAMPLE, batches, check_batch, decoder
from hypothesis import HealthCheck, given, settings

from confide.exceptions import SecurityError
from confide.server.enrolment import MAX_REQUEST_BYTES, parse_enrolment_request

FUZZ = settings(max_examples=2000 // CASES_PER_EXAMPLE, deadline=None,
                suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("body", [
    json.dumps({"token": "cfd1.a.b.c", "csr": "-----BEGIN \u00e9"}).encode(),  # issue 12
    json.dumps({"token": "t", "csr": "\ud800"}).encode("utf-8", "surrogatepass"),
    b"[" * 100000 + b"]" * 100000,
    b'{"token": "t", "csr": "c", "name": 5}',
    b'{"token": "t", "csr": "c", "name": "bad name"}',
    b'{"token": 1, "csr": "c"}',
    b"\xff\xfe",
    b"x" * (MAX_REQUEST_BYTES + 1),
])
def test_malformed_requests_are_one_security_error(body):
    with pytest.raises(SecurityError):
        parse_enrolment_request(body)


def test_a_valid_request_parses():
    req = parse_enrolment_request(b'{"version": 1, "token": "t", "csr": "pem", "name": null}')
    assert (req.token, req.csr_pem, req.name) == ("t", b"pem", None)


@FUZZ
@given(batch=batches())
def test_fuzz_enrolment_requests(batch):
    check_batch("enrolment_request", batch)


def test_the_fuzzed_pipeline_enrols_a_valid_request():
    """The fuzzed path reaches real enrolment: an unmutated request enrols a client."""
    dec = decoder("enrolment_request")
    fed = dec.state["federation"]
    token = fed.authority.issue_token()
    body = json.dumps({"version": 1, "token": token, "name": "fresh",
                       "csr": fed._csr(ec.SECP256R1())}).encode()
    assert dec.decode(body).name == "fresh"
    with pytest.raises(SecurityError, match="already used"):
        dec.decode(body)

"""Fuzzing the coordinator's enrolment answer as a client decodes and checks it.

Cases are random bytes or a real answer (from a real federation) mutated: fields of other
types, non-ASCII or truncated PEM, deep nesting, byte edits. 2,000 cases; only SecurityError
may escape, and an answer that decodes is for this client's key, from the pinned CA.
"""

from __future__ import annotations

from decoder_fuzzing import CASES_PER_EXAMPLE, batches, check_batch
from hypothesis import HealthCheck, given, settings

FUZZ = settings(max_examples=2000 // CASES_PER_EXAMPLE, deadline=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(batch=batches())
def test_fuzz_enrolment_answers(batch):
    check_batch("enrolment_answer", batch)


@FUZZ
@given(batch=batches())
def test_fuzz_coordinator_http_answers(batch):
    """Malformed HTTP from the coordinator (bad status lines, framing, chunking, early close)."""
    check_batch("http_answer", batch)

"""Fuzzing the decoders of task/result messages, .npy arrays and the SecAgg payload record.

Every case is random bytes or a mutated valid message (``decoder_fuzzing``): 200 hypothesis
examples of 10 cases each, 2,000 cases per decoder; decoding may only succeed or raise
ProtocolError. Issue 12's two crashes are pinned as examples.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from decoder_fuzzing import CASES_PER_EXAMPLE, N, batches, check_batch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import HealthCheck, given, settings

from confide.client.messages import array_to_numpy, array_to_tensor, decode_npy, decode_result
from confide.exceptions import ProtocolError
from confide.privacy.secagg.flower_stage import pack, unpack

#: 200 examples x 10 cases = 2,000 cases per decoder
FUZZ = settings(max_examples=2000 // CASES_PER_EXAMPLE, deadline=None,
                suppress_health_check=list(HealthCheck))


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _with_header(text: str, body: bytes) -> bytes:
    """A well-framed .npy file (correct header length and padding) around ``text``."""
    header = text.encode() + b" " * ((-(10 + len(text) + 1)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body


HUGE = _with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (2000000000000,), }",
                    b"hello world")
NO_BRACE = _with_header("{'descr': '|u1', 'fortran_order': False, 'shape': (11,), ",
                        b"hello world")


@pytest.mark.parametrize("data, match", [(HUGE, "expected 64 at most"),
                                         (NO_BRACE, "malformed .npy header")])
def test_issue_12_array_headers_raise_protocol_error(data, match):
    """A claimed 2e12-entry shape or a missing brace: ProtocolError, nothing allocated."""
    array = Array(dtype="uint8", shape=(11,), stype="numpy.ndarray", data=data)
    with pytest.raises(ProtocolError, match=match):
        array_to_numpy(array, name="payload", dtypes=("|u1",), max_entries=64)
    with pytest.raises(ProtocolError):
        array_to_tensor(array, name="update", length=N)
    content = RecordDict({"confide.result": ConfigRecord(
        {"client_id": 1, "num_examples": 1, "num_steps": 1}),
        "confide.result_tensors": ArrayRecord({"update": array})})
    with pytest.raises(ProtocolError):
        decode_result(content, client_id=1, num_params=N)


def test_huge_shape_with_matching_claim_is_refused_by_the_bound():
    """Even with no length given, a shape beyond the bytes received is refused."""
    data = _with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (2000000000000,), }",
                        bytes(16))
    with pytest.raises(ProtocolError, match="data bytes"):
        decode_npy(data, name="x", dtypes=("<f4",), max_entries=2**62)


@pytest.mark.parametrize("arr", [np.arange(5, dtype=np.float32), np.zeros(0, np.float64),
                                 np.ones(3, dtype=">f8"), np.arange(6.0).reshape(2, 3)])
def test_decode_npy_reads_what_np_save_writes(arr):
    back = decode_npy(_npy(arr), name="x", dtypes=("<f4", "<f8", ">f8"), max_entries=10)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_big_endian_vectors_become_native_tensors():
    t = array_to_tensor(Array(np.arange(4, dtype=">f4")), name="u", length=4)
    assert torch.equal(t, torch.arange(4, dtype=torch.float32))


def test_payload_round_trips():
    assert unpack(pack(b"\x00\x01abc"), "x") == b"\x00\x01abc"


@FUZZ
@given(batch=batches())
def test_fuzz_decode_npy(batch):
    for outcome, case in check_batch("npy", batch):
        if outcome == "decoded":
            arr = decode_npy(case, name="x", max_entries=4 * N,
                             dtypes=("<f2", "<f4", "<f8", ">f2", ">f4", ">f8", "|u1"))
            assert arr.size <= 4 * N


@FUZZ
@given(batch=batches())
def test_fuzz_array_to_tensor(batch):
    for outcome, case in check_batch("array_to_tensor", batch):
        if outcome == "decoded":
            assert array_to_tensor(case, name="u", length=N).shape == (N,)


@FUZZ
@given(batch=batches())
def test_fuzz_secagg_unpack(batch):
    for outcome, case in check_batch("secagg_unpack", batch):
        if outcome == "decoded":
            assert len(unpack(case, "x", max_bytes=4096)) <= 4096


@FUZZ
@given(batch=batches())
def test_fuzz_decode_task(batch):
    check_batch("decode_task", batch)


@FUZZ
@given(batch=batches())
def test_fuzz_decode_result(batch):
    for outcome, (content, vectors) in check_batch("decode_result", batch):
        if outcome == "decoded":
            result = decode_result(content, client_id=1, num_params=N, aux_names=("dc",),
                                   with_vectors=vectors)
            assert result.update.shape == (N,) and result.num_examples >= 0

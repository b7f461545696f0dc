"""Fuzz cases for every decoder of peer bytes (used by the fuzz tests and the benchmark).

Each :class:`Decoder` turns a random source into one case and decodes it: either raw random
bytes (``from_bytes``) or a valid message mutated (``generate``): bit flips, byte edits,
truncation, extension, insertion, deletion, duplication, edits of known length fields, and
format-aware edits (``.npy`` headers, SecAgg headers, JSON fields, record fields). A case may
only decode or raise one of the decoder's documented errors; anything else is a bug.

The mutation operators are in ``fuzz_mutations``. The tests draw raw bytes and seeds from
hypothesis (:func:`batches`: one example runs :data:`CASES_PER_EXAMPLE` cases); the benchmark
``benchmarks/fuzz_decoders.py`` runs 100,000 cases per decoder from one seeded generator.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from fuzz_mutations import (
    LengthField,
    config_value,
    json_case,
    mutate_bytes,
    npy,
    npy_case,
    text_mutation,
)

from confide.client.enrol import decode_enrolment_answer
from confide.client.messages import (
    FLOAT_DTYPES,
    JobSpec,
    array_to_tensor,
    decode_npy,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from confide.client.round import ClientResult, ClientTask
from confide.client.trainer import TrainSettings
from confide.exceptions import ProtocolError, RoundFailedError, SecurityError
from confide.pki import parse_token
from confide.privacy.secagg import Contribution, SecAggClient, SecAggServer
from confide.privacy.secagg.flower_stage import pack, unpack
from confide.privacy.secagg.quantisation import Quantiser
from confide.privacy.secagg.wire import (
    SERVER_ID,
    MessageKind,
    SetupBody,
    decode_header,
    decode_share_plaintext,
    open_message,
    unpack_words,
)
from confide.server.enrolment import EnrolmentAuthority, parse_enrolment_request
from confide.strategies.base import RoundInstructions

__all__ = ["Decoder", "DECODERS", "decoder", "mutate_bytes", "run_case", "batches", "check_batch",
           "CASES_PER_EXAMPLE"]

# --------------------------------------------------------------------------- the decoders


@dataclass
class Decoder:
    """One decoder of peer bytes: how to make cases, how to decode them, what it may raise."""

    name: str
    documented: tuple[type[BaseException], ...]
    generate: Callable[[random.Random], Any]
    from_bytes: Callable[[bytes], Any]
    decode: Callable[[Any], Any]
    notes: str = ""
    state: dict[str, Any] = field(default_factory=dict)


def run_case(decoder: Decoder, case: Any) -> str:
    """``"decoded"`` or ``"documented"``; any other exception propagates (a bug)."""
    try:
        decoder.decode(case)
    except decoder.documented:
        return "documented"
    return "decoded"


N = 37  # parameters of the fuzzed model


def _float_seeds() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [npy(rng.normal(size=N).astype(np.float32)), npy(np.zeros(N, np.float64)),
            npy(np.zeros(N, np.float16)), npy(rng.normal(size=(N, 1)).astype(np.float32)),
            npy(np.zeros(0, np.float32)), npy(np.float32(1.0).reshape(()))]


# -- 1. .npy header and data
def _npy_decoder() -> Decoder:
    seeds = _float_seeds() + [npy(np.arange(11, dtype=np.uint8))]

    def decode(data: bytes) -> Any:
        return decode_npy(data, name="fuzz", dtypes=FLOAT_DTYPES + ("|u1",), max_entries=4 * N)

    return Decoder("npy", (ProtocolError,), lambda r: npy_case(r, seeds, N, 4), bytes, decode,
                   "confide.client.messages.decode_npy")


def _array(data: bytes, rng: random.Random | None = None) -> Array:
    stype = "numpy.ndarray"
    if rng is not None and rng.random() < 0.03:
        stype = rng.choice(("torch.Tensor", "", "numpy.ndarray "))
    return Array(dtype="float32", shape=(N,), stype=stype, data=data)


# -- 2. array_to_tensor
def _tensor_decoder() -> Decoder:
    seeds = _float_seeds()
    return Decoder(
        "array_to_tensor", (ProtocolError,),
        lambda r: _array(npy_case(r, seeds, N, 4), r), lambda b: _array(b),
        lambda a: array_to_tensor(a, name="update", length=N),
        "confide.client.messages.array_to_tensor")


# -- 3. secagg_stage.unpack
def _unpack_decoder() -> Decoder:
    """The payload is one ConfigRecord bytes value in the "confide.stage" record."""
    payloads = [b"", b"CFSA" + bytes(60), bytes(range(256)) * 3, bytes(4097)]

    def record(value: object) -> RecordDict:
        return RecordDict({"confide.stage": ConfigRecord({"secagg": value})})  # type: ignore[dict-item]

    def generate(rng: random.Random) -> RecordDict:
        if rng.random() < 0.1:  # records of the wrong shape or type
            return rng.choice([
                RecordDict({}), RecordDict({"confide.stage": ConfigRecord({})}),
                RecordDict({"confide.stage": ArrayRecord({})}),
                RecordDict({"confide.secagg": ConfigRecord({"secagg": b"x"})}),
                record("text"), record(7), record([b"a", b"b"]), record(True)])
        data = bytearray(rng.choice(payloads))
        for _ in range(rng.randrange(4)):  # flip, cut or grow
            op = rng.randrange(3)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1:
                del data[rng.randrange(len(data) + 1):]
            else:
                data += rng.randbytes(rng.randrange(1, 64))
        return pack(bytes(data))

    def from_bytes(data: bytes) -> RecordDict:
        return pack(data)

    return Decoder("secagg_unpack", (ProtocolError,), generate, from_bytes,
                   lambda c: unpack(c, "fuzz", max_bytes=4096),
                   "confide.privacy.secagg.flower_stage.unpack")


# -- record-level mutations (task and result messages)
_RESULT_KEYS = ("client_id", "num_examples", "num_steps", "metric.train_loss", "metric.acc",
                "info.clipped", "info.x")
_TASK_KEYS = ("client_id", "server_round", "seed", "epochs", "batch_size", "lr", "momentum",
              "weight_decay", "optimizer", "drop_after_steps", "value.mu", "value.eta")
_JOB_KEYS = ("config_toml", "input_shape", "num_classes", "num_params", "num_clients",
             "dataset_size", "extra.a")


Plain = dict[str, tuple[str, dict[str, Any]]]  # record name -> ("config"|"array", fields)


def _plain(content: RecordDict) -> Plain:
    """A message as plain dicts (mutated cheaply; Flower validates each record assignment)."""
    out: Plain = {name: ("config", dict(rec)) for name, rec in content.config_records.items()}
    out.update({name: ("array", dict(rec)) for name, rec in content.array_records.items()})
    return out


def _records(plain: Plain) -> RecordDict:
    return RecordDict({name: ConfigRecord(fields) if kind == "config" else ArrayRecord(fields)
                       for name, (kind, fields) in plain.items()})


def _mutate_records(valid: Plain, rng: random.Random, seeds: list[bytes],
                    config_keys: dict[str, tuple[str, ...]],
                    array_keys: tuple[str, ...]) -> RecordDict:
    """``valid`` with 1-3 record-level edits, as a new RecordDict."""
    msg: Plain = {name: (kind, dict(fields)) for name, (kind, fields) in valid.items()}
    for _ in range(rng.choice((1, 1, 2, 3))):
        arrays = [n for n, (k, _) in msg.items() if k == "array"]
        op = rng.randrange(7)
        if op in (0, 1, 4) and not arrays:
            op = 2
        if op <= 1:  # the bytes of one array
            fields = msg[rng.choice(arrays)][1]
            key = rng.choice(list(fields) or list(array_keys))
            fields[key] = _array(npy_case(rng, seeds, N, 4), rng)
        elif op == 2:  # a config field: another value or type
            name = rng.choice(list(config_keys))
            if name in msg:
                msg[name][1][rng.choice(config_keys[name])] = config_value(rng)
        elif op == 3 and msg:  # a field removed
            fields = msg[rng.choice(list(msg))][1]
            if fields:
                del fields[rng.choice(list(fields))]
        elif op == 4:  # an array added under a known or unknown name
            key = rng.choice(array_keys) + ("" if rng.random() < 0.5 else str(rng.randrange(99)))
            msg[rng.choice(arrays)][1][key] = _array(npy_case(rng, seeds, N, 4), rng)
        elif op == 5 and rng.random() < 0.3:  # many entries (beyond the 2 x 64 allowed)
            name = rng.choice(list(config_keys))
            if name in msg:
                for i in range(rng.choice((10, 140))):
                    msg[name][1][f"{rng.choice(('metric', 'info', 'value', 'extra'))}.k{i}"] = 1.0
        elif msg:  # a whole record removed or renamed
            name = rng.choice(list(msg))
            record = msg.pop(name)
            if rng.random() < 0.5:
                msg[name + "x"] = record
    return _records(msg)


# -- 4. decode_task
def _task_decoder() -> Decoder:
    seeds = _float_seeds()
    job = JobSpec(config_toml="[run]\nseed = 1\n", input_shape=(1, 8, 8), num_classes=10,
                  num_params=N, num_clients=5, dataset_size=100, extra={"a": 1})
    task = ClientTask(client_id=2, server_round=3, global_params=torch.zeros(N),
                      instructions=RoundInstructions(values={"mu": 0.1},
                                                     tensors={"c": torch.ones(N)}),
                      settings=TrainSettings(), seed=7, client_state={"c_i": torch.ones(N)})
    valid = _plain(encode_task(task, job))

    def generate(rng: random.Random) -> RecordDict:
        return _mutate_records(valid, rng, seeds, {"confide.task": _TASK_KEYS,
                                                   "confide.job": _JOB_KEYS},
                               ("global_params", "instr.c", "state.c_i"))

    def from_bytes(data: bytes) -> RecordDict:
        msg = {name: (kind, dict(fields)) for name, (kind, fields) in valid.items()}
        msg["confide.tensors"][1]["global_params"] = _array(data)
        return _records(msg)

    return Decoder("decode_task", (ProtocolError,), generate, from_bytes, decode_task,
                   "confide.client.messages.decode_task (a client decoding the coordinator)")


# -- 5. decode_result
def _result_decoder() -> Decoder:
    seeds = _float_seeds()
    result = ClientResult(client_id=1, update=torch.zeros(N), num_examples=4, num_steps=2,
                          metrics={"train_loss": 0.5}, aux={"dc": torch.ones(N)},
                          new_state={"c_i": torch.ones(N)}, info={"clipped": True})
    valid = {True: _plain(encode_result(result, include_vectors=True)),
             False: _plain(encode_result(result, include_vectors=False))}

    def generate(rng: random.Random) -> tuple[RecordDict, bool]:
        vectors = rng.random() < 0.8
        base = valid[vectors]
        if not vectors and rng.random() < 0.3:  # vectors in the clear under SecAgg
            base = {**base, "confide.result_tensors": ("array", {"update": _array(seeds[0])})}
        return _mutate_records(base, rng, seeds, {"confide.result": _RESULT_KEYS},
                               ("update", "aux.dc", "state.c_i")), vectors

    def from_bytes(data: bytes) -> tuple[RecordDict, bool]:
        msg = {name: (kind, dict(fields)) for name, (kind, fields) in valid[True].items()}
        msg["confide.result_tensors"][1]["update"] = _array(data)
        return _records(msg), True

    def decode(case: tuple[RecordDict, bool]) -> Any:
        content, vectors = case
        return decode_result(content, client_id=1, num_params=N, aux_names=("dc",),
                             with_vectors=vectors)

    return Decoder("decode_result", (ProtocolError,), generate, from_bytes, decode,
                   "confide.client.messages.decode_result (the coordinator decoding a client)")


# -- SecAgg: one real round, recorded stage by stage
_SECAGG_FIELDS = (LengthField(42, 4, "big"), LengthField(46, 4, "big"), LengthField(50, 4, "big"),
                  LengthField(78, 4, "big"), LengthField(82, 4, "big"), LengthField(5, 1, "big"),
                  LengthField(4, 1, "big"), LengthField(22, 4, "big"), LengthField(26, 8, "big"),
                  LengthField(34, 8, "big"))
_STAGES = ("share_keys", "masked_input", "unmask", "finish")


class _RecordedRound:
    """Server and client states before every stage of one SecAgg+ round, with the messages."""

    def __init__(self, n: int = 5, dim: int = 8) -> None:
        ids = [3, 17, 29, 41, 58][:n]
        q = Quantiser(bits=32, clipping_range=2.0, max_weight=100, cohort_size=n)
        server = SecAggServer(cohort=ids, server_round=4, bits=32,
                              vector_length=q.vector_length(dim, 0), degree=n - 1,
                              threshold=3, max_weight=100, clipping_range=2.0)
        rng = np.random.default_rng(1)
        self.contributions = {c: Contribution(update=rng.normal(size=dim), weight=5) for c in ids}
        clients = {c: SecAggClient(c, server_round=4, rng=np.random.default_rng(c)) for c in ids}
        self.client_states: list[tuple[SecAggClient, bytes]] = []  # (client before, request)
        self.server_states: list[tuple[str, SecAggServer, dict[int, bytes]]] = []
        requests = server.advertise_keys()
        self.setup = requests
        for stage in _STAGES:
            replies = {}
            for cid, req in requests.items():
                self.client_states.append((copy.deepcopy(clients[cid]), req))
                replies[cid] = clients[cid].handle(req, self.contributions[cid])
            self.server_states.append((stage, copy.deepcopy(server), replies))
            if stage == "finish":
                server.finish(replies)
            else:
                requests = getattr(server, stage)(replies)
        self.ids = ids
        self.server = server


def _secagg_wire_decoder() -> Decoder:
    rnd = _RecordedRound()
    messages = [m for _, m in rnd.client_states] + [
        m for _, _, replies in rnd.server_states for m in replies.values()]
    first = rnd.ids[0]
    setup_msg = rnd.setup[first]
    header = decode_header(setup_msg)
    packed = [bytes(range(16)) * 2, b"\x00" * 15, b"\xff" * 33]

    def generate(rng: random.Random) -> tuple[int, bytes]:
        which = rng.randrange(4)
        if which == 1:
            return which, mutate_bytes(setup_msg, rng, _SECAGG_FIELDS)
        if which == 2:
            return which, mutate_bytes(rng.choice(packed), rng)
        if which == 3:
            return which, mutate_bytes(bytes(82), rng)
        return which, mutate_bytes(rng.choice(messages), rng, _SECAGG_FIELDS)

    def decode(case: tuple[int, bytes]) -> Any:
        which, data = case
        if which == 0:
            return decode_header(data)
        if which == 1:
            return SetupBody.decode(open_message(
                data, kind=MessageKind.SETUP, session=header.session,
                server_round=header.server_round, sender=SERVER_ID, recipient=first))
        if which == 2:
            count, bits = divmod(len(data) * 8, 12)
            return unpack_words(data, count or 1, 12 if bits < 12 else 8)
        return decode_share_plaintext(data)

    return Decoder("secagg_wire", (ProtocolError,), generate, lambda b: (0, b), decode,
                   "confide.privacy.secagg.wire: decode_header, open_message + SetupBody, "
                   "unpack_words, decode_share_plaintext")


def _secagg_client_decoder() -> Decoder:
    rnd = _RecordedRound()

    def generate(rng: random.Random) -> tuple[int, bytes]:
        i = rng.randrange(len(rnd.client_states))
        request = rnd.client_states[i][1]
        if rng.random() < 0.1:  # another stage's (or client's) message: replay, reorder
            request = rng.choice(rnd.client_states)[1]
        return i, mutate_bytes(request, rng, _SECAGG_FIELDS)

    def from_bytes(data: bytes) -> tuple[int, bytes]:
        return 0, data

    def decode(case: tuple[int, bytes]) -> Any:
        i, message = case
        client, _ = rnd.client_states[i]
        client = copy.deepcopy(client)
        return client.handle(message, rnd.contributions[client.client_id])

    return Decoder("secagg_client", (ProtocolError,), generate, from_bytes, decode,
                   "SecAggClient.handle at each of the 4 stages (a client decoding the "
                   "coordinator's requests)")


def _secagg_server_decoder() -> Decoder:
    rnd = _RecordedRound()

    def generate(rng: random.Random) -> tuple[int, dict[int, bytes | None]]:
        i = rng.randrange(len(rnd.server_states))
        replies: dict[int, bytes | None] = dict(rnd.server_states[i][2])
        for cid in rng.sample(rnd.ids, rng.choice((1, 1, 1, 2, 3))):
            if rng.random() < 0.05:
                replies[cid] = None
            else:
                source = replies[cid] if rng.random() < 0.9 else replies[rng.choice(rnd.ids)]
                replies[cid] = mutate_bytes(source or b"", rng, _SECAGG_FIELDS)
        return i, replies

    def from_bytes(data: bytes) -> tuple[int, dict[int, bytes | None]]:
        replies: dict[int, bytes | None] = dict(rnd.server_states[0][2])
        replies[rnd.ids[0]] = data
        return 0, replies

    def decode(case: tuple[int, dict[int, bytes | None]]) -> Any:
        i, replies = case
        stage, server, _ = rnd.server_states[i]
        return getattr(copy.deepcopy(server), stage)(replies)

    # RoundFailedError: too few clients left after the malformed ones were excluded (the
    # documented way a round ends; the coordinator retries or stops with one line).
    return Decoder("secagg_server", (ProtocolError, RoundFailedError), generate, from_bytes,
                   decode, "SecAggServer stages with 1-3 clients' replies mutated")


# -- enrolment
class _Federation:
    """A throwaway federation folder with a few tokens and a valid request and answer."""

    def __init__(self) -> None:
        from confide.server.ca import init_federation, load_federation

        self._tmp = tempfile.TemporaryDirectory(prefix="confide-fuzz-")
        root = Path(self._tmp.name) / "fed"
        init_federation(root, name="fuzz", hosts=["localhost"])
        self.authority = EnrolmentAuthority(load_federation(root))
        self.tokens = [self.authority.issue_token(expires=dt.timedelta(hours=1))
                       for _ in range(4)]
        self.tokens.append(self.authority.issue_token(name="bound", expires=dt.timedelta(hours=1)))
        self.csrs = [self._csr(curve) for curve in (ec.SECP256R1(), ec.SECP384R1(),
                                                    ec.SECP256R1(), ec.SECP256K1())]
        answer_token = self.authority.issue_token(expires=dt.timedelta(hours=1))
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.pin = parse_token(answer_token)[2]
        self.answer = self.authority.enrol(token=answer_token,
                                           csr_pem=self._csr(self.key).encode()).to_json()

    @staticmethod
    def _csr(key: ec.EllipticCurve | ec.EllipticCurvePrivateKey) -> str:
        from cryptography.hazmat.primitives import serialization

        if isinstance(key, ec.EllipticCurve):
            key = ec.generate_private_key(key)
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
               .sign(key, hashes.SHA256()))
        return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")

    def cleanup(self) -> None:
        self._tmp.cleanup()


def _token_decoder() -> Decoder:
    fed = _Federation()
    tokens = list(fed.tokens)
    fed.cleanup()

    def generate(rng: random.Random) -> str:
        return text_mutation(rng.choice(tokens), rng)

    return Decoder("token", (SecurityError,), generate,
                   lambda b: b.decode("utf-8", "replace"), parse_token, "confide.pki.parse_token")


def _request_decoder() -> Decoder:
    fed = _Federation()

    def generate(rng: random.Random) -> bytes:
        request = {"version": 1, "token": rng.choice(fed.tokens),
                   "name": rng.choice((None, "bound", "c1", "bad name")),
                   "csr": rng.choice(fed.csrs)}
        return json_case(request, rng)

    def decode(data: bytes) -> Any:
        req = parse_enrolment_request(data)
        return fed.authority.enrol(token=req.token, csr_pem=req.csr_pem,
                                   requested_name=req.name)

    dec = Decoder("enrolment_request", (SecurityError,), generate, bytes, decode,
                  "confide.server.enrolment.parse_enrolment_request + EnrolmentAuthority.enrol "
                  "(the gateway's and 'confide enrol answer''s path)")
    dec.state["federation"] = fed
    return dec


def _answer_decoder() -> Decoder:
    fed = _Federation()
    answer, key, pin = fed.answer, fed.key, fed.pin
    fed.cleanup()

    def decode(data: bytes) -> Any:
        from confide.pki import decode_json_object

        return decode_enrolment_answer(decode_json_object(data, what="the answer",
                                                          max_bytes=1 << 20), key=key, pin=pin)

    return Decoder("enrolment_answer", (SecurityError,), lambda r: json_case(answer, r), bytes,
                   decode, "confide.client.enrol.decode_enrolment_answer (a client decoding "
                   "the coordinator's answer)")


class _ReplayedSocket:
    """The coordinator's side of a connection: the bytes it sends, in small reads."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk = data, chunk

    def sendall(self, data: bytes) -> None:
        pass

    def recv(self, n: int) -> bytes:
        out, self.data = self.data[:min(n, self.chunk)], self.data[min(n, self.chunk):]
        return out


def _http_decoder() -> Decoder:
    from confide.client.enrol import _http_request

    body = json.dumps({"name": "c1", "certificate": "-----BEGIN", "federation": "f"}).encode()
    seeds = [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body,
             b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n"
             + f"{len(body):x}".encode() + b"\r\n" + body + b"\r\n0\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + body]
    fields = (LengthField(9, 3, "big"),)

    def generate(rng: random.Random) -> tuple[bytes, int]:
        data = mutate_bytes(rng.choice(seeds), rng, fields)
        if rng.random() < 0.2:
            data = text_mutation(data.decode("latin-1"), rng).encode("utf-8", "surrogatepass")
        return data, rng.choice((1, 7, 4096))

    def decode(case: tuple[bytes, int]) -> Any:
        data, chunk = case
        return _http_request(_ReplayedSocket(data, chunk), method="POST",  # type: ignore[arg-type]
                             host="coordinator", path="/confide/v1/enrol", body=b"{}")

    return Decoder("http_answer", (SecurityError,), generate, lambda b: (b, 4096), decode,
                   "confide.client.enrol._http_request (a client reading the coordinator's "
                   "HTTP answer, h11)")


_FACTORIES: dict[str, Callable[[], Decoder]] = {
    "npy": _npy_decoder, "array_to_tensor": _tensor_decoder, "secagg_unpack": _unpack_decoder,
    "decode_task": _task_decoder, "decode_result": _result_decoder,
    "secagg_wire": _secagg_wire_decoder, "secagg_client": _secagg_client_decoder,
    "secagg_server": _secagg_server_decoder, "token": _token_decoder,
    "enrolment_request": _request_decoder, "enrolment_answer": _answer_decoder,
    "http_answer": _http_decoder,
}
_BUILT: dict[str, Decoder] = {}
#: every decoder's name, in a stable order
DECODERS = tuple(_FACTORIES)


def decoder(name: str) -> Decoder:
    """The named decoder, built on first use (a SecAgg round or a federation folder)."""
    if name not in _BUILT:
        _BUILT[name] = _FACTORIES[name]()
    return _BUILT[name]


#: cases per hypothesis example: one from hypothesis's bytes, the rest seeded mutations
CASES_PER_EXAMPLE = 10


def batches() -> Any:
    """Hypothesis strategy of ``(raw_bytes, seed)``: one example is a batch of cases.

    Hypothesis's own cost per example (about 1 ms of CPU, several on a loaded machine) is
    larger than most decoders', so each example runs :data:`CASES_PER_EXAMPLE` cases: the
    raw bytes (shrunk by hypothesis on failure) and mutations seeded by ``seed`` (a failure
    names the seed and the index, which replay it exactly).
    """
    from hypothesis import strategies as st

    return st.tuples(st.binary(max_size=600), st.integers(0, 2**64 - 1))


def check_batch(name: str, batch: tuple[bytes, int]) -> list[tuple[str, Any]]:
    """Run one batch of cases for ``name``; returns ``(outcome, case)`` for each."""
    raw, seed = batch
    dec = decoder(name)
    rng = random.Random(seed)
    out = [(check(name, dec.from_bytes(raw), what="hypothesis bytes"), dec.from_bytes(raw))]
    for i in range(CASES_PER_EXAMPLE - 1):
        case = dec.generate(rng)
        out.append((check(name, case, what=f"seed {seed}, mutation {i}"), case))
    return out


def check(name: str, case: Any, *, what: str = "") -> str:
    """Decode ``case``; fail with the case's decoder named if anything undocumented escapes."""
    dec = decoder(name)
    try:
        return run_case(dec, case)
    except Exception as exc:
        raise AssertionError(f"{name} ({dec.notes}), {what}: raised an undocumented "
                             f"{type(exc).__module__}.{type(exc).__name__}: {exc}") from exc

"""The wire format between Confide's ServerApp and ClientApp, on Flower's records.

Every tensor travels as a Flower ``Array`` in an ``ArrayRecord`` (numpy's ``.npy`` format,
written with ``allow_pickle=False``); every scalar and string in a ``ConfigRecord``. Nothing
is pickled, and every field a peer sends is checked on arrival: a malformed or oversized
reply raises :class:`~confide.exceptions.ProtocolError` (and nothing else), and the
coordinator treats that client as dropped.

Received ``.npy`` bytes are never given to ``np.load``: :func:`decode_npy` parses the header
itself, accepts only the dtypes and the number of entries the caller expects, checks that the
data is exactly as long as the header says, and then views the bytes already received
(``np.frombuffer``), so a header claiming a huge shape can neither allocate memory nor raise
anything but ``ProtocolError``.

Message types: ``train`` carries a :class:`~confide.client.ClientTask` plus the
:class:`JobSpec`; ``query.confide_hello`` asks a node who it is; ``query.confide_finish``
tells nodes the job is over; ``query.<stage>`` messages carry extra protocol stages (secure
aggregation) as plain records.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from confide.client.compression import BYTES_UP_KEY, PAYLOAD_KEY
from confide.client.round import ClientResult, ClientTask
from confide.client.trainer import TrainSettings
from confide.compression import CompressedUpdate, UpdateCodec
from confide.exceptions import ProtocolError
from confide.strategies.base import RoundInstructions

__all__ = [
    "JobSpec",
    "TRAIN",
    "HELLO",
    "FINISH",
    "encode_task",
    "decode_task",
    "encode_result",
    "decode_result",
    "tensor_to_array",
    "array_to_tensor",
    "array_to_numpy",
    "decode_npy",
    "FLOAT_DTYPES",
]

TRAIN = "train"
HELLO = "query.confide_hello"
FINISH = "query.confide_finish"

_TASK, _TENSORS, _JOB = "confide.task", "confide.tensors", "confide.job"
_RESULT, _RESULT_TENSORS = "confide.result", "confide.result_tensors"
#: prefix of a compressed update's arrays in a reply
_PAYLOAD = "payload."
#: the ``.npy`` dtypes of compressed payload arrays (confide.compression's wire layouts)
_PAYLOAD_DTYPES = ("<f4", ">f4", "|u1", "<i4", ">i4")
_SCALARS = (int, float, str, bool)
#: metric/info entries a client may report per round
_MAX_ENTRIES = 64
#: bounds on the model a task may ask a client to build (a 2^26-entry input is 256 MiB)
_MAX_INPUT_DIMS, _MAX_INPUT_ENTRIES, _MAX_CLASSES = 8, 2**26, 2**20


@dataclass(frozen=True)
class JobSpec:
    """What a client needs to run the job: the resolved config and the model's shape.

    ``config_toml`` is the whole resolved job config (``confide.config.dump_config``), so
    the client builds the same strategy, privacy stages and trainer as the coordinator.
    """

    config_toml: str
    input_shape: tuple[int, ...]
    num_classes: int
    num_params: int
    num_clients: int
    dataset_size: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Identifies the job (clients cache what they build per job)."""
        text = f"{self.config_toml}|{self.input_shape}|{self.num_classes}|{self.num_params}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def tensor_to_array(t: torch.Tensor) -> Array:
    """A torch tensor as a Flower Array (numpy ``.npy`` bytes, never pickled)."""
    return Array(np.ascontiguousarray(t.detach().cpu().numpy()))


# ---------------------------------------------------------------- .npy decoding (peer bytes)

#: the ``.npy`` dtypes a float vector may travel as (``np.save`` writes the host's order)
FLOAT_DTYPES = ("<f2", "<f4", "<f8", ">f2", ">f4", ">f8")
#: hard cap on the entries of any received vector (1-D float32: 8 GiB)
MAX_VECTOR_ENTRIES = 2**31
_NPY_MAGIC = b"\x93NUMPY"
#: np.save writes about 120 header bytes for a 1-D array; nothing legitimate comes near this
_MAX_NPY_HEADER = 4096
# The header np.save writes (numpy.lib.format, format versions 1.0-3.0): a Python dict
# literal with exactly these keys in this order, ended by "\n" and padded with spaces.
# Parsed with a regular expression, never with ast/tokenize (whose errors are not ours).
_NPY_HEADER = re.compile(
    r"\{\s*'descr'\s*:\s*'(?P<descr>[<>|=][a-z][0-9]{1,2})'\s*,"
    r"\s*'fortran_order'\s*:\s*(?P<fortran>False|True)\s*,"
    r"\s*'shape'\s*:\s*\((?P<shape>\s*(?:[0-9]{1,19}\s*(?:,\s*[0-9]{1,19}\s*)*,?\s*)?)\)"
    r"\s*,?\s*\}[ ]*\n")


def decode_npy(data: bytes | bytearray | memoryview, *, name: str,
               dtypes: tuple[str, ...], max_entries: int,
               expected: str | None = None) -> np.ndarray:
    """Parse ``.npy`` bytes from a peer into a read-only view of those bytes.

    Checks, before touching the data: the magic and format version (numpy.lib.format,
    NEP 1), a header of at most 4 KiB in np.save's layout, a dtype in ``dtypes``, C order,
    at most ``max_entries`` entries, and a data section of exactly ``entries * itemsize``
    bytes. Any failure is a one-line :class:`ProtocolError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(f"{name}: array data is not bytes")
    view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
    if len(view) < 10 or bytes(view[:6]) != _NPY_MAGIC:
        raise ProtocolError(f"{name}: not a .npy array (bad magic bytes)")
    major, minor = view[6], view[7]
    if (major, minor) == (1, 0):
        header_len, start = int.from_bytes(view[8:10], "little"), 10
    elif (major, minor) in ((2, 0), (3, 0)) and len(view) >= 12:
        header_len, start = int.from_bytes(view[8:12], "little"), 12
    else:
        raise ProtocolError(f"{name}: unsupported .npy format version {major}.{minor}")
    if header_len > _MAX_NPY_HEADER or start + header_len > len(view):
        raise ProtocolError(f"{name}: .npy header of {header_len} bytes is oversized or "
                            "truncated")
    try:
        header = bytes(view[start:start + header_len]).decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError(f"{name}: .npy header is not ASCII") from None
    m = _NPY_HEADER.fullmatch(header)
    if m is None:
        raise ProtocolError(f"{name}: malformed .npy header")
    descr = m["descr"]
    if descr not in dtypes:
        raise ProtocolError(f"{name}: expected {expected or 'one of ' + ', '.join(dtypes)}, "
                            f"got dtype {descr!r}")
    shape = tuple(int(d) for d in m["shape"].replace(",", " ").split())
    if m["fortran"] == "True" and len(shape) > 1:
        raise ProtocolError(f"{name}: Fortran-ordered arrays are not accepted")
    entries = math.prod(shape)
    if entries > max_entries:
        raise ProtocolError(f"{name}: {entries} entries, expected {max_entries} at most")
    dtype = np.dtype(descr)
    offset = start + header_len
    if len(view) - offset != entries * dtype.itemsize:
        raise ProtocolError(f"{name}: the header announces {entries * dtype.itemsize} data "
                            f"bytes, {len(view) - offset} follow")
    return np.frombuffer(view, dtype=dtype, count=entries, offset=offset).reshape(shape)


def array_to_numpy(a: Any, *, name: str, dtypes: tuple[str, ...], max_entries: int,
                   expected: str | None = None) -> np.ndarray:
    """A received Flower ``Array`` as a read-only numpy view, checked by :func:`decode_npy`."""
    if not isinstance(a, Array):
        raise ProtocolError(f"{name}: expected an array")
    if getattr(a, "stype", None) != "numpy.ndarray":
        raise ProtocolError(f"{name}: unsupported array serialisation")
    return decode_npy(getattr(a, "data", None), name=name, dtypes=dtypes,  # type: ignore[arg-type]
                      max_entries=max_entries, expected=expected)


def array_to_tensor(a: Any, *, name: str, length: int | None = None) -> torch.Tensor:
    """A received Flower Array as a 1-D float tensor, checked against ``length``."""
    limit = MAX_VECTOR_ENTRIES if length is None else min(length, MAX_VECTOR_ENTRIES)
    arr = array_to_numpy(a, name=name, dtypes=FLOAT_DTYPES, max_entries=limit,
                         expected="a 1-D float vector")
    if arr.ndim != 1:
        raise ProtocolError(f"{name}: expected a 1-D float vector, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ProtocolError(f"{name}: expected {length} entries, got {arr.shape[0]}")
    # A writable copy in the host's byte order (torch has no big-endian tensors); its size
    # is that of the bytes received, already checked against ``length``.
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


def _records(content: Any, what: str) -> RecordDict:
    if not isinstance(content, RecordDict):
        raise ProtocolError(f"{what}: not a Flower record")
    return content


def _number(value: int | float, key: str, what: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ProtocolError(f"{what}: field {key!r} is out of range") from None


def _get(record: Any, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    try:
        value = record[key]
    except (KeyError, TypeError):
        raise ProtocolError(f"{what}: field {key!r} is missing") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: field {key!r} has the wrong type")
    return value


# --------------------------------------------------------------------------- tasks


def encode_task(task: ClientTask, job: JobSpec) -> RecordDict:
    """A round's task for one client as Flower records."""
    s = task.settings
    cfg: dict[str, Any] = {
        "client_id": task.client_id, "server_round": task.server_round, "seed": task.seed,
        "epochs": s.epochs, "batch_size": s.batch_size, "lr": float(s.lr),
        "momentum": float(s.momentum), "weight_decay": float(s.weight_decay),
        "optimizer": s.optimizer,
        "drop_after_steps": -1 if task.drop_after_steps is None else task.drop_after_steps,
    }
    for k, value in task.instructions.values.items():
        cfg[f"value.{k}"] = float(value)
    tensors = {"global_params": tensor_to_array(task.global_params)}
    for k, t in task.instructions.tensors.items():
        tensors[f"instr.{k}"] = tensor_to_array(t)
    for k, t in task.client_state.items():
        tensors[f"state.{k}"] = tensor_to_array(t)
    job_cfg: dict[str, Any] = {"config_toml": job.config_toml, "input_shape": list(job.input_shape),
               "num_classes": job.num_classes, "num_params": job.num_params,
               "num_clients": job.num_clients, "dataset_size": job.dataset_size}
    for k, v in job.extra.items():
        job_cfg[f"extra.{k}"] = v
    return RecordDict({_TASK: ConfigRecord(cfg), _TENSORS: ArrayRecord(tensors),
                       _JOB: ConfigRecord(job_cfg)})


def decode_job(content: RecordDict) -> JobSpec:
    """The job spec carried by a task (ProtocolError if malformed)."""
    what = "task"
    try:
        job = _records(content, what).config_records[_JOB]
    except KeyError:
        raise ProtocolError("task: the job description is missing") from None
    shape = _get(job, "input_shape", list, what)
    # The client builds a model of this shape: bound it before anything is allocated.
    if not 0 < len(shape) <= _MAX_INPUT_DIMS or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) \
            or math.prod(shape) > _MAX_INPUT_ENTRIES:
        raise ProtocolError("task: bad input_shape")
    num_classes = _get(job, "num_classes", int, what)
    num_params = _get(job, "num_params", int, what)
    num_clients = _get(job, "num_clients", int, what)
    dataset_size = _get(job, "dataset_size", int, what)
    if not 1 <= num_classes <= _MAX_CLASSES or not 1 <= num_params <= MAX_VECTOR_ENTRIES \
            or not 1 <= num_clients <= 2**32 or dataset_size < 0:
        raise ProtocolError("task: job sizes out of range")
    extra = {k[len("extra."):]: v for k, v in job.items() if k.startswith("extra.")}
    return JobSpec(config_toml=_get(job, "config_toml", str, what), input_shape=tuple(shape),
                   num_classes=num_classes, num_params=num_params, num_clients=num_clients,
                   dataset_size=dataset_size, extra=extra)


def decode_task(content: RecordDict) -> tuple[ClientTask, JobSpec]:
    """The task and job spec of a ``train`` message (ProtocolError if malformed)."""
    what = "task"
    job = decode_job(content)
    try:
        cfg = content.config_records[_TASK]
        tensors = content.array_records[_TENSORS]
    except KeyError:
        raise ProtocolError("task: records are missing") from None
    settings = TrainSettings(
        epochs=_get(cfg, "epochs", int, what), batch_size=_get(cfg, "batch_size", int, what),
        lr=_get(cfg, "lr", float, what), momentum=_get(cfg, "momentum", float, what),
        weight_decay=_get(cfg, "weight_decay", float, what),
        optimizer=_get(cfg, "optimizer", str, what))
    if settings.epochs < 1 or settings.batch_size < 1 or settings.optimizer not in ("sgd", "adam"):
        raise ProtocolError("task: bad training settings")
    n = job.num_params
    params = array_to_tensor(tensors.get("global_params"), name="global_params", length=n)
    instr_t = {k[len("instr."):]: array_to_tensor(v, name=k, length=n)
               for k, v in tensors.items() if k.startswith("instr.")}
    state = {k[len("state."):]: array_to_tensor(v, name=k, length=n)
             for k, v in tensors.items() if k.startswith("state.")}
    values = {k[len("value."):]: _number(v, k, what) for k, v in cfg.items()
              if k.startswith("value.") and isinstance(v, int | float)}
    drop = _get(cfg, "drop_after_steps", int, what)
    task = ClientTask(
        client_id=_get(cfg, "client_id", int, what),
        server_round=_get(cfg, "server_round", int, what),
        global_params=params, instructions=RoundInstructions(values=values, tensors=instr_t),
        settings=settings, seed=_get(cfg, "seed", int, what), client_state=state,
        drop_after_steps=None if drop < 0 else drop)
    return task, job


# --------------------------------------------------------------------------- results


def encode_result(result: ClientResult, *, include_vectors: bool = True) -> RecordDict:
    """A client's result as Flower records (only scalar metrics/info travel).

    ``include_vectors=False`` (secure aggregation in a deployment) keeps the update, the
    auxiliary vectors, the client state, its counts and its metrics on the client: they
    follow inside the masked sum of the secure-aggregation stages (counts travel as 0).
    """
    cfg: dict[str, Any] = {"client_id": result.client_id,
                           "num_examples": result.num_examples if include_vectors else 0,
                           "num_steps": result.num_steps if include_vectors else 0}
    for k, m in result.metrics.items():
        if include_vectors:
            cfg[f"metric.{k}"] = float(m)
    for k, v in result.info.items():
        if isinstance(v, _SCALARS):
            cfg[f"info.{k}"] = v
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            cfg[f"info.{k}"] = float(v)
    tensors: dict[str, Array] = {}
    payload = result.info.get(PAYLOAD_KEY)
    if include_vectors and isinstance(payload, CompressedUpdate) and \
            payload.dim == int(result.update.numel()):
        # the compressed arrays travel, not the dense vector they decode to
        for k, t in payload.arrays.items():
            tensors[f"{_PAYLOAD}{k}"] = tensor_to_array(t)
    elif include_vectors:
        tensors["update"] = tensor_to_array(result.update)
    if include_vectors:
        for k, t in result.aux.items():
            tensors[f"aux.{k}"] = tensor_to_array(t)
        for k, t in result.new_state.items():
            tensors[f"state.{k}"] = tensor_to_array(t)
    return RecordDict({_RESULT: ConfigRecord(cfg), _RESULT_TENSORS: ArrayRecord(tensors)})


def decode_result(content: RecordDict, *, client_id: int, num_params: int,
                  aux_names: tuple[str, ...] = (), with_vectors: bool = True,
                  codec: UpdateCodec | None = None, server_round: int = 0) -> ClientResult:
    """A client's reply, checked: its id, vector lengths, counts and metric sizes.

    With ``with_vectors=False`` the reply must carry no vectors at all (secure aggregation:
    they arrive masked later); the result then holds zero placeholders of the right shape.
    A compressed update (``payload.*`` arrays) is decoded with ``codec``, the job's own,
    for ``server_round``, the round of the task it answers: method, bits, dim, scale and
    the shared seed come from the coordinator's side, never from the reply
    (:class:`~confide.compression.CompressedUpdate`). Its ``info["bytes_up"]`` is then the
    size of the arrays received, not what the client claims.
    """
    what = f"reply of client {client_id}"
    try:
        cfg = _records(content, what).config_records[_RESULT]
        tensors = content.array_records[_RESULT_TENSORS]
    except KeyError:
        raise ProtocolError(f"{what}: records are missing") from None
    if _get(cfg, "client_id", int, what) != client_id:
        raise ProtocolError(f"{what}: it claims to be another client")
    num_examples = _get(cfg, "num_examples", int, what)
    num_steps = _get(cfg, "num_steps", int, what)
    if num_examples < 0 or num_steps < 0:
        raise ProtocolError(f"{what}: negative counts")
    if len(cfg) > 3 + 2 * _MAX_ENTRIES or len(tensors) > 1 + 2 * _MAX_ENTRIES:
        raise ProtocolError(f"{what}: too many entries")
    payload_bytes: int | None = None
    if not with_vectors:
        if len(tensors):
            raise ProtocolError(f"{what}: vectors in the clear under secure aggregation")
        if num_examples or num_steps or any(k.startswith("metric.") for k in cfg.keys()):
            raise ProtocolError(f"{what}: counts or metrics in the clear under secure "
                                "aggregation")
        update = torch.zeros(num_params)
        aux = {k: torch.zeros(num_params) for k in aux_names}
    else:
        if any(k.startswith(_PAYLOAD) for k in tensors.keys()):
            update, payload_bytes = _decode_payload(tensors, what=what, num_params=num_params,
                                                    codec=codec, server_round=server_round)
        else:
            update = array_to_tensor(tensors.get("update"), name="update", length=num_params)
        aux = {k[len("aux."):]: array_to_tensor(v, name=k, length=num_params)
               for k, v in tensors.items() if k.startswith("aux.")}
    missing = [a for a in aux_names if a not in aux]
    if missing:
        raise ProtocolError(f"{what}: auxiliary vector {missing[0]!r} is missing")
    state = {k[len("state."):]: array_to_tensor(v, name=k, length=num_params)
             for k, v in tensors.items() if k.startswith("state.")}
    metrics = {}
    for k, v in cfg.items():
        if k.startswith("metric."):
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ProtocolError(f"{what}: metric {k!r} is not a number")
            metrics[k[len("metric."):]] = _number(v, k, what)
    info = {k[len("info."):]: v for k, v in cfg.items() if k.startswith("info.")}
    if payload_bytes is not None:
        info[BYTES_UP_KEY] = payload_bytes
    else:
        info.pop(BYTES_UP_KEY, None)  # a dense reply: the coordinator counts it itself
    if "train_loss" in metrics and not math.isfinite(metrics["train_loss"]):
        metrics["train_loss"] = float("nan")
    return ClientResult(client_id=client_id, update=update, num_examples=num_examples,
                        num_steps=num_steps, metrics=metrics, aux=aux, new_state=state,
                        info=info)


def _decode_payload(tensors: Any, *, what: str, num_params: int, codec: UpdateCodec | None,
                    server_round: int) -> tuple[torch.Tensor, int]:
    """A reply's compressed update, decoded; and the bytes of its arrays."""
    if codec is None or codec.method == "none":
        raise ProtocolError(f"{what}: a compressed update for a job without compression")
    if "update" in tensors.keys():
        raise ProtocolError(f"{what}: both a dense and a compressed update")
    arrays: dict[str, torch.Tensor] = {}
    nbytes = 0
    for key, value in tensors.items():
        if not key.startswith(_PAYLOAD):
            continue
        arr = array_to_numpy(value, name=key, dtypes=_PAYLOAD_DTYPES,
                             max_entries=2 * num_params + 2, expected="a payload array")
        host = arr.astype(arr.dtype.newbyteorder("="), copy=True)
        arrays[key[len(_PAYLOAD):]] = torch.from_numpy(host)
        nbytes += int(host.nbytes)
    payload = CompressedUpdate(method=codec.method, dim=num_params, arrays=arrays,
                               bits=codec.bits, server_round=server_round, scale=codec.scale)
    dense = codec.decode(payload)  # checks the layout: a malformed payload is a ProtocolError
    if dense.shape[0] != 1:
        raise ProtocolError(f"{what}: a payload of {dense.shape[0]} clients")
    return dense.reshape(-1).to(torch.float32), nbytes

"""The ServerApp/ClientApp wire format: round trips, and malformed peer messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from confide.client import ClientResult, ClientTask, TrainSettings
from confide.client.messages import (
    JobSpec,
    decode_result,
    decode_task,
    encode_result,
    encode_task,
)
from confide.exceptions import ProtocolError
from confide.strategies.base import RoundInstructions

N = 37
JOB = JobSpec(config_toml="[run]\nrounds = 2\n", input_shape=(8,), num_classes=3,
              num_params=N, num_clients=4, dataset_size=100)


def _task() -> ClientTask:
    return ClientTask(
        client_id=2, server_round=5, global_params=torch.randn(N),
        instructions=RoundInstructions(values={"mu": 0.01},
                                       tensors={"c": torch.randn(N)}),
        settings=TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9,
                               weight_decay=1e-4, optimizer="sgd"),
        seed=(1 << 62) + 7, client_state={"c_i": torch.randn(N)}, drop_after_steps=None)


def test_task_round_trip():
    task = _task()
    decoded, job = decode_task(encode_task(task, JOB))
    assert job == JOB
    assert decoded.client_id == 2 and decoded.server_round == 5 and decoded.seed == task.seed
    assert torch.equal(decoded.global_params, task.global_params)
    assert torch.equal(decoded.instructions.tensors["c"], task.instructions.tensors["c"])
    assert decoded.instructions.values == {"mu": 0.01}
    assert torch.equal(decoded.client_state["c_i"], task.client_state["c_i"])
    assert decoded.settings == task.settings
    assert decoded.drop_after_steps is None


def test_result_round_trip():
    result = ClientResult(client_id=3, update=torch.randn(N), num_examples=50, num_steps=7,
                          metrics={"train_loss": 0.5}, aux={"dc": torch.randn(N)},
                          new_state={"c_i": torch.randn(N)},
                          info={"clipped": True, "norm": torch.tensor(2.5), "obj": object()})
    back = decode_result(encode_result(result), client_id=3, num_params=N, aux_names=("dc",))
    assert torch.equal(back.update, result.update)
    assert torch.equal(back.aux["dc"], result.aux["dc"])
    assert torch.equal(back.new_state["c_i"], result.new_state["c_i"])
    assert back.metrics == {"train_loss": 0.5}
    assert back.info == {"clipped": True, "norm": 2.5}  # non-scalars never travel


def _result(**overrides) -> RecordDict:
    content = encode_result(ClientResult(client_id=1, update=torch.zeros(N), num_examples=4,
                                         num_steps=1))
    for key, value in overrides.items():
        record, field = key.split("__")
        target = (content.config_records if record == "cfg" else content.array_records)
        name = "confide.result" if record == "cfg" else "confide.result_tensors"
        target[name][field] = value
    return content


@pytest.mark.parametrize("overrides, match", [
    ({"cfg__client_id": 2}, "another client"),
    ({"cfg__num_examples": -1}, "negative"),
    ({"cfg__num_steps": "many"}, "wrong type"),
    ({"arr__update": Array(np.zeros(N + 1, dtype=np.float32))}, "expected 37"),
    ({"arr__update": Array(np.zeros((N, 1), dtype=np.float32))}, "1-D float"),
    ({"arr__update": Array(np.zeros(N, dtype=np.int64))}, "1-D float"),
    ({"cfg__metric.loss": "low"}, "not a number"),
])
def test_malformed_replies_are_refused(overrides, match):
    with pytest.raises(ProtocolError, match=match):
        decode_result(_result(**overrides), client_id=1, num_params=N)


def test_missing_aux_vector_is_refused():
    with pytest.raises(ProtocolError, match="auxiliary"):
        decode_result(_result(), client_id=1, num_params=N, aux_names=("dc",))


def test_missing_records_are_refused():
    with pytest.raises(ProtocolError):
        decode_result(RecordDict({}), client_id=1, num_params=N)
    with pytest.raises(ProtocolError):
        decode_task(RecordDict({"confide.job": ConfigRecord({"config_toml": "x"})}))


scalars = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True),
                    st.text(max_size=8), st.booleans(), st.binary(max_size=8),
                    st.lists(st.integers(0, 5), max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["client_id", "num_examples", "num_steps",
                                        "metric.train_loss", "info.x", "junk"]), scalars,
                       max_size=6),
       st.one_of(st.none(), st.integers(0, 80)), st.sampled_from(["float32", "float64",
                                                                  "int32", "uint8"]))
def test_arbitrary_replies_decode_or_raise_protocol_error(cfg, length, dtype):
    """Whatever a peer sends, decoding either yields a checked result or a ProtocolError."""
    tensors = {} if length is None else {"update": Array(np.zeros(length, dtype=dtype))}
    content = RecordDict({"confide.result": ConfigRecord(cfg),
                          "confide.result_tensors": ArrayRecord(tensors)})
    try:
        result = decode_result(content, client_id=1, num_params=N)
    except ProtocolError:
        return
    assert result.client_id == 1 and result.update.shape == (N,)
    assert result.num_examples >= 0 and result.num_steps >= 0

"""Secure aggregation as Grid message stages gives the simulation's sum, without the
coordinator ever holding an update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from confide.client import ClientResult
from confide.client.messages import decode_result, encode_result
from confide.client.session import ClientSession
from confide.config import load_config
from confide.exceptions import ProtocolError
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.privacy.secagg.flower_stage import handle_secagg_stage, pack, unpack
from confide.server.flower_app import stage_request
from confide.server.secagg_transport import DeployedSecureAggregator

N = 50


class _LoopbackExecutor:
    """Delivers ``exchange`` requests to client sessions, as the Grid and ClientApp would."""

    def __init__(self, sessions: dict[int, ClientSession], silent: set[int] = frozenset()):
        self.sessions, self.silent = sessions, silent
        self.seen: list[RecordDict] = []

    def exchange(self, stage, requests, *, server_round, timeout=None):
        out = {}
        for cid, content in requests.items():
            if cid in self.silent:
                out[cid] = "no reply"
                continue
            content = stage_request(content, client_id=cid, stage=stage,
                                    server_round=server_round)
            self.seen.append(content)
            try:
                out[cid] = handle_secagg_stage(content, self.sessions[cid])
            except ProtocolError as exc:
                out[cid] = str(exc)
        return out


def _setup(weighting_examples: bool = True):
    config = load_config(None, ["data.num_clients=4", "cohort.size=4",
                                "secure_aggregation.enabled=true"])
    results, sessions = {}, {}
    gen = torch.Generator().manual_seed(0)
    for cid in range(4):
        result = ClientResult(client_id=cid, update=torch.randn(N, generator=gen) * 0.1,
                              num_examples=10 + cid, num_steps=3)
        results[cid] = result
        session = ClientSession(client_id=cid, config=config)
        session.job = object()  # type: ignore[assignment]
        from confide.client import ClientTask, TrainSettings
        from confide.strategies.base import RoundInstructions

        session.last_task = ClientTask(client_id=cid, server_round=1,
                                       global_params=torch.zeros(N),
                                       instructions=RoundInstructions(),
                                       settings=TrainSettings(), seed=0)
        session.last_result = result
        session.scratch["weighting"] = "examples"
        sessions[cid] = session
    return config, results, sessions


def _placeholders(results: dict[int, ClientResult]) -> list[ClientResult]:
    return [decode_result(encode_result(r, include_vectors=False), client_id=cid,
                          num_params=N, with_vectors=False) for cid, r in results.items()]


def test_grid_stages_give_the_in_process_sum():
    config, results, sessions = _setup()
    reference = SecureAggregator(config).aggregate(list(results.values()), server_round=1,
                                                   weighting="examples")
    deployed = DeployedSecureAggregator(config)
    executor = _LoopbackExecutor(sessions)
    deployed.executor = executor  # type: ignore[assignment]
    placeholders = _placeholders(results)
    assert all(float(r.update.abs().sum()) == 0 for r in placeholders)  # nothing in clear
    got = deployed.aggregate(placeholders, server_round=1, weighting="examples")
    assert torch.equal(got.update_sum, reference.update_sum)
    assert got.weight_sum == reference.weight_sum == sum(10 + c for c in range(4))
    assert sorted(got.client_ids) == [0, 1, 2, 3]
    # what crossed the "network" were protocol bytes, never the update's float32 bytes
    raw = b"".join(unpack(c, "x") for c in executor.seen)
    for r in results.values():
        assert r.update.numpy().tobytes()[:32] not in raw


def test_a_silent_client_is_a_dropout_the_protocol_tolerates():
    config, results, sessions = _setup()
    deployed = DeployedSecureAggregator(config)
    deployed.executor = _LoopbackExecutor(sessions, silent={3})  # type: ignore[assignment]
    got = deployed.aggregate(_placeholders(results), server_round=1, weighting="examples")
    expected = sum((10 + c) * results[c].update.double() for c in range(3))
    assert sorted(got.client_ids) == [0, 1, 2]
    assert torch.allclose(got.update_sum.double(), expected, atol=1e-4)


class _SetupWithTasks(_LoopbackExecutor):
    """The Grid executor's side of Round 0 with the tasks: SETUP out, keys back."""

    def __init__(self, sessions, silent=frozenset()):
        super().__init__(sessions, silent)
        self.job = type("Job", (), {"num_params": N})()
        self.aux_names = ()
        self.advertised: dict[int, bytes] = {}
        self.stages: list[str] = []

    def send_tasks(self, aggregator, cohort):
        for cid, setup in aggregator.setup_requests(cohort, 1).items():
            if cid in self.silent:  # did not finish training: no keys either
                continue
            content = stage_request(pack(setup), client_id=cid, stage="secagg", server_round=1)
            self.advertised[cid] = unpack(handle_secagg_stage(content, self.sessions[cid]), "k")

    def exchange(self, stage, requests, *, server_round, timeout=None):
        self.stages.append(unpack(next(iter(requests.values())), "r")[4:5].hex())
        return super().exchange(stage, requests, server_round=server_round, timeout=timeout)


def test_round_0_with_the_tasks_gives_the_same_sum_in_three_exchanges():
    """SETUP travels with the training task and the keys with its reply (Bonawitz et al.
    2017, Fig. 4, Round 0): the same sum, one round trip fewer."""
    config, results, sessions = _setup()
    reference = SecureAggregator(config).aggregate(list(results.values()), server_round=1,
                                                   weighting="examples")
    deployed = DeployedSecureAggregator(config)
    executor = _SetupWithTasks(sessions)
    deployed.executor = executor  # type: ignore[assignment]
    executor.send_tasks(deployed, [0, 1, 2, 3])
    got = deployed.aggregate(_placeholders(results), server_round=1, weighting="examples")
    assert torch.equal(got.update_sum, reference.update_sum)
    assert sorted(got.client_ids) == [0, 1, 2, 3]
    assert len(executor.stages) == 3  # share_keys, masked_input, unmask


def test_a_sampled_client_that_never_reports_dropped_at_advertise_keys():
    config, results, sessions = _setup()
    deployed = DeployedSecureAggregator(config)
    executor = _SetupWithTasks(sessions, silent={3})
    deployed.executor = executor  # type: ignore[assignment]
    executor.send_tasks(deployed, [0, 1, 2, 3])
    reporting = {c: r for c, r in results.items() if c != 3}
    got = deployed.aggregate(_placeholders(reporting), server_round=1, weighting="examples")
    expected = sum((10 + c) * results[c].update.double() for c in range(3))
    assert sorted(got.client_ids) == [0, 1, 2]
    assert torch.allclose(got.update_sum.double(), expected, atol=1e-4)
    assert deployed.last_report is not None
    assert deployed.last_report.dropped[3].startswith("advertise_keys")
    # the SETUP serves one run: the next aggregate of that round exchanges all four stages
    assert deployed.prepared_server(1, [0, 1, 2]) is None


def test_a_reply_with_vectors_under_secure_aggregation_is_refused():
    result = ClientResult(client_id=1, update=torch.zeros(N), num_examples=1, num_steps=1)
    with pytest.raises(ProtocolError, match="in the clear"):
        decode_result(encode_result(result), client_id=1, num_params=N, with_vectors=False)


def test_stage_for_another_round_is_refused():
    config, results, sessions = _setup()
    content = RecordDict({"confide.stage": ConfigRecord({
        "secagg": bytes(16), "client_id": 0, "stage": "secagg", "server_round": 2})})
    with pytest.raises(ProtocolError, match="round 2"):
        handle_secagg_stage(content, sessions[0])


def test_payload_must_be_bytes():
    for bad in (RecordDict({"confide.stage": ConfigRecord({"secagg": "text"})}),
                RecordDict({"confide.stage": ConfigRecord({"secagg": [b"a"]})}),
                RecordDict({"confide.stage": ConfigRecord({"client_id": 0})}),
                RecordDict({"confide.secagg": ConfigRecord({"secagg": b"abc"})})):
        with pytest.raises(ProtocolError):
            unpack(bad, "reply")
    assert unpack(pack(b"abc"), "reply") == b"abc"
    assert np.frombuffer(unpack(pack(bytes(range(256))), "x"), np.uint8).tolist() == list(
        range(256))

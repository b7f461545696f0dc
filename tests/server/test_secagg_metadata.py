"""Under secure aggregation the coordinator receives no client's count, steps or loss.

A real round: the Coordinator with the GridExecutor and the DeployedSecureAggregator,
whose Grid hands each message to a real ClientApp (TaskRunner on a digits partition) in
process, as a SuperLink and SuperNode would. Every message the coordinator pulls is
recorded; none carries a per-client example count, step count or training loss, and the
history's loss is the example-weighted mean that only the secure sum revealed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from deploy_testing import LoopbackGrid, write_partitions
from flwr.app import RecordDict

from confide.app.client_app import TaskRunner, build_client_app
from confide.app.job import build_job
from confide.client.data import LocalDataFile
from confide.client.messages import JobSpec
from confide.config import dump_config, load_config
from confide.server.coordinator import Coordinator
from confide.server.flower_app import GridExecutor, NodeDirectory
from confide.server.secagg_transport import DeployedSecureAggregator

N = 3
JOB = """
[run]
seed = 0
rounds = 2
[data]
dataset = "digits"
num_clients = 3
partition = "dirichlet"
alpha = 0.5
[client]
epochs = 1
device = "cpu"
[secure_aggregation]
enabled = true
threshold = 2
"""


class Nodes(NodeDirectory):
    def node_of(self, client_id):  # noqa: D102
        return 100 + client_id

    def all_nodes(self):  # noqa: D102
        return [100 + c for c in range(N)]


def _flatten(records: RecordDict) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, rec in records.config_records.items():
        out.update({f"{name}.{k}": v for k, v in rec.items()})
    return out


@pytest.fixture
def task_identity():
    """Flower's Message reads the run from its TaskIdentity (set by a real run's task)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = {k: v for k, v in vars(TaskIdentity).items() if k.startswith("_") and
             k.endswith("_id")}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    for k, v in saved.items():
        setattr(TaskIdentity, k, v)


def test_the_coordinator_receives_only_sums_of_counts_steps_and_loss(tmp_path, task_identity):
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB)
    config = load_config(job_file)
    parts = write_partitions(job_file, tmp_path)
    runners = {100 + i: TaskRunner(LocalDataFile(p)) for i, p in enumerate(parts)}
    apps = {n: build_client_app(r, identity=lambda _c: {}) for n, r in runners.items()}
    grid = LoopbackGrid(apps)
    built = build_job(config, input_shape=(64,), num_classes=10, num_clients=N,
                      dataset_size=0)
    job = JobSpec(config_toml=dump_config(config), input_shape=(64,), num_classes=10,
                  num_params=built.dim, num_clients=N)
    executor = GridExecutor(grid=grid, nodes=Nodes(), job=job, vectors_in_replies=False)
    aggregator = DeployedSecureAggregator(config)
    aggregator.executor = executor
    coordinator = Coordinator(config=config, strategy=built.strategy, executor=executor,
                              aggregator=aggregator, privacy=built.privacy,
                              params=built.params, num_clients=N, client_sizes=[0] * N)
    history = coordinator.run()
    assert [r["num_clients"] for r in history] == [N, N]

    # What each client really had (it never left the client): distinct counts and losses.
    truth = [runners[100 + c].session(c).last_result for c in range(N)]
    counts = [r.num_examples for r in truth]
    losses = [r.metrics["train_loss"] for r in truth]
    assert len(set(counts)) == N
    for message in grid.pulled:
        if message.has_error():
            continue
        values = _flatten(message.content)
        assert not any(".metric." in k or "loss" in k for k in values), values
        for key in ("confide.result.num_examples", "confide.result.num_steps"):
            assert values.get(key, 0) == 0, values
        if "confide.result.client_id" in values:  # a train reply: no vectors either
            assert not message.content.array_records["confide.result_tensors"]
        numbers = [v for v in values.values() if isinstance(v, int | float)
                   and not isinstance(v, bool)]
        for secret in [*counts, *losses]:
            assert all(v != secret for v in numbers if v not in (0, 1, 2) or secret > 2)

    # The record holds the aggregate: the example-weighted mean loss, from the secure sum.
    report = aggregator.last_report
    assert report is not None and report.metadata["num_examples"] == sum(counts)
    assert report.metadata["num_steps"] == sum(r.num_steps for r in truth)
    mean = float(np.dot(counts, losses) / sum(counts))
    assert history[-1]["train_loss"] == pytest.approx(mean, abs=1e-3)
    # and no row of the coordinator's batch holds any one client's value
    assert torch.is_tensor(coordinator.params)

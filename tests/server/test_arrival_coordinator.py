"""FedBuff over a Grid (deployment's schedule): real ClientApps in process, tasks sent as
clients free up, compressed replies, and the history's bytes equal to the messages' own.

The Grid hands each message to a real ClientApp (TaskRunner on a digits partition) at once,
as a SuperLink and SuperNode would; its replies wait to be pulled. The end-to-end form, with
processes, TLS and a socket-level count, is ``tests/e2e/test_deployed_bytes.py``.
"""

from __future__ import annotations

import pytest
import torch
from deploy_testing import LoopbackGrid, write_partitions

from confide.app.client_app import TaskRunner, build_client_app
from confide.app.job import build_job
from confide.client.compression import RESIDUAL_KEY
from confide.client.data import LocalDataFile
from confide.client.messages import TRAIN, JobSpec
from confide.compression import UpdateCodec
from confide.config import dump_config, load_config
from confide.exceptions import ConfigError
from confide.round import PlainAggregator
from confide.server.buffered import ArrivalCoordinator
from confide.server.flower_app import GridExecutor, NodeDirectory, message_bytes

N, K, ROUNDS = 3, 2, 4
JOB = """
[run]
seed = 0
rounds = 4
[data]
dataset = "digits"
num_clients = 3
partition = "iid"
[client]
epochs = 1
device = "cpu"
[strategy]
name = "fedbuff"
buffer_size = 2
[simulation]
concurrency = 3
[compression]
method = "randk"
ratio = 0.1
"""


class Nodes(NodeDirectory):
    def node_of(self, client_id):  # noqa: D102
        return 100 + client_id

    def all_nodes(self):  # noqa: D102
        return [100 + c for c in range(N)]


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


def _federation(tmp_path):  # type: ignore[no-untyped-def]
    job_file = tmp_path / "job.toml"
    job_file.write_text(JOB)
    config = load_config(job_file)
    parts = write_partitions(job_file, tmp_path)
    runners = {100 + i: TaskRunner(LocalDataFile(p)) for i, p in enumerate(parts)}
    grid = LoopbackGrid({n: build_client_app(r, identity=lambda _c: {})
                         for n, r in runners.items()})
    built = build_job(config, input_shape=(64,), num_classes=10, num_clients=N,
                      dataset_size=0)
    job = JobSpec(config_toml=dump_config(config), input_shape=(64,), num_classes=10,
                  num_params=built.dim, num_clients=N)
    executor = GridExecutor(grid=grid, nodes=Nodes(), job=job,
                            codec=UpdateCodec.from_config(config))
    coordinator = ArrivalCoordinator(
        config=config, strategy=built.strategy, executor=executor,
        aggregator=PlainAggregator(), privacy=built.privacy, params=built.params,
        num_clients=N, client_sizes=[0] * N, concurrency=3)
    return coordinator, grid, runners, built.dim


def test_fedbuff_over_the_grid_sends_work_as_clients_free_up(tmp_path, task_identity):
    coordinator, grid, runners, dim = _federation(tmp_path)
    history = coordinator.run()
    assert [r["num_clients"] for r in history] == [K] * ROUNDS
    # all three start at once; the one left out of a buffer is one server update stale
    assert history[0]["mean_staleness"] == 0 and any(r["mean_staleness"] > 0
                                                     for r in history)
    tasks = [m for m in grid.pushed if m.metadata.message_type == TRAIN]
    assert len(tasks) == K * ROUNDS  # no task that no buffer would use

    # the replies carry random-k's values, not the dense update nor the residual
    codec = UpdateCodec.from_config(coordinator.config)
    for reply in grid.pulled:
        arrays = reply.content.array_records["confide.result_tensors"]
        assert set(arrays) == {"payload.values"}
        assert tuple(arrays["payload.values"].shape) == (1, codec.kept(dim))
    # error feedback's residual stayed on each client, and was used again
    assert not any(RESIDUAL_KEY in s for s in coordinator.client_states.values())
    kept = [runners[100 + c].session(c).scratch.get(RESIDUAL_KEY) for c in range(N)]
    assert all(r is not None and r.shape == (dim,) and bool(r.abs().sum() > 0) for r in kept)

    # the history's bytes are exactly the messages' records, both ways
    assert sum(r["bytes_up"] for r in history) == sum(message_bytes(m) for m in grid.pulled)
    assert sum(r["bytes_down"] for r in history) == sum(message_bytes(m) for m in grid.pushed
                                                        if m.metadata.message_type == TRAIN)
    up = sum(r["bytes_up"] for r in history) / len(grid.pulled)
    assert up < 0.2 * 4 * dim  # a tenth of the coordinates, plus the envelope's records


def test_arrivals_need_an_executor_that_does_not_wait(tmp_path, task_identity):
    from confide.app.simulate import build_simulation

    sim = build_simulation(load_config(None, ["strategy.name='fedbuff'", "strategy.buffer_size=2",
                                              "data.num_clients=4", "client.device='cpu'"]))
    c = sim.coordinator
    with pytest.raises(ConfigError, match="without waiting"):
        ArrivalCoordinator(config=c.config, strategy=c.strategy, executor=c.executor,
                           aggregator=c.aggregator, privacy=c.privacy, params=c.params,
                           num_clients=c.num_clients, client_sizes=c.client_sizes)
    assert torch.is_tensor(c.params)

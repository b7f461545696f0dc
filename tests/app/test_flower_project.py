"""The Flower App's run config and node config (no Flower processes; see tests/e2e)."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from confide.app import flower_project
from confide.app.flower_project import job_config
from confide.exceptions import ConfigError


def context(node_config: dict, run_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config=run_config)


def test_run_config_keys_are_confide_keys_over_the_config_file(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('[run]\nrounds = 7\nseed = 5\n[strategy]\nname = "fedprox"\nmu = 0.5\n')
    config = job_config({"config-file": str(job), "run.rounds": 2, "data.partition": "iid",
                         "client.device": "cpu", "output-dir": "ignored",
                         "nodes-timeout-s": 3.0})
    assert config.run.rounds == 2 and config.run.seed == 5  # run config over the file
    assert config.strategy.name == "fedprox" and config.strategy.options["mu"] == 0.5
    assert config.data.partition == "iid"


def test_a_bad_run_config_key_is_one_line():
    with pytest.raises(ConfigError) as exc:
        job_config({"run.round": 2})
    assert "run.round" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("node_config", "needle"), [
    ({}, "partition-id=<i> num-partitions=<n>"),
    ({"partition-id": 0, "num-partitions": 3}, "num-partitions = 3 in the node config but the "
                                               "job has data.num_clients = 4"),
    ({"partition-id": 4, "num-partitions": 4}, "partition-id = 4 is out of range 0..3"),
])
def test_a_supernode_without_a_matching_partition_is_refused(node_config, needle):
    ctx = context(node_config, {"data.num_clients": 4, "client.device": "cpu"})
    with pytest.raises(ConfigError, match=needle):
        flower_project._runner(ctx)  # noqa: SLF001


def test_a_supernode_trains_on_its_own_partition_only():
    from confide.app.simulate import load_partitioned
    from confide.config import load_config
    from confide.exceptions import DataError

    run_config = {"data.num_clients": 4, "client.device": "cpu", "run.seed": 2}
    runner = flower_project._runner(context({"partition-id": 1, "num-partitions": 4},  # noqa: SLF001
                                            run_config))
    _, data, parts, _ = load_partitioned(load_config(None, ["data.num_clients=4", "run.seed=2"]))
    x, y = runner.source.arrays(client_id=1)
    assert (y == data.y_train[parts[1]]).all() and len(x) == len(parts[1])
    with pytest.raises(DataError, match="holds partition 1, not 2"):
        runner.source.arrays(client_id=2)

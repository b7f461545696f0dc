"""Confide as a Flower App: ``server_app`` and ``client_app`` for ``flwr run``.

A Flower project names them in its ``pyproject.toml`` and carries the Confide job in its run
config, the same ``section.key`` names as ``confide simulate --set``::

    [tool.flwr.app.components]
    serverapp = "confide.app.flower_project:server_app"
    clientapp = "confide.app.flower_project:client_app"

    [tool.flwr.app.config]
    "run.rounds" = 5
    "data.num_clients" = 4
    "output-dir" = "runs/flower"      # optional: where the ServerApp writes the run folder

Besides Confide's keys, ``config-file`` names a Confide TOML file read first (the run
config's keys override it), ``output-dir`` the run folder and ``nodes-timeout-s`` how long
the ServerApp waits for every SuperNode to answer.

Each SuperNode is one Confide client: its node config gives ``partition-id`` (the client
id) and ``num-partitions`` (must equal ``data.num_clients``). It loads the job's dataset and
partitions it with the job's seed exactly as ``confide simulate`` does
(:func:`confide.app.simulate.load_partitioned`), and trains on its own partition only. The
ServerApp builds the same job (:func:`confide.app.job.build_job`) and runs the same
:class:`~confide.server.coordinator.Coordinator` over Flower's ``Grid``
(:class:`~confide.server.flower_app.GridExecutor`), so a run gives the result of
``confide simulate`` with the sequential executor and the same seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context
from flwr.serverapp import Grid

from confide.app.client_app import TaskRunner, build_client_app
from confide.app.job import build_job
from confide.client.data import ClientDataSource
from confide.client.messages import JobSpec
from confide.config import Config, dump_config, load_config
from confide.exceptions import ConfigError, DataError, RoundFailedError
from confide.server.flower_app import NodeDirectory, build_server_app, discover_nodes

__all__ = ["server_app", "client_app", "job_config", "APP_KEYS"]

log = logging.getLogger("confide")

#: run-config keys of the Flower App itself (all others are Confide's ``section.key``)
APP_KEYS = ("config-file", "output-dir", "nodes-timeout-s")


def _toml_literal(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


def job_config(run_config: Mapping[str, Any]) -> Config:
    """The Confide job of a Flower run config (``config-file``, then the ``section.key``s)."""
    path = run_config.get("config-file") or None
    overrides = [f"{key}={_toml_literal(value)}" for key, value in run_config.items()
                 if key not in APP_KEYS]
    return load_config(str(path) if path is not None else None, overrides)


class _OwnPartition(ClientDataSource):
    """One SuperNode's partition; a task for any other client is refused."""

    def __init__(self, x: np.ndarray, y: np.ndarray, client_id: int) -> None:
        self.x, self.y, self.client_id = x, y, client_id

    def arrays(self, *, client_id: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        if client_id != self.client_id:
            raise DataError(f"this SuperNode holds partition {self.client_id}, not {client_id}")
        return self.x, self.y

    def describe(self) -> str:  # noqa: D102
        return f"partition {self.client_id}"


def _node_partition(context: Context) -> tuple[int, int]:
    try:
        pid = int(context.node_config["partition-id"])
        count = int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ConfigError("a Confide SuperNode needs --node-config 'partition-id=<i> "
                          "num-partitions=<n>'") from None
    return pid, count


_RUNNERS: dict[str, TaskRunner] = {}
_LOCK = threading.Lock()


def _runner(context: Context) -> TaskRunner:
    """The runner of this node, built once per run config and partition in a process."""
    pid, count = _node_partition(context)
    key = hashlib.sha256(json.dumps([sorted(context.run_config.items()), pid, count],
                                    default=str).encode()).hexdigest()
    with _LOCK:
        runner = _RUNNERS.get(key)
        if runner is None:
            from confide.app.simulate import load_partitioned

            cfg, data, parts, _ = load_partitioned(job_config(context.run_config))
            if count != len(parts):
                raise ConfigError(f"num-partitions = {count} in the node config but the job "
                                  f"has data.num_clients = {len(parts)}")
            if not 0 <= pid < len(parts):
                raise ConfigError(f"partition-id = {pid} is out of range 0..{len(parts) - 1}")
            idx = parts[pid]
            source = _OwnPartition(data.x_train[idx], data.y_train[idx], pid)
            # The node trusts its own run config's model only; DP noise seeds stay secret to
            # the client, as in deployment (confide.privacy.dpsgd, "Randomness").
            runner = TaskRunner(source, device=cfg.client.device,
                                allowed_model_factories=(cfg.model.name,))
            _RUNNERS.clear()
            _RUNNERS[key] = runner
        return runner


def _identity(context: Context) -> dict[str, Any]:
    return {"partition": _node_partition(context)[0]}


class _Partitions(NodeDirectory):
    """Client id = the SuperNode's ``partition-id``, learnt from a hello query."""

    def __init__(self, mapping: dict[int, int]) -> None:
        self.mapping = mapping

    def node_of(self, client_id: int) -> int | str:  # noqa: D102
        return self.mapping.get(client_id, f"no SuperNode serves partition {client_id}")

    def all_nodes(self) -> list[int]:  # noqa: D102
        return sorted(self.mapping.values())


def _server_main(grid: Grid, context: Context) -> None:
    """The ServerApp: the job's coordinator over the Grid; writes the run folder."""
    from confide.app.deploy import check_deployable
    from confide.app.simulate import build_aggregator, load_partitioned, new_run_dir
    from confide.client.trainer import evaluate_model
    from confide.files import atomic_write_text
    from confide.parameters import set_flat_params
    from confide.server.coordinator import Coordinator
    from confide.server.flower_app import GridExecutor
    from confide.simulations.partition import partition_report

    run_config = dict(context.run_config)
    cfg, data, parts, _ = load_partitioned(job_config(run_config))
    check_deployable(cfg)
    n = len(parts)
    job = build_job(cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                    num_clients=n, dataset_size=len(data.y_train))
    if cfg.privacy.mode == "central":
        import secrets

        from confide.privacy.central import CentralDP

        if isinstance(job.privacy, CentralDP):
            # As in `confide server start`: a noise seed from run.seed could be subtracted by
            # anyone who knows the job; it comes from the OS CSPRNG and is never stored
            # (confide.privacy.mechanisms, "Randomness").
            job.privacy.seed = secrets.randbits(63)
    out = run_config.get("output-dir")
    run_dir = Path(str(out)) if out else new_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"output-dir {str(run_dir)!r} already holds files")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dump_config(cfg))

    timeout = float(run_config.get("nodes-timeout-s", 120.0))
    found = discover_nodes(grid, expected=n, timeout=timeout)
    mapping = {int(ident["partition"]): node for node, ident in found.items()}  # type: ignore[call-overload]
    if len(mapping) < n:
        raise RoundFailedError(f"only {len(mapping)} of {n} SuperNodes answered within "
                               f"{timeout:g} s (one per partition-id 0..{n - 1})")
    spec = JobSpec(config_toml=dump_config(cfg), input_shape=data.input_shape,
                   num_classes=data.num_classes, num_params=job.dim, num_clients=n,
                   dataset_size=len(data.y_train))
    secure = cfg.secure_aggregation.enabled
    executor = GridExecutor(grid=grid, nodes=_Partitions(mapping), job=spec,
                            aux_names=job.strategy.aux_names,
                            round_timeout=cfg.cohort.train_timeout_s or 600.0,
                            vectors_in_replies=not secure)
    if secure:
        from confide.server.secagg_transport import DeployedSecureAggregator

        aggregator: Any = DeployedSecureAggregator(cfg)
        aggregator.executor = executor
    else:
        aggregator = build_aggregator(cfg)
    x_dtype = torch.get_default_dtype() if data.x_test.dtype.kind == "f" else torch.long
    x_test = torch.as_tensor(data.x_test, dtype=x_dtype)
    y_test = torch.as_tensor(data.y_test)
    model = job.model_factory()

    def evaluator(flat: torch.Tensor) -> dict[str, float]:
        set_flat_params(model, flat)
        return evaluate_model(model, x_test, y_test)

    coordinator = Coordinator(config=cfg, strategy=job.strategy, executor=executor,
                              aggregator=aggregator, privacy=job.privacy, params=job.params,
                              num_clients=n, client_sizes=partition_report(
                                  parts, data.y_train, data.num_classes).sizes,
                              evaluator=evaluator, run_dir=run_dir)
    coordinator.run()
    set_flat_params(model, coordinator.params)
    tmp = run_dir / ".model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(run_dir / "model.pt")
    executor.finish()
    log.info("Confide Flower App: %d rounds done, run folder %s", cfg.run.rounds, run_dir)


#: the Flower ServerApp (``[tool.flwr.app.components] serverapp``)
server_app = build_server_app(_server_main)
#: the Flower ClientApp (``[tool.flwr.app.components] clientapp``)
client_app = build_client_app(_runner, identity=_identity)

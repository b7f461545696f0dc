"""``simulation.executor = "flower"``: the deployment ServerApp/ClientApp on Flower's engine.

The coordinator's loop stays in the caller's thread; Flower's simulation runtime
(``flwr.simulation.run_simulation`` with the Ray backend) runs in a background thread with a
ServerApp whose only job is to hand its ``Grid`` to a :class:`GridExecutor`. Every round's
tasks then travel as Flower Messages to virtual SuperNodes, where Ray actors run Confide's
ClientApp on the client's partition, exactly as deployed clients do on their own files.

The partitions are written once to an ``.npz`` in a private temporary folder (with the Ray
session and ``FLWR_HOME``, so nothing lands in ``$HOME``); each actor loads it once.
Same seed, same result as ``sequential``.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from confide.app.client_app import TaskRunner, build_client_app
from confide.client import ClientTask
from confide.client.data import PartitionedData
from confide.client.messages import JobSpec
from confide.compression import UpdateCodec
from confide.config import dump_config
from confide.exceptions import ConfigError, RoundFailedError
from confide.parameters import num_params
from confide.round import CohortOutcome
from confide.server.flower_app import NodeDirectory
from confide.simulations.executors import (
    SimulationContext,
    SimulationExecutor,
    register_executor,
)

__all__ = ["FlowerSimulationExecutor"]

log = logging.getLogger("confide")

_RUNNERS: dict[str, TaskRunner] = {}
_RUNNERS_LOCK = threading.Lock()


class _RunnerHandle:
    """Pickled with every message: finds (or builds) the runner cached in this process."""

    def __init__(self, data_path: str, device: str) -> None:
        self.data_path, self.device = data_path, device

    def __call__(self, _context: Any = None) -> TaskRunner:
        with _RUNNERS_LOCK:
            runner = _RUNNERS.get(self.data_path)
            if runner is None:
                with np.load(self.data_path, allow_pickle=False) as npz:
                    n = int(npz["num_partitions"])
                    source = PartitionedData(npz["x"], npz["y"],
                                             [npz[f"p{i}"] for i in range(n)])
                runner = TaskRunner(source, device=self.device, allowed_model_factories=None,
                                    secret_noise_seeds=False,
                                    local_secure_aggregation=False,
                                    local_client_state=False)
                _RUNNERS[self.data_path] = runner
            return runner


def _identity(context: Any) -> dict[str, Any]:
    return {"partition": int(context.node_config["partition-id"])}


class _PartitionDirectory(NodeDirectory):
    """Client id = Flower partition id, discovered by a hello query."""

    def __init__(self, mapping: dict[int, int]) -> None:
        self.mapping = mapping

    def node_of(self, client_id: int) -> int | str:  # noqa: D102
        return self.mapping.get(client_id, "no virtual node serves this client")

    def all_nodes(self) -> list[int]:  # noqa: D102
        return sorted(self.mapping.values())


class FlowerSimulationExecutor(SimulationExecutor):
    """Runs the cohort through Flower's simulation engine (Ray backend)."""

    name = "flower"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        if _missing("ray"):
            raise ConfigError("simulation.executor = 'flower' needs Ray; install "
                              "'confide[flower]' (it pulls flwr[simulation])")
        self._tmp: Path | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._grid_queue: queue.Queue[Any] = queue.Queue()
        self._errors: queue.Queue[BaseException] = queue.Queue()
        self._executor: Any = None
        self._flwr_level: int | None = None

    # ------------------------------------------------------------------ start-up
    def _job(self) -> JobSpec:
        ctx = self.context
        model = ctx.model_factory()
        sample = ctx.x_train[:1].detach().cpu().to(torch.get_default_dtype())
        with torch.no_grad():
            num_classes = int(model.to("cpu")(sample).shape[-1])
        return JobSpec(config_toml=dump_config(ctx.config), input_shape=tuple(sample.shape[1:]),
                       num_classes=num_classes, num_params=num_params(model),
                       num_clients=len(ctx.partitions),
                       dataset_size=int(sum(len(p) for p in ctx.partitions)))

    def _start(self) -> None:
        from flwr.simulation import run_simulation

        from confide.server.flower_app import GridExecutor, build_server_app, discover_nodes

        ctx = self.context
        self._tmp = Path(tempfile.mkdtemp(prefix="confide-flwr-"))
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        os.environ["FLWR_HOME"] = str(self._tmp / "flwr")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        data_path = self._tmp / "partitions.npz"
        arrays: dict[str, Any] = {f"p{i}": np.asarray(p, dtype=np.int64)
                                  for i, p in enumerate(ctx.partitions)}
        arrays.update(x=ctx.x_train.detach().cpu().numpy(), y=ctx.y_train.detach().cpu().numpy(),
                      num_partitions=np.int64(len(ctx.partitions)))
        np.savez(data_path, **arrays)
        client_app = build_client_app(_RunnerHandle(str(data_path), str(ctx.device)),
                                      identity=_identity)
        grids = self._grid_queue
        stop = self._stop

        def main(grid: Any, _context: Any) -> None:
            grids.put(grid)
            stop.wait()

        cpus = max(1, os.cpu_count() or 1)
        gpus = 1.0 / cpus if ctx.device.type == "cuda" else 0.0
        backend: Any = {"init_args": {"num_cpus": cpus, "_temp_dir": str(self._tmp / "ray"),
                                 "include_dashboard": False, "log_to_driver": False,
                                 "logging_level": "error"},
                   "client_resources": {"num_cpus": 1, "num_gpus": gpus}}
        errors = self._errors

        def run() -> None:
            try:
                run_simulation(server_app=build_server_app(main), client_app=client_app,
                               num_supernodes=len(ctx.partitions), backend_config=backend)
            except BaseException as exc:  # noqa: BLE001 - surfaced by run_clients
                errors.put(exc)
                grids.put(None)

        # Flower logs every message at INFO (and a deprecation notice for run_simulation);
        # Confide reports rounds itself.
        self._flwr_level = logging.getLogger("flwr").level
        logging.getLogger("flwr").setLevel(logging.ERROR)
        self._thread = threading.Thread(target=run, name="confide-flower-sim", daemon=True)
        self._thread.start()
        grid = self._grid_queue.get(timeout=600)
        if grid is None:
            raise RoundFailedError(f"Flower's simulation engine failed to start: "
                                   f"{self._errors.get()}")
        found = discover_nodes(grid, expected=len(ctx.partitions), timeout=300)
        mapping = {int(ident["partition"]): node for node, ident in found.items()}  # type: ignore[call-overload]
        if len(mapping) != len(ctx.partitions):
            raise RoundFailedError(f"only {len(mapping)} of {len(ctx.partitions)} virtual "
                                   "Flower nodes answered")
        self._executor = GridExecutor(grid=grid, nodes=_PartitionDirectory(mapping),
                                      job=self._job(), aux_names=ctx.strategy.aux_names,
                                      poll_interval=0.01,
                                      codec=UpdateCodec.from_config(ctx.config))

    # ------------------------------------------------------------------ executor API
    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        if self._executor is None:
            self._start()
        if not self._errors.empty():
            raise RoundFailedError(f"Flower's simulation engine stopped: {self._errors.get()}")
        outcome = self._executor.run_cohort(tasks)
        # Flower's messages arrive on the host; the coordinator keeps the model on ctx.device
        # (a GPU when the virtual clients train there).
        return CohortOutcome(outcome.batch.to(self.context.device), outcome.failures,
                             outcome.reduced)

    def close(self) -> None:  # noqa: D102
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
            self._thread = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        if self._flwr_level is not None:
            logging.getLogger("flwr").setLevel(self._flwr_level)
            self._flwr_level = None


def _missing(name: str) -> bool:
    """Whether the package ``name`` cannot be imported."""
    import importlib.util

    return importlib.util.find_spec(name) is None


register_executor("flower", FlowerSimulationExecutor)

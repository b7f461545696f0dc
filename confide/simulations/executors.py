"""Executors run the sampled clients' local training in a simulation.

``sequential`` trains one client at a time on one device (any model). Other executors
(``vectorized``, ``flower``) register here with :func:`register_executor`; all of them run the
same client logic (:func:`confide.client.run_client_task` or an exact vectorised equivalent).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from confide.client import ClientPipeline, ClientTask, LocalTrainer, run_client_task
from confide.exceptions import ClientDropped, ConfigError
from confide.round import ClientResult, CohortOutcome, Executor, ResultBatch
from confide.strategies.base import Strategy

if TYPE_CHECKING:
    from confide.privacy.base import RoundPrivacy

__all__ = [
    "SimulationContext",
    "Executor",
    "SimulationExecutor",
    "SequentialExecutor",
    "register_executor",
    "build_executor",
    "available_executors",
]


@dataclass
class SimulationContext:
    """Everything an executor needs: data on the device, partitions, the model and strategy."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    partitions: list[np.ndarray]
    model_factory: Callable[[], nn.Module]
    strategy: Strategy
    pipeline: ClientPipeline
    device: torch.device
    #: builds the local trainer (the privacy layer swaps in a DP-SGD trainer)
    trainer_factory: Callable[[nn.Module, torch.device], LocalTrainer] = LocalTrainer
    #: the run's config (executors that need more than the above read it here)
    config: Any = None
    #: the run's privacy layer (an executor asks it, not a trainer's class, about DP-SGD)
    privacy: RoundPrivacy | None = None
    #: length of the flat parameter vector (the job builder's layout)
    dim: int = 0
    #: in-round progress (confide.progress.RoundProgress); None: no reports
    progress: Any = None

    def client_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training tensors of one client (on the device)."""
        idx = torch.as_tensor(self.partitions[client_id], device=self.x_train.device)
        return self.x_train[idx], self.y_train[idx]


class SimulationExecutor(Executor):
    """An in-process executor over a :class:`SimulationContext`."""

    def __init__(self, context: SimulationContext) -> None:
        self.context = context

    @property
    def device(self) -> torch.device:
        """Where the cohort is trained (the coordinator keeps the global model there)."""
        return self.context.device


class SequentialExecutor(SimulationExecutor):
    """One client at a time, in process, on one device."""

    name = "sequential"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        self.trainer = context.trainer_factory(context.model_factory(), context.device)

    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        results: list[ClientResult] = []
        failures: dict[int, str] = {}
        progress = self.context.progress
        if progress is not None and tasks:
            progress.start_round(tasks[0].server_round, len(tasks))
            self.trainer.on_epoch = progress.epoch
        for done, task in enumerate(tasks, start=1):
            x, y = self.context.client_data(task.client_id)
            try:
                results.append(run_client_task(task, self.trainer, x, y, self.context.strategy,
                                               self.context.pipeline))
            except ClientDropped as exc:
                failures[task.client_id] = str(exc)
            finally:
                if progress is not None:
                    progress.client_done()
            self._report_progress(done, len(tasks))
        batch = ResultBatch.from_results(results, dim=self.context.dim,
                                         device=self.context.device)
        return CohortOutcome(batch, failures)


_EXECUTORS: dict[str, Callable[[SimulationContext], Executor]] = {}


def register_executor(name: str, factory: Callable[[SimulationContext], Executor]) -> None:
    """Register an executor factory under ``name``; a duplicate name is an error."""
    if name in _EXECUTORS:
        raise ConfigError(f"executor {name!r} is already registered")
    _EXECUTORS[name] = factory


def available_executors() -> list[str]:
    """Registered executor names."""
    return sorted(_EXECUTORS)


#: executors that live in their own modules, imported on first use
#: (``flower`` registers itself from the top floor: confide.app.flower_sim)
_LAZY = {"vectorized": "confide.simulations.vectorized"}


def build_executor(name: str, context: SimulationContext) -> Executor:
    """Build the executor ``name`` for ``context``."""
    if name not in _EXECUTORS and name in _LAZY:
        import importlib

        try:
            importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as exc:
            if exc.name == _LAZY[name]:
                raise ConfigError(f"simulation.executor = {name!r} is not available in this "
                                  "build") from None
            raise ConfigError(f"simulation.executor = {name!r} needs the missing package "
                              f"{exc.name!r}") from None
    if name not in _EXECUTORS:
        raise ConfigError(
            f"simulation.executor = {name!r} is not available; choose one of: "
            + ", ".join(available_executors())
        )
    return _EXECUTORS[name](context)


register_executor("sequential", SequentialExecutor)

"""Executors run the sampled clients' local training in a simulation.

``sequential`` trains one client at a time on one device (any model). Other executors
(``vectorized``, ``flower``) register here with :func:`register_executor`; all of them run the
same client logic (:func:`confide.client.run_client_task` or an exact vectorised equivalent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from confide.client import ClientPipeline, ClientResult, ClientTask, LocalTrainer, run_client_task
from confide.exceptions import ClientDropped, ConfigError
from confide.strategies.base import Strategy

__all__ = [
    "SimulationContext",
    "ClientOutcome",
    "Executor",
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
    #: in-round progress (confide.progress.RoundProgress); None: no reports
    progress: Any = None

    def client_data(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training tensors of one client (on the device)."""
        idx = torch.as_tensor(self.partitions[client_id], device=self.x_train.device)
        return self.x_train[idx], self.y_train[idx]


@dataclass
class ClientOutcome:
    """A client's result, or why it has none (it dropped out)."""

    client_id: int
    result: ClientResult | None = None
    failure: str | None = None


class Executor(ABC):
    """Runs a cohort's client tasks and returns one outcome per task."""

    name: str = "base"

    def __init__(self, context: SimulationContext) -> None:
        self.context = context

    @abstractmethod
    def run_clients(self, tasks: Sequence[ClientTask]) -> list[ClientOutcome]:
        """Train every task's client; a dropped client yields an outcome with ``failure``."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release resources (processes, GPU memory)."""


class SequentialExecutor(Executor):
    """One client at a time, in process, on one device."""

    name = "sequential"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        self.trainer = context.trainer_factory(context.model_factory(), context.device)

    def run_clients(self, tasks: Sequence[ClientTask]) -> list[ClientOutcome]:  # noqa: D102
        outcomes = []
        progress = self.context.progress
        if progress is not None and tasks:
            progress.start_round(tasks[0].server_round, len(tasks))
            self.trainer.on_epoch = progress.epoch
        for task in tasks:
            x, y = self.context.client_data(task.client_id)
            try:
                result = run_client_task(task, self.trainer, x, y, self.context.strategy,
                                         self.context.pipeline)
            except ClientDropped as exc:
                outcomes.append(ClientOutcome(task.client_id, failure=str(exc)))
                continue
            finally:
                if progress is not None:
                    progress.client_done()
            outcomes.append(ClientOutcome(task.client_id, result=result))
        return outcomes


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
_LAZY = {"vectorized": "confide.simulations.vectorized", "flower": "confide.simulations.flower"}


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

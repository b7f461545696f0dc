"""Executors run the sampled clients' local training in a simulation.

``sequential`` trains one client at a time on one device (any model). Other executors
(``vectorized``, ``flower``) register here with :func:`register_executor`; all of them run the
same client logic (:func:`confide.client.run_client_task` or an exact vectorised equivalent).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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

    def close(self) -> None:
        """Release resources (processes, GPU memory)."""


class SequentialExecutor(Executor):
    """One client at a time, in process, on one device."""

    name = "sequential"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        self.trainer = LocalTrainer(context.model_factory(), context.device)

    def run_clients(self, tasks: Sequence[ClientTask]) -> list[ClientOutcome]:  # noqa: D102
        outcomes = []
        for task in tasks:
            x, y = self.context.client_data(task.client_id)
            try:
                result = run_client_task(task, self.trainer, x, y, self.context.strategy,
                                         self.context.pipeline)
            except ClientDropped as exc:
                outcomes.append(ClientOutcome(task.client_id, failure=str(exc)))
                continue
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


def build_executor(name: str, context: SimulationContext) -> Executor:
    """Build the executor ``name`` for ``context``."""
    if name not in _EXECUTORS:
        raise ConfigError(
            f"simulation.executor = {name!r} is not available; choose one of: "
            + ", ".join(available_executors())
        )
    return _EXECUTORS[name](context)


register_executor("sequential", SequentialExecutor)

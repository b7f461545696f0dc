"""One client's part of a round: train, apply the strategy's client rule, run the pipeline.

The same function serves the in-process simulation executors and the Flower ClientApp, so
simulation and deployment run identical client logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from confide.client.pipeline import ClientPipeline, StageContext
from confide.client.trainer import FitOutput, LocalTrainer, TrainSettings
from confide.strategies.base import RoundInstructions, Strategy

__all__ = ["ClientTask", "ClientResult", "run_client_task", "finish_client_task"]


@dataclass
class ClientTask:
    """What a sampled client receives for one round."""

    client_id: int
    server_round: int
    global_params: torch.Tensor
    instructions: RoundInstructions
    settings: TrainSettings
    seed: int
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: fault injection: leave the round after this many local steps
    drop_after_steps: int | None = None


@dataclass
class ClientResult:
    """What a client reports: its (pipeline-processed) update, weight and metrics."""

    client_id: int
    update: torch.Tensor
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def run_client_task(
    task: ClientTask,
    trainer: LocalTrainer,
    x: torch.Tensor,
    y: torch.Tensor,
    strategy: Strategy,
    pipeline: ClientPipeline,
) -> ClientResult:
    """Train locally on ``(x, y)`` and return the processed update."""
    rule = strategy.client_rule(task.instructions, task.client_state)
    out = trainer.fit(x, y, task.global_params, task.settings, rule=rule, seed=task.seed,
                      drop_after_steps=task.drop_after_steps)
    return finish_client_task(task, out, strategy, pipeline)


def finish_client_task(task: ClientTask, out: FitOutput, strategy: Strategy,
                       pipeline: ClientPipeline) -> ClientResult:
    """After local training: the strategy's client finalisation, then the update pipeline.

    Shared by :func:`run_client_task` and executors that train many clients at once.
    """
    aux, new_state = strategy.client_finalize(
        task.instructions, task.client_state, out.update,
        num_steps=out.num_steps, lr=task.settings.lr,
        momentum=task.settings.momentum if task.settings.optimizer == "sgd" else 0.0,
    )
    ctx = StageContext(server_round=task.server_round, client_id=task.client_id, seed=task.seed)
    update = pipeline(out.update, ctx)
    return ClientResult(
        client_id=task.client_id, update=update.detach().cpu(), num_examples=out.num_examples,
        num_steps=out.num_steps, metrics=out.metrics,
        aux={k: v.detach().cpu() for k, v in aux.items()},
        new_state={k: v.detach().cpu() for k, v in new_state.items()}, info=ctx.info,
    )

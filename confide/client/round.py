"""One client's part of a round: train, apply the strategy's client rule, run the pipeline.

The same function serves the in-process simulation executors and the Flower ClientApp, so
simulation and deployment run identical client logic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from confide.client.pipeline import ClientPipeline, StageContext
from confide.client.trainer import FitOutput, LocalTrainer
from confide.round import ClientResult, ClientTask, ResultBatch, column
from confide.strategies.aux_vectors import check_aux_values
from confide.strategies.base import Strategy

__all__ = ["ClientTask", "ClientResult", "run_client_task", "finish_client_task",
           "finish_cohort"]


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
    check_aux_values(strategy, aux, dim=int(out.update.numel()))
    ctx = StageContext(server_round=task.server_round, client_id=task.client_id, seed=task.seed,
                       state=task.client_state)
    update = pipeline(out.update, ctx)
    new_state = {**new_state, **ctx.new_state}  # a stage's state (compression's residual)
    return ClientResult(
        client_id=task.client_id, update=update.detach().cpu(), num_examples=out.num_examples,
        num_steps=out.num_steps, metrics=out.metrics,
        aux={k: v.detach().cpu() for k, v in aux.items()},
        new_state={k: v.detach().cpu() for k, v in new_state.items()}, info=ctx.info,
    )


def finish_cohort(tasks: Sequence[ClientTask], updates: torch.Tensor, *,
                  num_examples: Sequence[int], num_steps: Sequence[int],
                  metrics: Mapping[str, torch.Tensor], strategy: Strategy,
                  pipeline: ClientPipeline, info: Sequence[dict] | None = None) -> ResultBatch:
    """:func:`finish_client_task` for a whole cohort trained at once, as tensor operations.

    ``updates`` is ``[n, dim]`` on the training device, row ``i`` belonging to ``tasks[i]``
    (which share settings and instructions); the result batch stays on that device.
    """
    first = tasks[0]
    settings = first.settings
    momentum = settings.momentum if settings.optimizer == "sgd" else 0.0
    aux, new_state = strategy.client_finalize_batch(
        first.instructions, [t.client_state for t in tasks], updates,
        num_steps=list(num_steps), lr=settings.lr, momentum=momentum)
    if aux or strategy.aux_names:
        check_aux_values(strategy, aux, dim=int(updates.shape[1]), batched=True)
    if pipeline:
        contexts = [StageContext(server_round=t.server_round, client_id=t.client_id,
                                 seed=t.seed, info=dict(info[i]) if info else {},
                                 state=t.client_state) for i, t in enumerate(tasks)]
        processed = pipeline.apply_batch(updates, contexts)
        infos = [c.info for c in contexts]
        if contexts and contexts[0].new_state:  # a stage's state (compression's residual)
            new_state = {**new_state, **{k: torch.stack([c.new_state[k] for c in contexts])
                                         for k in contexts[0].new_state}}
    else:  # no stage: no per-client context to build
        processed = updates
        infos = [dict(i) for i in info] if info else [{} for _ in tasks]
    return ResultBatch(
        client_ids=[t.client_id for t in tasks], updates=processed.detach(),
        num_examples=column(num_examples, updates.device),
        num_steps=column(num_steps, updates.device),
        metrics={k: v.to(device=updates.device, dtype=torch.float64) for k, v in metrics.items()},
        aux={k: v.detach() for k, v in aux.items()},
        new_state={k: v.detach() for k, v in new_state.items()},
        info=infos,
    )

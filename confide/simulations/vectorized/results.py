"""From a trained chunk's rows to the cohort's :class:`~confide.round.ResultBatch`.

The rows stay on the training device: the strategy's batched client finalisation and the
client pipeline's batched stages run on them through :func:`confide.client.round.finish_cohort`
(the batched form of the function ``run_client_task`` uses), the metrics are ``[n]`` tensors
computed on the device, and DP-SGD's privacy events are host values known from the schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from confide.client.pipeline import ClientPipeline
from confide.client.round import finish_cohort
from confide.client.trainer import TrainSettings
from confide.privacy.base import SampleLevelDP
from confide.round import ClientTask, ResultBatch, column
from confide.simulations.vectorized.schedule import Job, dp_sgd_steps_per_epoch
from confide.strategies.base import Strategy

__all__ = ["finish_rows", "dp_sgd_event"]

# DPSGDPrivacy's info keys (confide.privacy.dpsgd.INFO_*; importing it would import opacus)
_INFO_NOISE, _INFO_RATE, _INFO_STEPS = "dp_noise_multiplier", "dp_sample_rate", "dp_steps"


def dp_sgd_event(job: Job, settings: TrainSettings, spec: SampleLevelDP) -> dict[str, Any]:
    """What ``DPSGDTrainer.fit`` reports once Opacus's accountant saw the client's steps:
    ``(z, q, steps)`` with Opacus's sample rate ``q = 1 / batches`` (DPSGDPrivacy's info row).
    """
    q = 1 / dp_sgd_steps_per_epoch(job.num_samples, settings)
    return {_INFO_NOISE: float(spec.noise_multiplier), _INFO_RATE: float(q),
            _INFO_STEPS: int(job.num_steps)}


def finish_rows(tasks: Sequence[ClientTask], jobs: Sequence[Job], updates: torch.Tensor,
                loss_sum: torch.Tensor, correct: torch.Tensor, *, settings: TrainSettings,
                strategy: Strategy, pipeline: ClientPipeline,
                dp_sgd: SampleLevelDP | None) -> ResultBatch:
    """The result batch of trained rows: row ``i`` is ``jobs[i]``'s client (``tasks[i]``).

    ``train_loss`` and ``train_accuracy`` are ``loss_sum / seen`` and ``correct / seen`` with
    ``seen = samples x epochs``, as ``LocalTrainer.fit`` reports them.
    """
    seen = column([max(1, j.num_samples * settings.epochs) for j in jobs], updates.device)
    metrics = {"train_loss": loss_sum.to(torch.float64) / seen,
               "train_accuracy": correct.to(torch.float64) / seen}
    info = [dp_sgd_event(j, settings, dp_sgd) for j in jobs] if dp_sgd is not None else None
    return finish_cohort(tasks, updates, num_examples=[j.num_samples for j in jobs],
                         num_steps=[j.num_steps for j in jobs], metrics=metrics,
                         strategy=strategy, pipeline=pipeline, info=info)

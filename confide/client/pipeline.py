"""The client's update pipeline (DESIGN.md, step 4), each stage optional, in this order:
DP-SGD during training -> clip the update -> distributed-DP encode -> quantise -> mask.

A stage is any callable ``(update, context) -> update``; privacy and secure aggregation add
theirs by wrapping, never by subclassing the trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StageContext", "UpdateStage", "ClientPipeline"]


@dataclass
class StageContext:
    """What a stage may read: the round, the client, its seed, and a scratch dict."""

    server_round: int
    client_id: int
    seed: int
    info: dict[str, Any] = field(default_factory=dict)


UpdateStage = Callable[[torch.Tensor, StageContext], torch.Tensor]


class ClientPipeline:
    """An ordered list of update stages applied to every client update."""

    def __init__(self, stages: Sequence[UpdateStage] = ()) -> None:
        self.stages = list(stages)

    def __call__(self, update: torch.Tensor, context: StageContext) -> torch.Tensor:
        """Run every stage in order."""
        for stage in self.stages:
            update = stage(update, context)
        return update

    def __bool__(self) -> bool:
        return bool(self.stages)

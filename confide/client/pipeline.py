"""The client's update pipeline (DESIGN.md, step 4), each stage optional, in this order:
DP-SGD during training -> clip the update -> distributed-DP encode -> quantise -> mask.

A stage is any callable ``(update, context) -> update``; privacy and secure aggregation add
theirs by wrapping, never by subclassing the trainer. A stage may also offer a batched form,
``stage.batch(updates [n, dim], contexts) -> updates``, that processes a whole cohort as tensor
operations on its device (the vectorized executor's path); without one, rows are processed one
by one with the per-client form, which gives the same result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StageContext", "UpdateStage", "ClientPipeline"]


@dataclass
class StageContext:
    """What a stage may read: the round, the client, its seed, and a scratch dict.

    ``state`` is the client's own state from earlier rounds (``ClientTask.client_state``);
    a stage that keeps per-client state (compression's error-feedback residual) writes the
    new value into ``new_state``, which is merged into the client's reported state.
    """

    server_round: int
    client_id: int
    seed: int
    info: dict[str, Any] = field(default_factory=dict)
    state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)


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

    def apply_batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]
                    ) -> torch.Tensor:
        """Run every stage on a batch of updates ``[n, dim]`` (one context per row)."""
        for stage in self.stages:
            batched = getattr(stage, "batch", None)
            if batched is not None:
                updates = batched(updates, contexts)
            else:
                updates = torch.stack([stage(u, c) for u, c in zip(updates, contexts,
                                                                  strict=True)])
        return updates

    def __bool__(self) -> bool:
        return bool(self.stages)

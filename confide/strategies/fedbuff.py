"""FedBuff: buffered asynchronous aggregation.

Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, Algorithm 1: clients train from whatever global
model is current when they start; the server adds each arriving update, weighted by its
staleness, to a buffer, and every ``K`` arrivals applies the buffer's mean with its server
optimizer (here SGD with optional momentum, as for FedAvgM) and clears it.

Staleness ``τ`` of an update is the number of server updates since its client started. The
weight is ``s(τ) = 1`` (``constant``), ``(1 + τ)^-a`` (``polynomial``; the paper's Sec. 5 uses
``a = 1/2``, after Xie et al., "Asynchronous Federated Optimization", 2019, Sec. 5.2) or
``hinge`` (1 up to ``hinge_at``, then ``1 / (a (τ - hinge_at) + 1)``; Xie et al. 2019).
Updates staler than ``max_staleness`` are dropped. The asynchronous schedule itself
(who trains when, on the virtual clock) is :class:`confide.server.buffered.BufferedCoordinator`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from confide.strategies.base import Strategy, param

__all__ = ["FedBuff", "FedBuffParams"]


@dataclass(frozen=True)
class FedBuffParams:
    """``[strategy]`` keys of ``fedbuff``."""

    buffer_size: int = param(10, ge=1, help="K: arrivals per server update (Alg. 1)")
    max_staleness: int = param(100, ge=0, help="updates staler than this are dropped")
    staleness: Literal["constant", "polynomial", "hinge"] = "polynomial"
    staleness_exponent: float = param(0.5, ge=0, help="a in (1+τ)^-a (polynomial, hinge)")
    hinge_at: int = param(10, ge=0, help="staleness up to which hinge weighting is 1")
    server_lr: float = param(1.0, gt=0, help="server learning rate η")
    server_momentum: float = param(0.0, ge=0, lt=1, help="server momentum β")


class FedBuff(Strategy):
    """Buffered asynchronous FedAvg with staleness weighting."""

    name = "fedbuff"
    citation = "Nguyen et al. 2022 (AISTATS), Algorithm 1 (FedBuff)"
    Params = FedBuffParams
    params: FedBuffParams
    #: the coordinator runs this strategy's buffered asynchronous schedule
    asynchronous: ClassVar[bool] = True

    def __init__(self, params: FedBuffParams | None = None) -> None:
        super().__init__(params)
        self.velocity: torch.Tensor | None = None

    def staleness_weight(self, staleness: int) -> float:
        """``s(τ)``; 0 for an update staler than ``max_staleness`` (it is dropped)."""
        p = self.params
        if staleness > p.max_staleness:
            return 0.0
        if p.staleness == "constant":
            return 1.0
        if p.staleness == "polynomial":
            return float((1.0 + staleness) ** -p.staleness_exponent)
        if staleness <= p.hinge_at:
            return 1.0
        return 1.0 / (p.staleness_exponent * (staleness - p.hinge_at) + 1.0)

    def apply(self, global_params: torch.Tensor, mean_update: torch.Tensor,
              mean_aux: Mapping[str, torch.Tensor], server_round: int, *, num_clients: int,
              total_clients: int) -> torch.Tensor:
        """Alg. 1, server update: ``v = β v + Δ̄; w = w + η v`` (β = 0: plain SGD)."""
        p = self.params
        v = self.velocity if self.velocity is not None else torch.zeros_like(mean_update)
        self.velocity = p.server_momentum * v + mean_update
        return global_params + p.server_lr * self.velocity

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {} if self.velocity is None else {"velocity": self.velocity.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        v = state.get("velocity")
        self.velocity = None if v is None else v.clone()

"""FedAvgM: FedAvg with server momentum.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", arXiv:1909.06335, 2019, Sec. 3: ``v <- β v + Δw; w <- w - v``, where
their ``Δw`` is the *negative* mean update. Written with Confide's sign convention
(``Δ_t = mean(w_k) - w_t``) and a server learning rate η (the SGD-with-momentum server
optimizer of Reddi et al. 2021, Alg. 1):

    v_t = β v_{t-1} + Δ_t,    w_{t+1} = w_t + η v_t,    v_0 = 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from confide.strategies.base import Strategy, param

__all__ = ["FedAvgM", "FedAvgMParams"]


@dataclass(frozen=True)
class FedAvgMParams:
    """``[strategy]`` keys of ``fedavgm``."""

    server_lr: float = param(1.0, gt=0, help="server learning rate η")
    server_momentum: float = param(0.9, ge=0, lt=1, help="server momentum β (Hsu et al.: 0.9)")


class FedAvgM(Strategy):
    """FedAvg with heavy-ball momentum on the server."""

    name = "fedavgm"
    citation = "Hsu, Qi, Brown 2019, Sec. 3 (FedAvgM)"
    Params = FedAvgMParams
    params: FedAvgMParams

    def __init__(self, params: FedAvgMParams | None = None) -> None:
        super().__init__(params)
        self.velocity: torch.Tensor | None = None

    def apply(self, global_params: torch.Tensor, mean_update: torch.Tensor,
              mean_aux: Mapping[str, torch.Tensor], server_round: int, *, num_clients: int,
              total_clients: int) -> torch.Tensor:
        """``v = β v + Δ; w = w + η v``."""
        p = self.params
        v = self.velocity if self.velocity is not None else torch.zeros_like(mean_update)
        self.velocity = p.server_momentum * v + mean_update  # Hsu et al. Sec. 3: v <- βv + Δw
        return global_params + p.server_lr * self.velocity

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {} if self.velocity is None else {"velocity": self.velocity.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        v = state.get("velocity")
        self.velocity = None if v is None else v.clone()

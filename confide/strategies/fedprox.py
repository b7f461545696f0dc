"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

Each client approximately minimises, from the global weights w^t (Eq. 2)

    h_k(w; w^t) = F_k(w) + μ/2 ||w - w^t||²,

so every local gradient gets ``μ (w - w^t)`` added (the trainer does this from
:class:`~confide.strategies.ClientRule`); the server aggregates like FedAvg. μ travels to the
clients in the round's instructions. NIID-Bench (Li et al., ICDE 2022) tunes μ over
{0.001, 0.01, 0.1, 1} and uses 0.01 by default, which is the default here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from confide.strategies.base import ClientRule, RoundInstructions, Strategy, param

__all__ = ["FedProx", "FedProxParams"]


@dataclass(frozen=True)
class FedProxParams:
    """``[strategy]`` keys of ``fedprox``."""

    mu: float = param(0.01, ge=0, help="proximal coefficient μ (Eq. 2); 0 is FedAvg")


class FedProx(Strategy):
    """FedAvg on the server; a proximal term towards the global weights on every client."""

    name = "fedprox"
    citation = "Li et al. 2020 (MLSys), Eq. 2"
    Params = FedProxParams
    params: FedProxParams

    def configure_round(self, server_round: int) -> RoundInstructions:
        """Send μ to the sampled clients."""
        return RoundInstructions(values={"proximal_mu": self.params.mu})

    def client_rule(self, instructions: RoundInstructions,
                    client_state: Mapping[str, torch.Tensor]) -> ClientRule:
        """``grad += μ (w - w^t)`` (Li et al. 2020, Eq. 2)."""
        mu = float(instructions.values.get("proximal_mu", self.params.mu))
        return ClientRule(proximal_mu=mu)

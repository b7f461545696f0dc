"""FedDyn as a Confide strategy plugin.

Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
Regularization", ICLR 2021, Algorithm 1. Client k keeps ``∇L_k(θ_k^{t-1})`` (its state
``grad``, 0 at first) and in round t minimises

    L_k(θ) - <∇L_k(θ_k^{t-1}), θ> + α/2 ||θ - θ^{t-1}||²

so every local gradient gets ``α (θ - θ^{t-1})`` (``ClientRule.proximal_mu``) and
``-∇L_k(θ_k^{t-1})`` (``ClientRule.gradient_correction``) added. Afterwards

    ∇L_k(θ_k^t) = ∇L_k(θ_k^{t-1}) - α (θ_k^t - θ^{t-1}).

The server keeps ``h`` (0 at first) and, with P_t the clients that reported out of m:

    h^t = h^{t-1} - α (1/m) Σ_{k∈P_t} (θ_k^t - θ^{t-1})
    θ^t = (1/|P_t|) Σ_{k∈P_t} θ_k^t - h^t / α.

Both server lines need only the mean update, so FedDyn works under secure aggregation. Confide
averages the updates weighted by example counts (FedAvg's weighting); with equal client sizes
that is the paper's plain mean.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from confide.strategies import ClientRule, RoundInstructions, Strategy, param

__all__ = ["FedDyn", "FedDynParams"]


@dataclass(frozen=True)
class FedDynParams:
    """``[strategy]`` keys of ``feddyn``."""

    alpha: float = param(0.01, gt=0, help="regularisation α (the paper uses 1e-1 to 1e-3)")


class FedDyn(Strategy):
    """Dynamic regularisation: each client's objective is corrected towards the global one."""

    name = "feddyn"
    citation = "Acar et al. 2021 (ICLR), Algorithm 1"
    Params = FedDynParams
    params: FedDynParams

    def __init__(self, params: FedDynParams | None = None) -> None:
        super().__init__(params)
        self.h: torch.Tensor | None = None

    # ------------------------------------------------------------------ server
    def configure_round(self, server_round: int) -> RoundInstructions:
        """Send α to the sampled clients."""
        return RoundInstructions(values={"alpha": self.params.alpha})

    def apply(self, global_params: torch.Tensor, mean_update: torch.Tensor,
              mean_aux: Mapping[str, torch.Tensor], server_round: int, *, num_clients: int,
              total_clients: int) -> torch.Tensor:
        """``h -= α |P|/m mean(Δ)``; ``θ = θ + mean(Δ) - h / α``."""
        alpha = self.params.alpha
        h = self.h if self.h is not None else torch.zeros_like(global_params)
        self.h = h - alpha * (num_clients / max(1, total_clients)) * mean_update
        return global_params + mean_update - self.h / alpha

    def state_dict(self) -> dict[str, Any]:
        """``h``, saved in every checkpoint."""
        return {} if self.h is None else {"h": self.h.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``h``."""
        h = state.get("h")
        self.h = None if h is None else h.clone()

    # ------------------------------------------------------------------ client
    def client_rule(self, instructions: RoundInstructions,
                    client_state: Mapping[str, torch.Tensor]) -> ClientRule:
        """``grad += α (θ - θ^{t-1}) - ∇L_k(θ_k^{t-1})``."""
        alpha = float(instructions.values.get("alpha", self.params.alpha))
        grad = client_state.get("grad")
        return ClientRule(proximal_mu=alpha,
                          gradient_correction=None if grad is None else -grad)

    def client_finalize(self, instructions: RoundInstructions,
                        client_state: Mapping[str, torch.Tensor], client_update: torch.Tensor,
                        *, num_steps: int, lr: float, momentum: float = 0.0
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``∇L_k(θ_k^t) = ∇L_k(θ_k^{t-1}) - α (θ_k^t - θ^{t-1})``; nothing extra to send."""
        alpha = float(instructions.values.get("alpha", self.params.alpha))
        grad = client_state.get("grad")
        previous = torch.zeros_like(client_update) if grad is None else grad.to(client_update)
        return {}, {"grad": previous - alpha * client_update}

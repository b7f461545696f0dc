"""SCAFFOLD: stochastic controlled averaging.

Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020, Algorithm 1. Server state: the control variate ``c``;
client state: ``c_i`` (both start at 0). In a round, with ``x`` the global weights:

* line 10, each local step: ``y_i <- y_i - η_l (g_i(y_i) - c_i + c)``, i.e. the gradient
  correction ``c - c_i`` (the trainer adds it to every gradient);
* line 12, option II: ``c_i+ = c_i - c + (x - y_i) / (K η_l)``;
* line 13: the client sends ``Δy_i = y_i - x`` (the update) and ``Δc_i = c_i+ - c_i``;
* lines 16-17: ``x <- x + η_g mean(Δy_i)``, ``c <- c + |S|/N mean(Δc_i)``.

``Δc_i`` is an auxiliary vector summed across clients on the same aggregation path as the
updates, so SCAFFOLD works under secure aggregation; ``c_i`` stays with the client (the
simulation coordinator keeps it in the checkpoint on the client's behalf).

Local momentum: option II's ``K η_l`` is the length of the path K plain-SGD steps walk per unit
gradient. With heavy-ball momentum β that length is ``η_l a(K, β)``,
``a = Σ_{k≤K} (1 - β^k)/(1 - β)`` (see :func:`~confide.strategies.base.effective_local_steps`);
dividing by ``K η_l`` instead would inflate ``c_i`` by about 1/(1 - β) and, since the trainer
feeds the correction through the same momentum, make ``c_i`` oscillate and diverge. For β = 0
both are ``K η_l``, exactly Algorithm 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from confide.exceptions import StrategyError
from confide.round import column
from confide.strategies.base import (
    AuxVector,
    ClientRule,
    RoundInstructions,
    Strategy,
    effective_local_steps,
    param,
)

__all__ = ["Scaffold", "ScaffoldParams"]


@dataclass(frozen=True)
class ScaffoldParams:
    """``[strategy]`` keys of ``scaffold``."""

    server_lr: float = param(1.0, gt=0, help="global step size η_g (Algorithm 1, line 16)")


class Scaffold(Strategy):
    """Drift correction with server and client control variates."""

    name = "scaffold"
    citation = "Karimireddy et al. 2020 (ICML), Algorithm 1, option II"
    Params = ScaffoldParams
    params: ScaffoldParams
    #: Δc_i: model length; no a-priori bound (it moves with the gradients), so under secure
    #: aggregation an entry beyond ``clipping_range`` is reported (aux_vectors, rule 3)
    aux_vectors = (AuxVector("delta_c"),)

    def __init__(self, params: ScaffoldParams | None = None) -> None:
        super().__init__(params)
        self.c: torch.Tensor | None = None

    # ------------------------------------------------------------------ server
    def initialize(self, global_params: torch.Tensor) -> None:
        """``c = 0``."""
        self.c = torch.zeros_like(global_params)

    def configure_round(self, server_round: int) -> RoundInstructions:
        """Send the server control variate ``c``."""
        tensors = {} if self.c is None else {"c": self.c}
        return RoundInstructions(tensors=tensors)

    def apply(self, global_params: torch.Tensor, mean_update: torch.Tensor,
              mean_aux: Mapping[str, torch.Tensor], server_round: int, *, num_clients: int,
              total_clients: int) -> torch.Tensor:
        """Lines 16-17: ``x + η_g Δy``, ``c + |S|/N Δc``."""
        if "delta_c" not in mean_aux:
            raise StrategyError("scaffold: the aggregate carries no 'delta_c'; the runtime must "
                                "sum the strategy's aux vectors with the updates")
        c = self.c if self.c is not None else torch.zeros_like(global_params)
        self.c = c + (num_clients / max(1, total_clients)) * mean_aux["delta_c"]
        return global_params + self.params.server_lr * mean_update

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {} if self.c is None else {"c": self.c.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        c = state.get("c")
        self.c = None if c is None else c.clone()

    # ------------------------------------------------------------------ client
    @staticmethod
    def _variates(instructions: RoundInstructions, client_state: Mapping[str, torch.Tensor],
                  like: torch.Tensor | None = None) -> tuple[torch.Tensor | None,
                                                             torch.Tensor | None]:
        c, c_i = instructions.tensors.get("c"), client_state.get("c_i")
        if c is not None and c_i is not None and c.shape != c_i.shape:
            raise StrategyError(f"scaffold: server control variate has {c.numel()} entries "
                                f"but the client's has {c_i.numel()}")
        if like is not None:
            for name, t in (("c", c), ("c_i", c_i)):
                if t is not None and t.shape != like.shape:
                    raise StrategyError(f"scaffold: control variate {name} has {t.numel()} "
                                        f"entries, the model has {like.numel()}")
        return c, c_i

    def client_rule(self, instructions: RoundInstructions,
                    client_state: Mapping[str, torch.Tensor]) -> ClientRule:
        """Line 10: add ``c - c_i`` to every local gradient."""
        c, c_i = self._variates(instructions, client_state)
        if c is None:
            return ClientRule() if c_i is None else ClientRule(gradient_correction=-c_i)
        return ClientRule(gradient_correction=c if c_i is None else c - c_i)

    def client_finalize(self, instructions: RoundInstructions,
                        client_state: Mapping[str, torch.Tensor], client_update: torch.Tensor,
                        *, num_steps: int, lr: float, momentum: float = 0.0
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Lines 12-13, option II: ``c_i+ = c_i - c + (x - y_i) / (K η_l)``; send ``Δc_i``."""
        c, c_i = self._variates(instructions, client_state, like=client_update)
        zeros = torch.zeros_like(client_update)
        c = zeros if c is None else c.to(client_update)
        c_i = zeros if c_i is None else c_i.to(client_update)
        if num_steps <= 0:  # no local step taken: nothing learnt about this client's drift
            return {"delta_c": zeros}, {"c_i": c_i}
        path = lr * effective_local_steps(num_steps, momentum)  # K η_l, momentum-aware
        c_i_new = c_i - c - client_update / path  # x - y_i = -client_update
        return {"delta_c": c_i_new - c_i}, {"c_i": c_i_new}

    def client_finalize_batch(self, instructions: RoundInstructions,
                              client_states: Sequence[Mapping[str, torch.Tensor]],
                              client_updates: torch.Tensor, *, num_steps: Sequence[int],
                              lr: float, momentum: float = 0.0
                              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`client_finalize` for a cohort ``[n, dim]`` as tensor operations."""
        n = client_updates.shape[0]
        like = client_updates[0] if n else None
        zeros = torch.zeros_like(client_updates)
        c_rows = []
        for st in client_states:
            _, c_i = self._variates(instructions, st, like=like)
            c_rows.append(c_i)
        c = instructions.tensors.get("c")
        c = torch.zeros_like(client_updates[:1]) if c is None else c.reshape(1, -1).to(
            client_updates)
        if any(r is not None for r in c_rows):
            c_i = torch.stack([zeros[0] if r is None else r.reshape(-1).to(client_updates)
                               for r in c_rows])
        else:
            c_i = zeros
        dev = client_updates.device
        path = column([lr * effective_local_steps(int(k), momentum) if k > 0 else 1.0
                       for k in num_steps], dev).to(client_updates.dtype)
        trained = column([1.0 if k > 0 else 0.0 for k in num_steps], dev) > 0
        c_i_new = torch.where(trained[:, None], c_i - c - client_updates / path[:, None], c_i)
        return {"delta_c": c_i_new - c_i}, {"c_i": c_i_new}

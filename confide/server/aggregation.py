"""Aggregation (DESIGN.md, step 5): the coordinator learns only the *sum* of contributions.

Each client contributes ``weight * update`` (and its strategy's auxiliary vectors, summed
unweighted) plus ``weight``. :class:`PlainAggregator` sums in the clear; the secure
aggregator (``confide.privacy.secagg``) recovers the same sum from masked inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from confide.client import ClientResult

__all__ = ["Aggregate", "Aggregator", "PlainAggregator", "client_weight"]


@dataclass
class Aggregate:
    """The sums a round's server update is computed from."""

    update_sum: torch.Tensor
    weight_sum: float
    count: int
    aux_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    #: what the mean divides by; central DP sets it to the *expected* cohort weight
    denominator: float | None = None
    #: client ids whose contributions are in the sum
    client_ids: list[int] = field(default_factory=list)
    #: set by strategies that combine individual updates (median, Krum): replaces the mean
    robust_update: torch.Tensor | None = None

    def mean_update(self) -> torch.Tensor:
        """``update_sum / denominator`` (the weighted mean by default)."""
        if self.robust_update is not None:
            return self.robust_update
        return self.update_sum / (self.denominator or self.weight_sum)

    def mean_aux(self) -> dict[str, torch.Tensor]:
        """Auxiliary vectors averaged over the contributing clients."""
        return {k: v / max(1, self.count) for k, v in self.aux_sum.items()}


def client_weight(result: ClientResult, weighting: str) -> float:
    """``examples``: FedAvg's n_k weighting; ``uniform``: 1 (needed for DP sensitivity)."""
    return float(result.num_examples) if weighting == "examples" else 1.0


class Aggregator:
    """Turns the round's client results into an :class:`Aggregate`."""

    #: fault-injection stages this aggregator can drop clients at
    dropout_stages: tuple[str, ...] = ("training",)

    def aggregate(self, results: Sequence[ClientResult], *, server_round: int,
                  weighting: str) -> Aggregate:
        """Sum the contributions of ``results``."""
        raise NotImplementedError


class PlainAggregator(Aggregator):
    """Sums in the clear (a trusted coordinator)."""

    def aggregate(self, results: Sequence[ClientResult], *, server_round: int,
                  weighting: str) -> Aggregate:
        """Sum ``weight * update`` and the aux vectors in float64, in client-id order."""
        first = results[0].update
        total = torch.zeros_like(first, dtype=torch.float64)
        aux: dict[str, torch.Tensor] = {}
        weight_sum = 0.0
        # Sum in float64 in a fixed (client-id) order: order-independent to rounding.
        for r in sorted(results, key=lambda r: r.client_id):
            w = client_weight(r, weighting)
            total += w * r.update.to(torch.float64)
            weight_sum += w
            for k, v in r.aux.items():
                aux[k] = aux.get(k, torch.zeros_like(v, dtype=torch.float64)) + v.double()
        return Aggregate(
            update_sum=total.to(first.dtype), weight_sum=weight_sum, count=len(results),
            aux_sum={k: v.to(first.dtype) for k, v in aux.items()},
            client_ids=sorted(r.client_id for r in results),
        )

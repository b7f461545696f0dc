"""Robust aggregators: coordinate-wise median, coordinate-wise trimmed mean, (Multi-)Krum.

They combine the *individual* client updates, so they declare
``requires_individual_updates`` and cannot run under secure aggregation (which reveals only
the sum). As in the papers, every client counts once (the example-count weights are ignored):
robustness statements are about the number of Byzantine clients, not their data size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from confide.exceptions import StrategyError
from confide.strategies.base import Strategy, param

__all__ = [
    "FedMedian",
    "TrimmedMean",
    "Krum",
    "TrimmedMeanParams",
    "KrumParams",
]


def _stack(name: str, updates: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """The updates as one ``[n, dim]`` tensor (a result batch's rows already are)."""
    if len(updates) == 0:
        raise StrategyError(f"{name}: no client updates to aggregate")
    if isinstance(updates, torch.Tensor):
        return updates.reshape(updates.shape[0], -1)
    return torch.stack([u.reshape(-1) for u in updates])


class FedMedian(Strategy):
    """Coordinate-wise median of the client updates.

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal
    Statistical Rates", ICML 2018, Algorithm 1 option I with Definition 1 (coordinate-wise
    median; for an even count, the mean of the two middle values).
    """

    name = "fedmedian"
    citation = "Yin et al. 2018 (ICML), Algorithm 1 option I, Definition 1"
    requires_individual_updates = True

    def aggregate_individual(self, updates: torch.Tensor, weights: torch.Tensor  # noqa: D102
                             ) -> torch.Tensor:
        """``med{Δ_i}`` coordinate by coordinate."""
        ordered = _stack(self.name, updates).sort(dim=0).values
        n = ordered.shape[0]
        if n % 2:
            return ordered[n // 2].clone()
        return 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


@dataclass(frozen=True)
class TrimmedMeanParams:
    """``[strategy]`` keys of ``trimmedmean``."""

    beta: float = param(0.1, ge=0, lt=0.5, help="fraction β trimmed from each end (Def. 2)")


class TrimmedMean(Strategy):
    """Coordinate-wise β-trimmed mean of the client updates.

    Yin et al. 2018 (ICML), Algorithm 1 option II with Definition 2: per coordinate, drop the
    largest and the smallest β fraction and average the remaining (1 - 2β) m values. With m
    clients we drop ``floor(β m)`` from each end, so at least one value always remains.
    """

    name = "trimmedmean"
    citation = "Yin et al. 2018 (ICML), Algorithm 1 option II, Definition 2"
    requires_individual_updates = True
    Params = TrimmedMeanParams
    params: TrimmedMeanParams

    def aggregate_individual(self, updates: torch.Tensor, weights: torch.Tensor  # noqa: D102
                             ) -> torch.Tensor:
        """``trmean_β{Δ_i}`` coordinate by coordinate."""
        ordered = _stack(self.name, updates).sort(dim=0).values
        n = ordered.shape[0]
        k = math.floor(self.params.beta * n)
        return ordered[k : n - k].mean(dim=0)


@dataclass(frozen=True)
class KrumParams:
    """``[strategy]`` keys of ``krum``."""

    num_byzantine: int = param(1, ge=0, help="f, the number of Byzantine clients tolerated")
    num_selected: int = param(1, ge=1, help="m: 1 is Krum, more averages the m best (Multi-Krum)")


class Krum(Strategy):
    """(Multi-)Krum: the update closest to its n - f - 2 nearest neighbours.

    Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS 2017, Sec. 4: the score of ``V_i`` is
    ``s(i) = Σ_{i→j} ||V_i - V_j||²`` over the ``n - f - 2`` vectors closest to ``V_i``; Krum
    returns the ``V_i`` with the smallest score, and needs ``2f + 2 < n``. Multi-Krum (same
    paper, Sec. 5) averages the ``m`` vectors with the smallest scores.
    """

    name = "krum"
    citation = "Blanchard et al. 2017 (NeurIPS), Sec. 4 (Krum) and Sec. 5 (Multi-Krum)"
    requires_individual_updates = True
    Params = KrumParams
    params: KrumParams

    def scores(self, stacked: torch.Tensor) -> torch.Tensor:
        """Krum score of every row of ``stacked`` (n x d)."""
        n, f = stacked.shape[0], self.params.num_byzantine
        if 2 * f + 2 >= n:
            raise StrategyError(
                f"krum with strategy.num_byzantine = {f} needs more than 2f+2 = {2 * f + 2} "
                f"clients per round (Blanchard et al. 2017); this round has {n}: lower "
                "num_byzantine or sample more clients"
            )
        x = stacked.to(torch.float64)
        gram = x @ x.T
        sq = gram.diagonal()
        dist2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp_min(0.0)
        dist2.fill_diagonal_(math.inf)  # i→j ranges over j != i
        nearest = dist2.sort(dim=1).values[:, : n - f - 2]
        return nearest.sum(dim=1)

    def aggregate_individual(self, updates: torch.Tensor, weights: torch.Tensor  # noqa: D102
                             ) -> torch.Tensor:
        """The lowest-scoring update, or the mean of the ``m`` lowest (Multi-Krum)."""
        stacked = _stack(self.name, updates)
        n, m, f = stacked.shape[0], self.params.num_selected, self.params.num_byzantine
        scores = self.scores(stacked)
        if m > n - f:
            raise StrategyError(
                f"krum: strategy.num_selected = {m} exceeds the {n - f} clients that may be "
                f"honest this round (n = {n}, num_byzantine = {f})"
            )
        chosen = torch.argsort(scores, stable=True)[:m]
        return stacked[chosen].mean(dim=0)

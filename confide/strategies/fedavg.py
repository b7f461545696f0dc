"""FedAvg (McMahan et al., AISTATS 2017).

"Communication-Efficient Learning of Deep Networks from Decentralized Data", Algorithm 1:
``w_{t+1} = w_t + sum_k n_k/n * Δ_k`` with ``Δ_k = w_k - w_t``.
"""

from __future__ import annotations

from confide.strategies.base import Strategy

__all__ = ["FedAvg"]


class FedAvg(Strategy):
    """Federated averaging: the server adds the example-weighted mean update."""

    name = "fedavg"
    citation = "McMahan et al. 2017, Algorithm 1"

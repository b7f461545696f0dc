"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017, Algorithm 1): ``w_{t+1} = w_t + sum_k n_k/n * Δ_k``."""

from __future__ import annotations

from confide.strategies.base import Strategy


class FedAvg(Strategy):
    """Federated averaging: the server adds the example-weighted mean update."""

    name = "fedavg"
    citation = "McMahan et al. 2017, Algorithm 1"

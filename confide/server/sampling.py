"""Seeded cohort sampling: a fixed-size uniform sample, Poisson sampling, or a cyclic order.

Poisson sampling (each client independently with probability q) is what the RDP/PRV
accountants of the sampled Gaussian mechanism assume (Mironov et al. 2019, Sec. 3; Opacus
``RDPAccountant``), so it is used whenever DP-FedAvg is on. The cyclic order splits the clients
into ``num_clients // size`` groups, fixed for the run (seeded), and visits them in turn: each
client takes part exactly every ``num_clients // size`` rounds, which is the min-separation
participation DP-FTRL's accounting assumes (Kairouz et al. 2021, Sec. 4; Choquette-Choo et al.
2023, Sec. 4).
"""

from __future__ import annotations

import numpy as np

from confide.seeding import derive_rng

__all__ = ["sample_cohort", "cyclic_groups"]


def cyclic_groups(*, num_clients: int, size: int, seed: int) -> list[np.ndarray]:
    """The ``max(1, num_clients // size)`` groups of the cyclic order (a seeded permutation
    split as evenly as possible), in the order they are visited.
    """
    order = derive_rng(seed, "cyclic-order").permutation(num_clients)
    return [np.sort(g) for g in np.array_split(order, max(1, num_clients // max(1, size)))]


def sample_cohort(*, num_clients: int, size: int, method: str, seed: int, server_round: int,
                  available: np.ndarray | None = None, attempt: int = 0) -> np.ndarray:
    """Client ids sampled for ``server_round`` (sorted); ``attempt`` > 0 draws the fresh,
    independent cohort of a retried round.
    """
    rng = (derive_rng(seed, "cohort", server_round) if attempt == 0
           else derive_rng(seed, "cohort", server_round, "retry", attempt))
    pool = np.arange(num_clients) if available is None else np.asarray(available)
    if method == "cyclic":
        groups = cyclic_groups(num_clients=num_clients, size=size, seed=seed)
        group = groups[(server_round - 1) % len(groups)]
        return group if available is None else np.intersect1d(group, np.asarray(available))
    if method == "poisson":
        q = size / num_clients
        return np.sort(pool[rng.random(len(pool)) < q])
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))

"""Seeded cohort sampling: a fixed-size uniform sample, or Poisson sampling.

Poisson sampling (each client independently with probability q) is what the RDP/PRV
accountants of the sampled Gaussian mechanism assume (Mironov et al. 2019, Sec. 3; Opacus
``RDPAccountant``), so it is used whenever differential privacy is on.
"""

from __future__ import annotations

import numpy as np

from confide.seeding import derive_rng

__all__ = ["sample_cohort"]


def sample_cohort(*, num_clients: int, size: int, method: str, seed: int, server_round: int,
                  available: np.ndarray | None = None, attempt: int = 0) -> np.ndarray:
    """Client ids sampled for ``server_round`` (sorted); ``attempt`` > 0 draws the fresh,
    independent cohort of a retried round.
    """
    rng = (derive_rng(seed, "cohort", server_round) if attempt == 0
           else derive_rng(seed, "cohort", server_round, "retry", attempt))
    pool = np.arange(num_clients) if available is None else np.asarray(available)
    if method == "poisson":
        q = size / num_clients
        return np.sort(pool[rng.random(len(pool)) < q])
    return np.sort(rng.choice(pool, size=min(size, len(pool)), replace=False))

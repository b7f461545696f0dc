"""The SecAgg+ neighbourhood graph and the choice of its degree and threshold.

Bell et al. 2020 ("Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS,
§3 and Algorithm 1) replace Bonawitz et al.'s complete graph by a random k-regular graph: a
Harary graph H(n, k) on a random permutation of the cohort. A client then agrees masks with,
and secret-shares its seeds among, only its k neighbours, so its cost is O(log n).

How large k and the Shamir threshold t must be depends on the cohort size n, the fraction of
clients expected to drop out (delta) and the fraction that may collude with the coordinator
(gamma). :func:`graph_parameters` follows Bell et al.'s semi-honest analysis (§4, Thm. 3.x:
the surviving honest clients stay connected; fewer than t of anyone's neighbours are corrupt;
at least t of everyone's neighbours survive), with the statistical parameters of Google's
production implementation (google-parfait/federated-compute,
``fcp/secagg/server/graph_parameter_finder.cc``): security 2^-40, failure 2^-20 per round.
The search starts at Bell et al.'s degree 2*ceil(log2 n) + 1 and raises it only as far as
the dropout rate requires; among the thresholds that are secure and correct it takes the one
closest to 2k/3. (With k = 2*ceil(log2 n) + 1 and t = 2k/3 fixed, 10% dropouts at n = 500
would abort most rounds: some client almost surely keeps fewer than t live neighbours.)
"""

from __future__ import annotations

import functools
import logging
import math
import random
from collections.abc import Sequence

from confide.exceptions import ConfigError

__all__ = ["harary_graph", "graph_parameters", "bell_degree"]

#: statistical security: collusion or a disconnected survivor graph with probability < 2^-40
SECURITY_BITS = 40
#: correctness: a round fails for lack of surviving neighbours with probability < 2^-20
CORRECTNESS_BITS = 20

_system_random = random.SystemRandom()
log = logging.getLogger("confide")


def bell_degree(n: int) -> int:
    """Bell et al.'s rule of thumb, k = 2*ceil(log2 n) + 1 (capped at n - 1)."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))) + 1)


def harary_graph(cohort: Sequence[int], degree: int) -> dict[int, tuple[int, ...]]:
    """A random Harary graph H(n, k) on ``cohort`` (Bell et al. 2020, Algorithm 1).

    The clients are placed on a ring in an order drawn from the operating system's CSPRNG
    (clients must not be able to predict their neighbours); each is joined to the ``k/2``
    nearest on either side. ``degree`` is rounded up to even; at ``n - 1`` or more the graph is
    complete (Bonawitz et al. 2017). Neighbour lists are sorted; the graph is symmetric.
    """
    ids = list(cohort)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("cohort ids must be distinct")
    if degree >= n - 1 or n <= 2:
        return {c: tuple(sorted(x for x in ids if x != c)) for c in ids}
    half = math.ceil(degree / 2)
    _system_random.shuffle(ids)
    neighbours: dict[int, set[int]] = {c: set() for c in ids}
    for i, c in enumerate(ids):
        for off in range(1, half + 1):
            other = ids[(i + off) % n]
            neighbours[c].add(other)
            neighbours[other].add(c)
    return {c: tuple(sorted(v)) for c, v in neighbours.items()}


# --------------------------------------------------------------------------- parameters


def _hypergeom_pmf(population: int, successes: int, draws: int) -> list[float]:
    """P[X = i], i = 0..draws, for X ~ Hypergeometric(population, successes, draws), exact."""
    total = math.comb(population, draws)
    return [math.comb(successes, i) * math.comb(population - successes, draws - i) / total
            for i in range(draws + 1)]


def _log_prob_disconnected(n: int, k: int, bad: int) -> float:
    """Log of a union bound on the probability that removing ``bad`` random clients
    disconnects a random Harary graph H(n, k): it needs two separate runs of k/2 removed
    ring neighbours (the argument of google-parfait/federated-compute's parameter finder).
    """
    if k > bad:
        return -math.inf
    log_pairs = math.log(n) + math.log(max(n - k - 1, 1)) - math.log(2)
    return (log_pairs + math.lgamma(bad + 1) + math.lgamma(n - k + 1) - math.lgamma(n + 1)
            - math.lgamma(bad - k + 1))


@functools.lru_cache(maxsize=256)
def graph_parameters(n: int, *, dropout_rate: float, corrupt_rate: float) -> tuple[int, int]:
    """``(degree, threshold)`` for a cohort of ``n`` with the given dropout/corruption rates.

    Tries even degrees k from Bell et al.'s 2*ceil(log2 n) + 1 up; the first k whose survivor
    graph stays connected and which admits a threshold t with
    ``P[a client has >= t corrupt neighbours] <= 2^-41 / n`` (security) and
    ``P[a client has < t surviving neighbours] <= 2^-20 / n`` (correctness) wins; t is then
    the admissible value closest to 2k/3. When no degree tolerates the dropout rate (small
    cohorts), returns the complete graph with the smallest secure threshold, and warns.
    """
    if n < 3:
        raise ConfigError(f"secure aggregation needs at least 3 clients, got {n}")
    if not (0 <= dropout_rate < 1 and 0 <= corrupt_rate < 1):
        raise ConfigError("dropout and corruption rates must lie in [0, 1)")
    if dropout_rate + corrupt_rate > 0.9:
        raise ConfigError(
            f"secure_aggregation.dropout_tolerance + corruption_tolerance = "
            f"{dropout_rate + corrupt_rate:.2f} exceeds 0.9: no neighbourhood graph can be "
            "both secure and complete its rounds (Bell et al. 2020, §4)")
    corrupt = math.floor(corrupt_rate * n + 1e-12)
    dropped = math.ceil(dropout_rate * n - 1e-12)
    surviving = n - dropped
    security = 2.0 ** -(SECURITY_BITS + 1) / n
    correctness = 2.0 ** -CORRECTNESS_BITS / n
    start = bell_degree(n) + bell_degree(n) % 2  # Bell et al.'s degree, made even
    low = 2
    for k in [*range(start, n - 1, 2), n - 1]:
        complete = k == n - 1
        if not complete and (_log_prob_disconnected(n, k, corrupt + dropped)
                             >= math.log(security)):
            continue
        # Neighbours of a client: k others drawn from the other n - 1 clients.
        adversarial = _hypergeom_pmf(n - 1, corrupt, k)
        survivors = _hypergeom_pmf(n - 1, max(surviving - 1, 0), k)
        # t1: the smallest t with P[#corrupt neighbours >= t] <= security
        tail, t1 = 0.0, k + 1
        for t in range(k, -1, -1):
            tail += adversarial[t]
            if tail > security:
                break
            t1 = t
        # t2: the largest t with P[#surviving neighbours < t] <= correctness
        head, t2 = 0.0, 0
        for t in range(1, k + 1):
            head += survivors[t - 1]
            if head > correctness:
                break
            t2 = t
        low, high = max(t1, 2), t2
        if low <= high:
            return k, min(high, max(low, math.ceil(2 * k / 3)))
    # Even the complete graph cannot keep t survivors around every client at this dropout
    # rate (small cohorts): keep the secure threshold; rounds with that many dropouts abort.
    if low > n - 1:
        raise ConfigError(
            f"no secure-aggregation threshold is secure among {n} clients with "
            f"{corrupt_rate:.0%} of them corrupt: lower secure_aggregation.corruption_tolerance "
            "or use larger cohorts")
    log.warning("secure aggregation: a cohort of %d cannot tolerate %.0f%% dropouts at a "
                "secure threshold; using the complete graph with threshold %d (rounds with "
                "more dropouts abort)", n, 100 * dropout_rate, low)
    return n - 1, low

"""Partitioners: IID, Dirichlet(alpha) label skew, shards (k classes per client), natural.

Every partitioner is seeded, returns one index array per client, and covers each training
sample exactly once (a property test checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from confide.exceptions import DataError

__all__ = ["partition", "PartitionReport", "partition_report"]


def _iid(y: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    idx = rng.permutation(len(y))
    return [np.sort(part) for part in np.array_split(idx, n)]


def _dirichlet(y: np.ndarray, n: int, alpha: float, min_size: int, rng: np.random.Generator
               ) -> list[np.ndarray]:
    """Label skew as in NIID-Bench (Li et al., ICDE 2022, Sec. IV-A): for every class, the
    share of each client is drawn from Dir(alpha); redrawn until every client holds at least
    ``min_size`` samples.
    """
    classes = np.unique(y)
    for _attempt in range(1000):
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(n, alpha))
            # NIID-Bench balancing: a client already above the mean size gets no more.
            sizes = np.array([len(p) for p in parts])
            shares = shares * (sizes < len(y) / n)
            total = shares.sum()
            shares = shares / total if total > 0 else np.full(n, 1.0 / n)
            cuts = (np.cumsum(shares) * len(idx)).astype(int)[:-1]
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise DataError(
        f"Dirichlet partition could not give each of {n} clients {min_size} samples; "
        "raise data.alpha, lower data.num_clients or data.min_samples_per_client"
    )


def _shards(y: np.ndarray, n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client gets ``k`` distinct classes (NIID-Bench "#C=k"): class c's samples are split
    evenly among the clients that drew c; every class is assigned to at least one client.
    """
    classes = np.unique(y)
    if k > len(classes):
        raise DataError(f"data.classes_per_client = {k} exceeds the {len(classes)} classes")
    if n * k < len(classes):
        raise DataError(
            f"{n} clients x {k} classes cannot cover all {len(classes)} classes; "
            "raise data.num_clients or data.classes_per_client"
        )
    # Round-robin first so every class is owned, then random distinct classes.
    owned: list[set[int]] = [set() for _ in range(n)]
    order = rng.permutation(classes)
    for i, c in enumerate(order):
        owned[i % n].add(int(c))
    for i in range(n):
        while len(owned[i]) < k:
            owned[i].add(int(rng.choice(classes)))
    parts: list[list[int]] = [[] for _ in range(n)]
    for c in classes:
        holders = [i for i in range(n) if int(c) in owned[i]]
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        for holder, chunk in zip(holders, np.array_split(idx, len(holders)), strict=True):
            parts[holder].extend(chunk.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


def _natural(natural: np.ndarray | None, n: int) -> list[np.ndarray]:
    if natural is None:
        raise DataError("data.partition = 'natural' needs a dataset with client ids "
                        "(heart-disease, or a user file with a client-id column)")
    ids = np.unique(natural)
    if n != len(ids):
        raise DataError(
            f"the natural partition has {len(ids)} clients; set data.num_clients = {len(ids)}"
        )
    return [np.flatnonzero(natural == i) for i in ids]


def partition(y: np.ndarray, *, num_clients: int, method: str, seed: int, alpha: float = 0.5,
              classes_per_client: int = 2, min_samples: int = 1,
              natural: np.ndarray | None = None) -> list[np.ndarray]:
    """Split sample indices ``0..len(y)-1`` among ``num_clients`` clients."""
    if method != "natural" and num_clients * min_samples > len(y):
        raise DataError(
            f"data.num_clients = {num_clients} is larger than the dataset allows "
            f"({len(y)} training samples, at least {min_samples} per client)"
        )
    rng = np.random.default_rng([seed, 21])
    if method == "iid":
        return _iid(y, num_clients, rng)
    if method == "dirichlet":
        return _dirichlet(y, num_clients, alpha, min_samples, rng)
    if method == "shards":
        return _shards(y, num_clients, classes_per_client, rng)
    if method == "natural":
        return _natural(natural, num_clients)
    raise DataError(f"unknown partition {method!r}; choose iid, dirichlet, shards or natural")


@dataclass
class PartitionReport:
    """Per-client sizes and label counts."""

    sizes: list[int]
    label_counts: list[list[int]]

    def summary(self) -> str:
        """One line: min/median/max client size."""
        s = np.array(self.sizes)
        return (f"{len(s)} clients, samples per client min {s.min()} / median "
                f"{int(np.median(s))} / max {s.max()}")


def partition_report(parts: list[np.ndarray], y: np.ndarray, num_classes: int
                     ) -> PartitionReport:
    """Sizes and per-class counts of every client."""
    return PartitionReport(
        sizes=[len(p) for p in parts],
        label_counts=[np.bincount(y[p], minlength=num_classes).tolist() for p in parts],
    )

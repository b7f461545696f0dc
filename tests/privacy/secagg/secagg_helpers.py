"""Run SecAgg+ rounds in process for the tests, with hooks to drop or tamper with messages."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from confide.privacy.secagg import (
    Contribution,
    InProcessMessagePath,
    SecAggClient,
    SecAggResult,
    SecAggServer,
    run_secure_aggregation,
)
from confide.privacy.secagg.graph import graph_parameters
from confide.privacy.secagg.quantisation import Quantiser

Tamper = Callable[[str, int, bytes], "bytes | None"]


class TamperingPath(InProcessMessagePath):
    """The in-process path, with a hook that may rewrite (or drop) any client's reply."""

    def __init__(self, *args, tamper: Tamper | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tamper = tamper
        self.replies: dict[tuple[str, int], bytes] = {}

    def exchange(self, stage: str, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        replies = super().exchange(stage, requests)
        for cid, reply in list(replies.items()):
            if reply is not None:
                self.replies[(stage, cid)] = reply
                if self.tamper is not None:
                    replies[cid] = self.tamper(stage, cid, reply)
        return replies


@dataclass
class Round:
    """A prepared round: server, clients, their contributions and the quantiser."""

    server: SecAggServer
    clients: dict[int, SecAggClient]
    contributions: dict[int, Contribution]
    quantiser: Quantiser
    seed: int
    drop_after: dict[int, str] = field(default_factory=dict)

    def run(self, tamper: Tamper | None = None) -> tuple[SecAggResult, TamperingPath]:
        path = TamperingPath(self.clients, self.contributions, self.drop_after, tamper=tamper)
        return run_secure_aggregation(self.server, path), path

    def expected(self, included) -> np.ndarray:
        """The plaintext modular sum of the included clients' quantised contributions."""
        q = self.quantiser
        total = np.zeros(self.server.vector_length, dtype=np.uint64)
        for cid in included:
            c = self.contributions[cid]
            total += q.encode(c.update, c.weight, list(c.aux),
                              np.random.default_rng([self.seed, cid])).astype(np.uint64)
        return (total & np.uint64((1 << q.bits) - 1)).astype(q.embed(np.zeros(1)).dtype)


def make_round(n: int, dim: int, *, seed: int = 0, bits: int = 32, num_aux: int = 0,
               degree: int | None = None, threshold: int | None = None,
               dropout: float = 0.1, server_round: int = 1, ids: list[int] | None = None,
               max_weight: int = 100) -> Round:
    rng = np.random.default_rng(seed)
    if ids is None:
        ids = sorted(int(i) for i in rng.choice(10 * n + 10, size=n, replace=False))
    k, t = graph_parameters(n, dropout_rate=dropout, corrupt_rate=0.05) if n >= 3 else (1, 2)
    degree = degree if degree is not None else k
    threshold = threshold if threshold is not None else t
    q = Quantiser(bits=bits, clipping_range=2.0, max_weight=max_weight, cohort_size=n)
    server = SecAggServer(cohort=ids, server_round=server_round, bits=bits,
                          vector_length=q.vector_length(dim, num_aux), degree=degree,
                          threshold=threshold, max_weight=max_weight, clipping_range=2.0)
    clients = {c: SecAggClient(c, server_round=server_round,
                               rng=np.random.default_rng([seed, c])) for c in ids}
    contributions = {
        c: Contribution(update=rng.normal(size=dim), weight=int(rng.integers(0, max_weight + 1)),
                        aux=tuple(rng.normal(size=dim) for _ in range(num_aux)))
        for c in ids}
    return Round(server, clients, contributions, q, seed)

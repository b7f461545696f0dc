"""Buffered asynchronous rounds (FedBuff): the same round contracts, filled by arrival order.

Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
Alg. 1, on a virtual clock:

1. ``simulation.concurrency`` clients start at once, each from the global model current when
   it starts. How long each takes (download, training, upload) comes from the latency model
   (:mod:`confide.simulations.latency`), seeded, so a run is deterministic in virtual time.
2. Arrivals are taken in finishing order. An update's staleness ``τ`` is the number of server
   updates since its client started; it joins the buffer weighted by ``s(τ)`` (the
   strategy's rule; staler than ``max_staleness``: dropped). A finished client is replaced at
   once by a new one, drawn uniformly from the idle clients (a client whose result waits in
   the buffer is not idle: it contributes at most once to each buffer).
3. Every ``buffer_size`` arrivals the buffer is one round of the ordinary round contracts:
   :meth:`Coordinator.complete_round` aggregates it (under secure aggregation the buffer is
   one SecAgg instance over the clients that fill it, as in Huba et al., "Papaya", MLSys 2022,
   Sec. 4), applies server privacy, the server optimizer, the ledger and the record.

Training is batched without changing the result: every client that starts between two
server updates trains from the same model, so all of them are trained together (one
``run_cohort`` call) just before that model is replaced — the vectorized executor trains the
clients whose start times fall in the same window at once.

Privacy: the clients of a buffer are whoever finished first, not a random sample, so a
buffer's privacy event is accounted with sampling rate 1 (no amplification by sampling is
claimed), and central DP divides by the fixed buffer size ``K``.
On resume the clients in flight are not restored: their work is discarded and new clients
start at the saved virtual time (a restarted coordinator loses its connections too).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from confide.clock import VirtualClock
from confide.exceptions import ConfigError
from confide.round import ClientResult, ClientTask, ResultBatch
from confide.seeding import derive_rng, derive_seed
from confide.server.coordinator import Coordinator, RoundRecord

__all__ = ["BufferedCoordinator"]

log = logging.getLogger("confide")


@dataclass
class _Flight:
    """A client in flight: the model version it started from, and its result once trained."""

    task: ClientTask
    version: int
    trained: bool = False
    result: ClientResult | None = None
    failure: str | None = None


@dataclass
class BufferedCoordinator(Coordinator):
    """The coordinator with FedBuff's asynchronous schedule (one record per server update)."""

    #: clients in flight at once
    concurrency: int = 0
    _flights: dict[int, _Flight] = field(default_factory=dict)
    _version: int = 0
    _dispatched: int = 0
    _clock: Any = None
    #: clients whose result waits in the buffer being filled: not idle until it is aggregated
    _buffered: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latency is None:
            raise ConfigError("asynchronous rounds need the virtual clock's latency model "
                              "([simulation] latency)")
        if not getattr(self.strategy, "asynchronous", False):
            raise ConfigError(f"strategy {self.strategy.name!r} is synchronous")
        k = int(self.strategy.params.buffer_size)
        self.concurrency = self.concurrency or self.config.cohort_size()
        if k > self.concurrency:
            raise ConfigError(f"strategy.buffer_size = {k} is larger than the concurrency "
                              f"({self.concurrency} clients training at once): the buffer "
                              "would never fill")
        if self.strategy.requires_individual_updates:  # pragma: no cover - fedbuff is sum-based
            raise ConfigError("asynchronous rounds aggregate sums")
        # FedBuff's buffer is not a random sample of the population: no sampling credit
        # (privacy/central.py accounts it with q = 1 and divides by K).
        q = getattr(self.privacy, "sample_rate", 1.0)
        if q != 1.0:
            raise ConfigError(f"the privacy layer assumes sampling at rate {q:g}; a buffer of "
                              "first arrivals is not a random sample")

    # ------------------------------------------------------------------ the schedule
    def run_round(self, rnd: int, *, attempt: int = 0) -> RoundRecord:
        """Fill the next buffer from the arrivals, then run steps 5-9 on it."""
        t0 = time.perf_counter()
        k = int(self.strategy.params.buffer_size)
        self.privacy.check_budget(rnd, k)
        if self._clock is None:
            self._clock = VirtualClock(start=self.virtual_time)
            self._start(self.concurrency, at=self.virtual_time)
        buffer: list[tuple[_Flight, float]] = []
        self._buffered = set()
        t_train = 0.0
        while len(buffer) < k:
            t_train += self._train_pending()
            if not len(self._clock):
                raise ConfigError("no client is in flight: every client dropped out")
            when, cid = self._clock.pop_finished()
            flight = self._flights.pop(cid)
            self._buffered.add(cid)
            self._start(1, at=when)  # a finished client is replaced at once
            weight = self.strategy.staleness_weight(  # type: ignore[attr-defined]
                self._version - flight.version)
            if flight.result is None:
                log.info("buffer %d: client %d dropped (%s)", rnd, cid, flight.failure)
            elif not bool(torch.isfinite(flight.result.update).all()):
                log.warning("buffer %d: client %d sent a non-finite update; it is excluded",
                            rnd, cid)
            elif weight <= 0:
                log.info("buffer %d: client %d's update is staler than max_staleness", rnd,
                         cid)
            else:
                buffer.append((flight, weight))
                continue
            self._buffered.discard(cid)  # it left nothing in the buffer
        self.virtual_time = float(self._clock.now)
        t_train += self._train_pending()  # clients started from this model train on it
        self._buffered = set()
        batch = self._buffer_batch(buffer)
        self._row_extras = {"mean_staleness": float(np.mean([self._version - f.version
                                                              for f, _ in buffer]))}
        record = self.complete_round(rnd, k, batch, t0=t0, train_s=t_train)
        self._version += 1
        return record

    def _start(self, n: int, *, at: float) -> None:
        """Start ``n`` idle clients at virtual time ``at`` from the current model."""
        # A client contributes at most once to a buffer: one SecAgg instance has one input per
        # client, and client-level DP's sensitivity (one clipped update) assumes it.
        busy = set(self._flights) | self._buffered
        idle = np.array([c for c in range(self.num_clients) if c not in busy])
        if not len(idle):
            return
        rng = derive_rng(self.config.run.seed, "fedbuff-dispatch", self._dispatched)
        chosen = rng.choice(idle, size=min(n, len(idle)), replace=False)
        instructions = self.strategy.configure_round(self._version + 1)
        nbytes = 4 * int(self.params.numel())
        for cid in (int(c) for c in chosen):
            task = self._task(cid, self._version + 1, instructions)
            task.seed = derive_seed(self.config.run.seed, "fedbuff-client", self._dispatched,
                                    cid)
            d = self.latency.durations([cid], self._dispatched, num_samples=[
                self.config.client.epochs * self.client_sizes[cid]], bytes_up=nbytes,
                bytes_down=nbytes)
            self._clock.start(cid, duration=float(d.total[0]), at=at)
            self._flights[cid] = _Flight(task=task, version=self._version)
            self._dispatched += 1

    def _train_pending(self) -> float:
        """Train every client in flight that started from the current model, at once."""
        pending = [f for f in self._flights.values() if not f.trained]
        if not pending:
            return 0.0
        t = time.perf_counter()
        outcome = self.executor.run_cohort([f.task for f in pending])
        rows = {cid: i for i, cid in enumerate(outcome.batch.client_ids)}
        results = outcome.batch.results() if rows else []
        for f in pending:
            f.trained = True
            row = rows.get(f.task.client_id)
            if row is None:
                f.failure = outcome.failures.get(f.task.client_id, "no result")
            else:
                f.result = results[row]
        return time.perf_counter() - t

    def _buffer_batch(self, buffer: list[tuple[_Flight, float]]) -> ResultBatch:
        """The buffer as one batch, each update scaled by its staleness weight s(τ)."""
        results = []
        for flight, weight in buffer:
            r = flight.result
            if r is None:  # pragma: no cover - dropped arrivals never enter the buffer
                continue
            results.append(ClientResult(
                client_id=r.client_id, update=r.update * weight, num_examples=r.num_examples,
                num_steps=r.num_steps, metrics=r.metrics, aux=r.aux, new_state=r.new_state,
                info=r.info))
        device = getattr(self.executor, "device", None) or torch.device("cpu")
        return ResultBatch.from_results(results, dim=int(self.params.numel()), device=device)

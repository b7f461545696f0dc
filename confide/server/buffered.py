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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch

from confide.clock import VirtualClock
from confide.exceptions import ConfigError, RoundFailedError
from confide.round import ClientResult, ClientTask, ResultBatch
from confide.seeding import derive_rng, derive_seed
from confide.server.coordinator import Coordinator, RoundRecord

__all__ = ["BufferedCoordinator", "ArrivalCoordinator"]

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

    #: durations come from the latency model (the virtual clock); False: real arrivals
    needs_latency: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.latency is None and self.needs_latency:
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
            # after a resume the model is the one of `completed_rounds` server updates
            self._version = self.completed_rounds
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


@runtime_checkable
class ArrivalExecutor(Protocol):
    """An executor that sends tasks without waiting and reports outcomes as they arrive
    (:class:`confide.server.flower_app.GridExecutor`).
    """

    def submit(self, tasks: Sequence[ClientTask]) -> None:
        """Send ``tasks``; do not wait for them."""

    def arrivals(self, timeout: float) -> list[tuple[int, ClientResult | None, str]]:
        """``(client id, result or None, why not)`` in arrival order; waits up to
        ``timeout`` for the first.
        """


@dataclass
class ArrivalCoordinator(BufferedCoordinator):
    """FedBuff on real arrivals (deployment): clients receive work as they become free.

    The executor sends tasks without waiting (``submit``) and hands back outcomes in the
    order they arrive (``arrivals``; :class:`confide.server.flower_app.GridExecutor`). The
    schedule is Alg. 1 of Nguyen et al. 2022 in wall-clock time: ``concurrency`` clients
    train at once, each from the model current when its task was sent; every arrival is
    weighted by its staleness and buffered; after ``buffer_size`` of them the buffer is one
    round of :meth:`Coordinator.complete_round`. A client is sent a new task as soon as it is
    free: it has answered and its result is not waiting in the buffer being filled (it
    contributes at most once to a buffer). A client whose task failed rests until the next
    server update, so an unreachable node is not asked again and again. No task is sent
    that the buffers still to fill cannot use (the run's last clients are not left training
    for nothing).
    """

    needs_latency: ClassVar[bool] = False
    #: seconds to wait for the next arrival before the buffer counts as lost
    arrival_timeout_s: float = 600.0
    _resting: set[int] = field(default_factory=set)
    _leftover: list[tuple[int, Any, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.executor, ArrivalExecutor):
            raise ConfigError(f"executor {self.executor.name!r} cannot send tasks without "
                              "waiting; asynchronous rounds on real arrivals need one that can")
        self._arrivals: ArrivalExecutor = self.executor

    def run_round(self, rnd: int, *, attempt: int = 0) -> RoundRecord:
        """Fill the next buffer from real arrivals, then run steps 5-9 on it."""
        t0 = time.perf_counter()
        k = int(self.strategy.params.buffer_size)
        self.privacy.check_budget(rnd, k)
        self._resting = set()
        self._buffered = set()
        if not self._flights and not self._leftover:  # the start, or a resume
            self._version = self.completed_rounds
        buffer: list[tuple[_Flight, float]] = []
        self._top_up(rnd, 0)
        while len(buffer) < k:
            if not self._flights and not self._leftover:
                raise RoundFailedError(f"buffer {rnd}: no client is in flight ({len(buffer)} "
                                       f"of {k} results buffered); every client is gone")
            outcomes = self._leftover or self._arrivals.arrivals(
                timeout=self.arrival_timeout_s)
            if not outcomes:
                raise RoundFailedError(f"buffer {rnd}: no client answered within "
                                       f"{self.arrival_timeout_s:g} s")
            # arrivals past a full buffer wait for the next one, in their order
            self._leftover = []
            for i, (cid, result, why) in enumerate(outcomes):
                if len(buffer) >= k:
                    self._leftover = outcomes[i:]
                    break
                flight = self._flights.pop(cid, None)
                if flight is None:  # pragma: no cover - an answer to no task of ours
                    continue
                weight = self.strategy.staleness_weight(  # type: ignore[attr-defined]
                    self._version - flight.version)
                if result is None:
                    log.info("buffer %d: client %d dropped (%s)", rnd, cid, why)
                    self._resting.add(cid)
                elif weight > 0 and bool(torch.isfinite(result.update).all()):
                    flight.result = result
                    buffer.append((flight, weight))
                    self._buffered.add(cid)
                else:
                    log.info("buffer %d: client %d's update is excluded (stale or non-finite)",
                             rnd, cid)
            self._top_up(rnd, len(buffer))
        self._buffered = set()
        batch = self._buffer_batch(buffer)
        self._row_extras = {"mean_staleness": float(np.mean([self._version - f.version
                                                              for f, _ in buffer]))}
        record = self.complete_round(rnd, k, batch, t0=t0, train_s=time.perf_counter() - t0)
        self._version += 1
        self._resting = set()
        self._top_up(rnd + 1, 0)  # the buffered clients are free again: they get the new model
        return record

    def _top_up(self, rnd: int, filled: int) -> None:
        """Send tasks to idle clients until ``concurrency`` are in flight, but never more
        than the buffers still to fill need (``filled`` results wait in buffer ``rnd``): a
        task no buffer uses would cost a client its work and the network its bytes.
        """
        k = int(self.strategy.params.buffer_size)
        needed = (self.config.run.rounds - rnd + 1) * k - filled
        busy = set(self._flights) | self._buffered | self._resting
        idle = np.array([c for c in range(self.num_clients) if c not in busy])
        n = min(self.concurrency - len(self._flights), len(idle), needed - len(self._flights))
        if n <= 0:
            return
        rng = derive_rng(self.config.run.seed, "fedbuff-dispatch", self._dispatched)
        instructions = self.strategy.configure_round(self._version + 1)
        tasks = []
        for cid in (int(c) for c in rng.choice(idle, size=n, replace=False)):
            task = self._task(cid, self._version + 1, instructions)
            task.seed = derive_seed(self.config.run.seed, "fedbuff-client", self._dispatched,
                                    cid)
            self._flights[cid] = _Flight(task=task, version=self._version, trained=True)
            self._dispatched += 1
            tasks.append(task)
        self._arrivals.submit(tasks)

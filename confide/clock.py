"""A virtual clock: simulated time, advanced by events rather than by waiting.

Simulated runs measure progress in simulated wall-clock seconds: each client's task has a
duration (from :mod:`confide.simulations.latency`), and the clock jumps from one finish to
the next, so synchronous and asynchronous schedules compare deterministically. Ground floor:
the asynchronous coordinator (:mod:`confide.server.buffered`) and the simulation both use it.
"""

from __future__ import annotations

import heapq
import math

__all__ = ["VirtualClock"]


class VirtualClock:
    """An event queue of client tasks in virtual seconds (a heap of finish times).

    ``start`` schedules a client's task; ``pop_finished`` returns the earliest finish and moves
    ``now`` to it. Ties finish in the order they were started, so a run is deterministic.
    An asynchronous loop keeps ``concurrency`` clients in flight and restarts one per arrival:

    >>> clock = VirtualClock()
    >>> for client, seconds in [(0, 3.0), (1, 1.0), (2, 2.0)]:
    ...     _ = clock.start(client, duration=seconds)
    >>> clock.pop_finished()  # (virtual time, client): client 1 reports first
    (1.0, 1)
    >>> clock.start(1, duration=5.0)  # it starts again from the model current at now = 1.0
    6.0
    >>> [clock.pop_finished() for _ in range(3)]
    [(2.0, 2), (3.0, 0), (6.0, 1)]
    """

    def __init__(self, *, start: float = 0.0) -> None:
        """A clock at ``start`` seconds with nothing in flight."""
        self._now = float(start)
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0
        self._in_flight: set[int] = set()

    @property
    def now(self) -> float:
        """Virtual seconds since the run began."""
        return self._now

    def __len__(self) -> int:
        """Tasks in flight."""
        return len(self._heap)

    def in_flight(self, client_id: int) -> bool:
        """Whether ``client_id`` has a task that has not finished."""
        return int(client_id) in self._in_flight

    def start(self, client_id: int, *, duration: float, at: float | None = None) -> float:
        """Start ``client_id``'s task at ``at`` (default: now); return its finish time."""
        begin = self._now if at is None else float(at)
        if begin < self._now:
            raise ValueError(f"cannot start a task at {begin} s, before now ({self._now} s)")
        if not math.isfinite(duration) or duration < 0:
            raise ValueError(f"a task's duration must be finite and >= 0, got {duration}")
        cid = int(client_id)
        if cid in self._in_flight:
            raise ValueError(f"client {cid} is already training")
        finish = begin + float(duration)
        heapq.heappush(self._heap, (finish, self._seq, cid))
        self._seq += 1
        self._in_flight.add(cid)
        return finish

    def peek(self) -> tuple[float, int] | None:
        """The next (finish time, client id) without removing it; None when idle."""
        return (self._heap[0][0], self._heap[0][2]) if self._heap else None

    def pop_finished(self) -> tuple[float, int]:
        """Remove the earliest-finishing task; advance ``now`` to its finish time."""
        if not self._heap:
            raise IndexError("no client task is in flight")
        finish, _, cid = heapq.heappop(self._heap)
        self._in_flight.discard(cid)
        self._now = max(self._now, finish)
        return finish, cid

    def pop_until(self, time: float) -> list[tuple[float, int]]:
        """Every task finished by ``time`` (in order), then ``now = max(now, time)``."""
        done = []
        while self._heap and self._heap[0][0] <= time:
            done.append(self.pop_finished())
        self._now = max(self._now, float(time))
        return done

    def advance(self, time: float) -> None:
        """Move ``now`` forward to ``time`` (never backwards) without popping anything."""
        if time < self._now:
            raise ValueError(f"cannot move the clock back from {self._now} s to {time} s")
        self._now = float(time)

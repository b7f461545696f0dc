"""Simulated wall-clock time: a latency model for clients and a virtual clock of events.

Synchronous and asynchronous runs are compared in *virtual* seconds, deterministically: a
client's task takes ``down_s`` (receive the model) + ``train_s`` + ``up_s`` (send its update),
drawn from a seeded model or replayed from a trace, and a :class:`VirtualClock` orders the
finish events. Nothing here sleeps or reads the real clock.

**The log-normal model** (``simulation.latency = "lognormal"``, the default). Cross-device
fleets are heavy-tailed: FedScale's device traces (Lai et al., ICML 2022, Sec. 3: compute
speeds from AI Benchmark, network throughput from MobiPerf) span more than an order of
magnitude, and FedScale's client completion time has this same shape, samples times seconds
per sample plus bytes over bandwidth. Production reports agree (Huba et al., "Papaya", MLSys
2022: long-tailed client execution times are why synchronous rounds wait on stragglers). A
multiplicative log-normal gives that tail. For client ``c`` on task ``t``::

    train_s = num_samples * train_s_per_sample * exp(speed * z_c + jitter * z_ct)
    up_s    = rtt_s + bytes_up / (up_bytes_per_s * exp(network * y_c + jitter * y_ct))
    down_s  = rtt_s + bytes_down / (down_bytes_per_s * exp(network * w_c + jitter * w_ct))

(``speed``, ``jitter``, ``network`` stand for the ``*_sigma`` settings), with ``z_c, y_c,
w_c`` standard normals fixed per client (slow phones stay slow) and ``z_ct, y_ct, w_ct``
fresh per task, all from :func:`confide.seeding.derive_rng` keyed by (run seed,
client, task), so a client's durations do not depend on who else is asked at the same time.

Defaults (``[simulation] latency_*``; chosen, not measured, at the scale of the sources above):
``train_s_per_sample = 0.005`` (a small CNN on a phone CPU, a few ms per example);
``speed_sigma = 0.7`` (the 5th-95th percentile of device speed span 10x, FedScale's order of
magnitude); ``jitter_sigma = 0.25`` (about +-28% from task to task); ``up_bytes_per_s = 1.25e6``
and ``down_bytes_per_s = 5e6`` (10 and 40 Mbit/s medians, mobile uplinks being several times
slower than downlinks); ``network_sigma = 0.8``; ``rtt_s = 0.1`` per message. FedBuff's own
experiments (Nguyen et al., AISTATS 2022) draw client durations from a half-normal; the
log-normal's longer tail is the harder case for a synchronous round.

**A trace** (``simulation.latency = "trace"``, ``simulation.latency_trace = "file.csv"``): a CSV
with the columns ``client_id, train_s, up_s, down_s`` (others are ignored), one or more rows per
client; task ``t`` of a client replays its row ``t mod rows``. Measured seconds are replayed as
they are: ``num_samples`` and the byte counts do not change them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from confide.clock import VirtualClock
from confide.exceptions import ConfigError
from confide.seeding import keyed_normals

if TYPE_CHECKING:
    from confide.config import Config

__all__ = [
    "TaskDurations",
    "LatencyModel",
    "LogNormalLatency",
    "TraceLatency",
    "VirtualClock",
    "windows",
]

ArrayLike = int | float | Sequence[int] | Sequence[float] | np.ndarray


@dataclass(frozen=True)
class TaskDurations:
    """Seconds each client's task takes, one entry per client asked (float64 arrays)."""

    down_s: np.ndarray
    train_s: np.ndarray
    up_s: np.ndarray

    @property
    def total(self) -> np.ndarray:
        """Receive, train and send: the time from a task's start to its update's arrival."""
        return self.down_s + self.train_s + self.up_s


def _per_client(value: ArrayLike, n: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or one value per client ({n}), "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{name} must be finite and non-negative")
    return arr


class LatencyModel:
    """How long clients take: :meth:`durations` for a list of clients on a task index."""

    @classmethod
    def from_config(cls, config: Config) -> LatencyModel:
        """The model ``[simulation] latency*`` describes, seeded by ``run.seed``."""
        sim = config.simulation
        if sim.latency == "trace":
            if not sim.latency_trace:
                raise ConfigError("simulation.latency = 'trace' needs simulation.latency_trace")
            return TraceLatency.from_csv(sim.latency_trace,
                                         num_clients=config.data.num_clients)
        return LogNormalLatency(
            seed=config.run.seed, train_s_per_sample=sim.latency_train_s_per_sample,
            speed_sigma=sim.latency_speed_sigma, jitter_sigma=sim.latency_jitter_sigma,
            up_bytes_per_s=sim.latency_up_bytes_per_s,
            down_bytes_per_s=sim.latency_down_bytes_per_s,
            network_sigma=sim.latency_network_sigma, rtt_s=sim.latency_rtt_s)

    def durations(self, client_ids: Sequence[int] | np.ndarray, task_index: ArrayLike, *,
                  num_samples: ArrayLike = 0, bytes_up: ArrayLike = 0,
                  bytes_down: ArrayLike = 0) -> TaskDurations:
        """Durations of each client's task.

        ``task_index`` is the round (synchronous) or each client's own task counter
        (asynchronous), one number or one per client. ``num_samples`` counts the examples the
        task processes (local examples times epochs); ``bytes_up`` / ``bytes_down`` are the
        message sizes (e.g. :func:`confide.compression.count_bytes`).
        """
        ids = np.asarray(client_ids, dtype=np.int64).reshape(-1)
        n = ids.size
        tasks = np.asarray(task_index, dtype=np.int64)
        tasks = np.full(n, int(tasks)) if tasks.ndim == 0 else tasks.reshape(-1)
        if tasks.shape != (n,) or (tasks < 0).any():
            raise ValueError("task_index must be a non-negative integer or one per client")
        return self._durations(ids, tasks, _per_client(num_samples, n, "num_samples"),
                               _per_client(bytes_up, n, "bytes_up"),
                               _per_client(bytes_down, n, "bytes_down"))

    def _durations(self, ids: np.ndarray, tasks: np.ndarray, samples: np.ndarray,
                   up: np.ndarray, down: np.ndarray) -> TaskDurations:
        raise NotImplementedError


@dataclass(frozen=True)
class LogNormalLatency(LatencyModel):
    """The seeded heavy-tailed model of the module docstring (defaults documented there)."""

    seed: int = 0
    train_s_per_sample: float = 0.005
    speed_sigma: float = 0.7
    jitter_sigma: float = 0.25
    up_bytes_per_s: float = 1.25e6
    down_bytes_per_s: float = 5.0e6
    network_sigma: float = 0.8
    rtt_s: float = 0.1

    def __post_init__(self) -> None:
        for name in ("train_s_per_sample", "up_bytes_per_s", "down_bytes_per_s"):
            if not getattr(self, name) > 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"simulation.latency_{name} must be a positive number")
        for name in ("speed_sigma", "jitter_sigma", "network_sigma", "rtt_s"):
            if not getattr(self, name) >= 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"simulation.latency_{name} must be a non-negative number")

    def client_factors(self, client_id: int) -> np.ndarray:
        """The client's persistent (speed, upload, download) standard normals."""
        return keyed_normals(self.seed, "latency", "client", keys=np.array([int(client_id)]),
                             width=3)[0]

    def _durations(self, ids: np.ndarray, tasks: np.ndarray, samples: np.ndarray,
                   up: np.ndarray, down: np.ndarray) -> TaskDurations:
        # Counter-based normals keyed by (client) and (client, task): a client's time is
        # independent of the rest of the call, and a cohort costs array operations only.
        fixed = keyed_normals(self.seed, "latency", "client", keys=ids, width=3)
        fresh = keyed_normals(self.seed, "latency", "task", keys=np.stack([ids, tasks], axis=1)
                              if ids.size else np.zeros((0, 2), dtype=np.int64), width=3)
        speed = np.exp(self.speed_sigma * fixed[:, 0] + self.jitter_sigma * fresh[:, 0])
        up_bw = self.up_bytes_per_s * np.exp(self.network_sigma * fixed[:, 1]
                                             + self.jitter_sigma * fresh[:, 1])
        down_bw = self.down_bytes_per_s * np.exp(self.network_sigma * fixed[:, 2]
                                                 + self.jitter_sigma * fresh[:, 2])
        return TaskDurations(down_s=self.rtt_s + down / down_bw,
                             train_s=samples * self.train_s_per_sample * speed,
                             up_s=self.rtt_s + up / up_bw)


_TRACE_COLUMNS = ("client_id", "train_s", "up_s", "down_s")


class TraceLatency(LatencyModel):
    """Replays a user's measured durations (module docstring)."""

    def __init__(self, rows: dict[int, np.ndarray], *, source: str = "the latency trace"):
        """``rows[client_id]`` is a ``[tasks, 3]`` array of (train_s, up_s, down_s)."""
        self.rows = rows
        self.source = source

    @classmethod
    def from_csv(cls, path: str | Path, *, num_clients: int | None = None) -> TraceLatency:
        """Read and validate a trace; every client ``0 .. num_clients-1`` must appear."""
        p = Path(path)
        where = f"latency trace {str(p)!r}"
        if not p.is_file():
            raise ConfigError(f"{where} not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{where} is not UTF-8 text") from None
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in reader.fieldnames or []]
        missing = [c for c in _TRACE_COLUMNS if c not in header]
        if missing:
            raise ConfigError(f"{where} lacks the column {missing[0]!r}; it needs: "
                              + ", ".join(_TRACE_COLUMNS))
        reader.fieldnames = header
        collected: dict[int, list[list[float]]] = {}
        try:
            records = list(reader)
        except csv.Error as exc:
            raise ConfigError(f"{where} is not valid CSV: {exc}") from None
        for line, record in enumerate(records, start=2):
            cid = _trace_int(record.get("client_id"), where, line)
            seconds = [_trace_seconds(record.get(c), c, where, line) for c in _TRACE_COLUMNS[1:]]
            collected.setdefault(cid, []).append(seconds)
        if not collected:
            raise ConfigError(f"{where} has no rows")
        if num_clients is not None:
            absent = [c for c in range(num_clients) if c not in collected]
            if absent:
                raise ConfigError(f"{where} has no row for client {absent[0]} ({len(absent)} of "
                                  f"data.num_clients = {num_clients} clients missing)")
        return cls({c: np.asarray(v, dtype=np.float64) for c, v in collected.items()},
                   source=where)

    def _durations(self, ids: np.ndarray, tasks: np.ndarray, samples: np.ndarray,
                   up: np.ndarray, down: np.ndarray) -> TaskDurations:
        out = np.zeros((ids.size, 3))
        for i, (c, t) in enumerate(zip(ids, tasks, strict=True)):
            rows = self.rows.get(int(c))
            if rows is None:
                raise ConfigError(f"{self.source} has no row for client {int(c)}")
            out[i] = rows[int(t) % rows.shape[0]]
        return TaskDurations(down_s=out[:, 2], train_s=out[:, 0], up_s=out[:, 1])


def _trace_int(text: str | None, where: str, line: int) -> int:
    try:
        value = int((text or "").strip())
    except ValueError:
        raise ConfigError(f"{where} line {line}: client_id = {text!r} is not a whole "
                          "number") from None
    if value < 0:
        raise ConfigError(f"{where} line {line}: client_id = {value} is negative")
    return value


def _trace_seconds(text: str | None, column: str, where: str, line: int) -> float:
    try:
        value = float((text or "").strip())
    except ValueError:
        raise ConfigError(f"{where} line {line}: {column} = {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} line {line}: {column} = {value} must be finite and >= 0")
    return value


# --------------------------------------------------------------------------- the clock


def windows(start_times: Sequence[float] | np.ndarray, width: float) -> list[np.ndarray]:
    """Group tasks whose start times fall in the same window of ``width`` seconds.

    A window opens at the earliest start not yet grouped and holds every start ``t`` with
    ``t < opening + width`` (``width = 0``: equal start times only). Returns positions into
    ``start_times``, windows in time order, each sorted by start time (stable), so the
    vectorized executor can train each group as one batch.
    """
    times = np.asarray(start_times, dtype=np.float64).reshape(-1)
    if not math.isfinite(width) or width < 0:
        raise ValueError(f"a window's width must be finite and >= 0, got {width}")
    if not np.isfinite(times).all():
        raise ValueError("start times must be finite")
    order = np.argsort(times, kind="stable")
    ordered = times[order]
    groups: list[np.ndarray] = []
    i = 0
    while i < order.size:
        opening = ordered[i]
        # Past every start < opening + width, and at least past the starts equal to opening.
        j = max(int(np.searchsorted(ordered, opening + width, side="left")),
                int(np.searchsorted(ordered, opening, side="right")))
        groups.append(order[i:j])
        i = j
    return groups

"""The contracts of one round: task, result batch, outcome, aggregate, Executor, Aggregator.

A ground-floor module: every runtime (in-process executors, the vectorized GPU package,
Flower's Grid) and every layer (client pipeline, privacy, secure aggregation, the coordinator)
speaks these types, so none of them needs to import another's room.

**The cohort is a batch** (DESIGN.md, "The cohort is a batch"): an executor returns the
round's results as one :class:`ResultBatch`, updates stacked ``[clients, dim]`` on the device
where they were trained, with per-client columns (client ids, example counts, steps, metrics,
aux vectors, new client state). Every per-client step of the coordinator is a tensor operation
on it. A deployment carries a batch of one per message (:class:`ClientResult` is that one-client
view) and stacks the replies with :meth:`ResultBatch.from_results`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "TrainSettings",
    "RoundInstructions",
    "ClientTask",
    "ClientResult",
    "ResultBatch",
    "CohortOutcome",
    "Aggregate",
    "Executor",
    "Aggregator",
    "RoundProgress",
    "PlainAggregator",
    "accept_finite",
    "accept_finite_with_sums",
    "sum_batch",
    "as_batch",
]

#: ``progress(done, total)``: called by executors as clients finish local training
RoundProgress = Callable[[int, int], None]


def column(values: Sequence[float], device: torch.device | str) -> torch.Tensor:
    """A per-client column of a :class:`ResultBatch`: float64 ``[n]`` on ``device``.

    Copied from pinned memory without blocking: a blocking host-to-device copy waits for
    every kernel queued before it (a host sync in the middle of the round).
    """
    host = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dev = torch.device(device)
    if dev.type == "cuda":
        return host.pin_memory().to(dev, non_blocking=True)
    return host.to(dev)


@dataclass(frozen=True)
class TrainSettings:
    """Local optimisation settings (from ``[client]``, possibly overridden per round)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"


@dataclass
class RoundInstructions:
    """What every client sampled in a round receives (besides the global weights).

    ``tensors`` are flat vectors sent to the clients (e.g. SCAFFOLD's server control variate);
    ``values`` are scalars (e.g. FedProx's ``mu``).
    """

    values: dict[str, float] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ClientTask:
    """What a sampled client receives for one round."""

    client_id: int
    server_round: int
    global_params: torch.Tensor
    instructions: RoundInstructions
    settings: TrainSettings
    seed: int
    client_state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: fault injection: leave the round after this many local steps
    drop_after_steps: int | None = None


@dataclass
class ClientResult:
    """One client's report: its (pipeline-processed) update, weight and metrics.

    The one-client view of a :class:`ResultBatch` (what one deployment message carries).
    """

    client_id: int
    update: torch.Tensor
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ResultBatch:
    """The results of a cohort, one row per reporting client, on the device they were trained.

    ``updates`` is ``[n, dim]``; ``num_examples``/``num_steps`` and every ``metrics`` column are
    ``[n]`` float64 tensors on the same device; ``aux`` and ``new_state`` columns are
    ``[n, d]``. ``info`` holds small host-side per-client reports (DP-SGD privacy events).
    ``client_ids`` is host-side: which clients report is known without a device sync.
    """

    client_ids: list[int]
    updates: torch.Tensor
    num_examples: torch.Tensor
    num_steps: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    new_state: dict[str, torch.Tensor] = field(default_factory=dict)
    info: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.client_ids)
        if not self.info:
            self.info = [{} for _ in range(n)]
        if self.updates.dim() != 2 or self.updates.shape[0] != n or len(self.info) != n:
            raise ValueError(f"a result batch of {n} clients needs updates [n, dim] and n "
                             f"info rows; got {tuple(self.updates.shape)} and {len(self.info)}")

    def __len__(self) -> int:
        return len(self.client_ids)

    @property
    def device(self) -> torch.device:
        """Where the batch lives."""
        return self.updates.device

    @property
    def dim(self) -> int:
        """Length of one update."""
        return int(self.updates.shape[1])

    @classmethod
    def empty(cls, dim: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype | None = None) -> ResultBatch:
        """A batch of no clients."""
        z = torch.zeros(0, dtype=torch.float64, device=device)
        return cls([], torch.zeros(0, dim, dtype=dtype, device=device), z, z.clone())

    @classmethod
    def from_results(cls, results: Sequence[ClientResult], *, dim: int | None = None,
                     device: torch.device | str | None = None) -> ResultBatch:
        """Stack one-client results (sequential executors, deployment replies)."""
        if not results:
            return cls.empty(dim or 0, device=device or "cpu")
        first = results[0]
        dev = torch.device(device) if device is not None else first.update.device
        updates = torch.stack([r.update.reshape(-1).to(dev) for r in results])
        metric_names = sorted(set().union(*(r.metrics for r in results)))
        return cls(
            client_ids=[int(r.client_id) for r in results],
            updates=updates,
            num_examples=column([r.num_examples for r in results], dev),
            num_steps=column([r.num_steps for r in results], dev),
            metrics={k: column([r.metrics.get(k, float("nan")) for r in results], dev)
                     for k in metric_names},
            aux={k: torch.stack([r.aux[k].reshape(-1).to(dev) for r in results])
                 for k in sorted(first.aux)},
            new_state={k: torch.stack([r.new_state[k].reshape(-1).to(dev) for r in results])
                       for k in sorted(first.new_state)},
            info=[dict(r.info) for r in results],
        )

    @staticmethod
    def concat(batches: Sequence[ResultBatch]) -> ResultBatch:
        """Rows of several batches (of one layout) in order."""
        batches = [b for b in batches if len(b)] or list(batches[:1])
        if len(batches) == 1:
            return batches[0]
        dev = batches[0].device

        def cat(key: str, col: Callable[[ResultBatch], Mapping[str, torch.Tensor]]
                ) -> dict[str, torch.Tensor]:
            return {k: torch.cat([col(b)[k].to(dev) for b in batches]) for k in col(batches[0])}

        return ResultBatch(
            client_ids=[c for b in batches for c in b.client_ids],
            updates=torch.cat([b.updates.to(dev) for b in batches]),
            num_examples=torch.cat([b.num_examples.to(dev) for b in batches]),
            num_steps=torch.cat([b.num_steps.to(dev) for b in batches]),
            metrics=cat("metrics", lambda b: b.metrics),
            aux=cat("aux", lambda b: b.aux),
            new_state=cat("new_state", lambda b: b.new_state),
            info=[i for b in batches for i in b.info],
        )

    def select(self, rows: Sequence[int]) -> ResultBatch:
        """The batch of the given row positions (host-side indices, no device sync)."""
        rows = list(rows)
        if rows == list(range(len(self))):
            return self
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        return ResultBatch(
            client_ids=[self.client_ids[i] for i in rows],
            updates=self.updates.index_select(0, idx),
            num_examples=self.num_examples.index_select(0, idx),
            num_steps=self.num_steps.index_select(0, idx),
            metrics={k: v.index_select(0, idx) for k, v in self.metrics.items()},
            aux={k: v.index_select(0, idx) for k, v in self.aux.items()},
            new_state={k: v.index_select(0, idx) for k, v in self.new_state.items()},
            info=[self.info[i] for i in rows],
        )

    def weights(self, weighting: str) -> torch.Tensor:
        """``examples``: FedAvg's n_k weighting; ``uniform``: 1 (needed for DP sensitivity)."""
        if weighting == "examples":
            return self.num_examples
        return torch.ones_like(self.num_examples)

    def result(self, row: int) -> ClientResult:
        """The one-client view of row ``row`` (host copies of its tensors)."""
        return ClientResult(
            client_id=self.client_ids[row],
            update=self.updates[row].detach().cpu(),
            num_examples=int(self.num_examples[row]),
            num_steps=int(self.num_steps[row]),
            metrics={k: float(v[row]) for k, v in self.metrics.items()},
            aux={k: v[row].detach().cpu() for k, v in self.aux.items()},
            new_state={k: v[row].detach().cpu() for k, v in self.new_state.items()},
            info=dict(self.info[row]),
        )

    def results(self) -> list[ClientResult]:
        """Every row as a :class:`ClientResult` (one device-to-host copy of the batch)."""
        host = self.to("cpu")
        return [host.result(i) for i in range(len(host))]

    def to(self, device: torch.device | str) -> ResultBatch:
        """The same batch on ``device``."""
        dev = torch.device(device)
        if self.device == dev:
            return self
        return ResultBatch(
            client_ids=list(self.client_ids), updates=self.updates.to(dev),
            num_examples=self.num_examples.to(dev), num_steps=self.num_steps.to(dev),
            metrics={k: v.to(dev) for k, v in self.metrics.items()},
            aux={k: v.to(dev) for k, v in self.aux.items()},
            new_state={k: v.to(dev) for k, v in self.new_state.items()},
            info=list(self.info))


@dataclass
class CohortOutcome:
    """What an executor returns: the batch of clients that reported, and who dropped out why."""

    batch: ResultBatch
    failures: dict[int, str] = field(default_factory=dict)
    #: clients trained and already summed elsewhere (other ranks): their finite rows'
    #: :func:`sum_batch`, all-reduced, so what travels does not grow with the cohort
    reduced: Aggregate | None = None


@dataclass
class Aggregate:
    """The sums a round's server update is computed from (on the batch's device)."""

    update_sum: torch.Tensor
    weight_sum: float | torch.Tensor
    count: int
    aux_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    #: what the mean divides by; central DP sets it to the *expected* cohort weight
    denominator: float | None = None
    #: client ids whose contributions are in the sum
    client_ids: list[int] = field(default_factory=list)
    #: set by strategies that combine individual updates (median, Krum): replaces the mean
    robust_update: torch.Tensor | None = None
    #: for the round's record, from clients summed elsewhere (other ranks):
    #: ``train_loss`` = sum n_i loss_i and ``num_examples`` = sum n_i
    metric_sums: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean_update(self) -> torch.Tensor:
        """``update_sum / denominator`` (the weighted mean by default)."""
        if self.robust_update is not None:
            return self.robust_update
        den = self.denominator if self.denominator is not None else self.weight_sum
        if isinstance(den, torch.Tensor):
            return self.update_sum / den.to(self.update_sum.dtype)
        return self.update_sum / (den or 1.0)

    def mean_aux(self) -> dict[str, torch.Tensor]:
        """Auxiliary vectors averaged over the contributing clients."""
        return {k: v / max(1, self.count) for k, v in self.aux_sum.items()}

    def to(self, device: torch.device | str) -> Aggregate:
        """The same aggregate with its tensors on ``device``."""
        dev = torch.device(device)
        self.update_sum = self.update_sum.to(dev)
        self.aux_sum = {k: v.to(dev) for k, v in self.aux_sum.items()}
        if isinstance(self.weight_sum, torch.Tensor):
            self.weight_sum = self.weight_sum.to(dev)
        return self

    def __add__(self, other: Aggregate) -> Aggregate:
        """The aggregate of two disjoint sets of clients (sums add)."""
        metric_sums = dict(other.metric_sums)
        for k, v in self.metric_sums.items():
            metric_sums[k] = v + metric_sums[k].to(v) if k in metric_sums else v
        return Aggregate(
            update_sum=self.update_sum + other.update_sum.to(self.update_sum),
            weight_sum=self.weight_sum + other.weight_sum, count=self.count + other.count,
            aux_sum={k: v + other.aux_sum[k].to(v) for k, v in self.aux_sum.items()},
            client_ids=sorted(self.client_ids + other.client_ids),
            metric_sums=metric_sums)


class Executor(ABC):
    """Runs a cohort's client tasks; returns the reporting clients' results as one batch."""

    name: str = "base"
    #: called as clients finish (set by the runner that shows progress); may stay None
    progress: RoundProgress | None = None

    @abstractmethod
    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:
        """Train every task's client; a dropped client appears in ``failures``."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Release resources (processes, GPU memory)."""

    def live_clients(self) -> Sequence[int] | None:
        """Client ids that can take part now (``None``: every client, as in simulation)."""
        return None

    def _report_progress(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)


class Aggregator(ABC):
    """Turns the round's result batch into an :class:`Aggregate` (DESIGN.md step 5)."""

    #: fault-injection stages this aggregator can drop clients at
    dropout_stages: tuple[str, ...] = ("training",)

    @abstractmethod
    def aggregate(self, batch: ResultBatch, *, server_round: int, weighting: str) -> Aggregate:
        """Sum the contributions of ``batch``'s clients."""


def accept_finite(batch: ResultBatch) -> tuple[ResultBatch, list[int]]:
    """Drop rows whose update or aux vectors are not finite (rejected, never averaged).

    Returns the kept batch and the rejected client ids. One device-to-host copy of an ``[n]``
    boolean mask: the round's one host sync outside evaluation.
    """
    kept, rejected, _ = accept_finite_with_sums(batch)
    return kept, rejected


def accept_finite_with_sums(batch: ResultBatch, columns: Sequence[torch.Tensor] = ()
                            ) -> tuple[ResultBatch, list[int], list[float]]:
    """:func:`accept_finite`, plus the sums over the kept rows of each ``[n]`` column, brought
    to the host in the same copy as the mask (so a round needs no second sync for them).
    """
    if not len(batch):
        return batch, [], [0.0 for _ in columns]
    ok = torch.isfinite(batch.updates).all(dim=1)
    for values in batch.aux.values():  # the aux-vector contract (strategies.aux_vectors)
        ok = ok & torch.isfinite(values.reshape(len(batch), -1)).all(dim=1).to(ok.device)
    host = ok.to(torch.float64)
    if columns:
        # where, not a product: a rejected row's NaN must not reach the sums
        sums = torch.stack([torch.where(ok, c.to(device=ok.device, dtype=torch.float64),
                                        0.0).sum() for c in columns])
        host = torch.cat([host, sums])
    copied: list[float] = host.tolist()
    finite = [v == 1.0 for v in copied[:len(batch)]]
    keep = [i for i, good in enumerate(finite) if good]
    rejected = [batch.client_ids[i] for i, good in enumerate(finite) if not good]
    return batch.select(keep), rejected, copied[len(batch):]


def sum_batch(batch: ResultBatch, *, weighting: str) -> Aggregate:
    """The plain sums of a batch, in float64 on its device: ``sum w_i u_i``, ``sum w_i``,
    and the aux vectors summed unweighted. Addition is order-independent to rounding, so
    ranks that each sum their own rows and all-reduce get the same aggregate.
    """
    w = batch.weights(weighting).to(torch.float64)
    dtype = batch.updates.dtype
    # float64 accumulation in row blocks: the cost of a float64 copy of [n, dim] without its
    # memory (16,000 LeNet updates would need 5.7 GB at once)
    total = torch.zeros(batch.dim, dtype=torch.float64, device=batch.device)
    step = max(1, (1 << 27) // max(1, batch.dim))
    for start in range(0, len(batch), step):
        rows = batch.updates[start:start + step].to(torch.float64)
        total.addmv_(rows.T, w[start:start + step])
    return Aggregate(
        update_sum=total.to(dtype), weight_sum=w.sum(), count=len(batch),
        aux_sum={k: v.to(torch.float64).sum(dim=0).to(v.dtype) for k, v in batch.aux.items()},
        client_ids=sorted(batch.client_ids))


def as_batch(results: ResultBatch | Sequence[ClientResult]) -> ResultBatch:
    """A batch, from a batch or from one-client results (a deployment's replies)."""
    return results if isinstance(results, ResultBatch) else ResultBatch.from_results(results)


class PlainAggregator(Aggregator):
    """Sums in the clear (a trusted coordinator)."""

    def aggregate(self, batch: ResultBatch | Sequence[ClientResult], *,  # type: ignore[override]
                  server_round: int, weighting: str) -> Aggregate:
        """:func:`sum_batch` of the whole batch."""
        return sum_batch(as_batch(batch), weighting=weighting)

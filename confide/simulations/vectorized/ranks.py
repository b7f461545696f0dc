"""Several ranks: ``simulation.world_size = N`` spreads each cohort over N processes.

One device each, through ``torch.distributed`` (NCCL on GPUs, gloo on the CPU). Rank 0 runs
the coordinator and trains its share; ranks 1..N-1 train theirs. What comes back depends on
what the round needs (the executor picks, see ``VectorizedExecutor``):

* **sums** (the default: plain sums suffice): each rank runs the client finalisation and
  pipeline (:func:`~confide.client.round.finish_cohort`), the finite check and
  :func:`~confide.round.sum_batch` on its own rows, and the ranks all-reduce one vector
  ``[sum w_i u_i, sum w_i, count, sum n_i loss_i, sum n_i, failures]``, so the bytes
  exchanged per round do not grow with the cohort;
* **rows**: each rank's raw update rows travel to rank 0, which finishes the whole cohort
  (robust aggregators, secure aggregation, per-client state or privacy events that must
  come back).

Per round rank 0 also broadcasts the global weights and a small task table (client ids,
seeds, sample and step counts: a few dozen bytes per client, no model-sized data), counted
apart as ``task_bytes``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle  # noqa: S403 - between this run's own spawned ranks, never a peer's bytes
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
from torch import nn

from confide.client.pipeline import ClientPipeline
from confide.client.trainer import TrainSettings
from confide.exceptions import ConfigError, DeviceError
from confide.privacy.base import SampleLevelDP
from confide.round import (
    Aggregate,
    ClientTask,
    ResultBatch,
    RoundInstructions,
    accept_finite,
    sum_batch,
)
from confide.simulations.vectorized.device import DeviceClock
from confide.simulations.vectorized.layout import ModelLayout
from confide.simulations.vectorized.options import VectorizedOptions
from confide.simulations.vectorized.results import finish_rows
from confide.simulations.vectorized.schedule import Job, training_order
from confide.simulations.vectorized.trainer import CohortTrainer, TrainOutput
from confide.strategies.base import Strategy

__all__ = ["RankPool", "FinishSpec", "ExchangeStats"]

log = logging.getLogger("confide")

#: scalars after ``sum w_i u_i`` in the all-reduced vector
_TAIL = ("weight_sum", "count", "train_loss", "num_examples", "failed")


@dataclass
class FinishSpec:
    """What a rank needs to finish its own rows (sums mode): the round's client pipeline."""

    server_round: int
    weighting: str
    pipeline: bytes  # pickled ClientPipeline (its state changes between rounds)


@dataclass
class ExchangeStats:
    """Bytes and time of one round's exchange between the ranks (rank 0's view)."""

    rank_bytes: int = 0  # global weights, sums or rows, corrections
    task_bytes: int = 0  # the task table
    clocks: list[DeviceClock] = field(default_factory=list)

    def seconds(self) -> float:
        """Seconds the collectives of the results exchange took (waits for the device)."""
        return sum(c.seconds() for c in self.clocks)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    """Broadcast a byte string from rank 0 (``data`` is None on the other ranks)."""
    import torch.distributed as dist

    length = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64,
                          device=device)
    dist.broadcast(length, src=0)
    if data is not None:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        dist.broadcast(buf, src=0)
        return data
    buf = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buf, src=0)
    return buf.cpu().numpy().tobytes()


def rank_sums(batch: ResultBatch | None, weighting: str, *, failed: bool,
              device: torch.device) -> tuple[int, torch.Tensor]:
    """A rank's contribution to the all-reduce: its finite rows' sums (float64)."""
    if batch is None or not len(batch) or failed:
        width = batch.dim if batch is not None and not failed else 0
        out = torch.zeros(width + len(_TAIL), dtype=torch.float64, device=device)
        out[-1] = float(failed)
        return width, out
    batch, rejected = accept_finite(batch)
    for cid in rejected:
        log.warning("client %d sent a non-finite update; it is excluded", cid)
    agg = sum_batch(batch, weighting=weighting)
    w = batch.num_examples
    tail = torch.stack([torch.as_tensor(agg.weight_sum, dtype=torch.float64, device=device),
                        torch.tensor(float(agg.count), dtype=torch.float64, device=device),
                        (w * batch.metrics["train_loss"]).sum(), w.sum(),
                        torch.zeros((), dtype=torch.float64, device=device)])
    return batch.dim, torch.cat([agg.update_sum.to(torch.float64), tail])


def _worker_tasks(jobs: Sequence[Job], settings: TrainSettings, server_round: int,
                  global_flat: torch.Tensor) -> list[ClientTask]:
    # what finish_cohort reads: ids, round and seeds (sums mode: no per-client state)
    return [ClientTask(client_id=j.client_id, server_round=server_round,
                       global_params=global_flat, instructions=RoundInstructions(),
                       settings=settings, seed=j.seed) for j in jobs]


@dataclass
class _WorkerPayload:
    """What a worker rank needs to train (pickled once, at start-up)."""

    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    partitions: list[np.ndarray]
    layout: ModelLayout
    options: VectorizedOptions
    dp_sgd: SampleLevelDP | None
    dtype: torch.dtype
    backend: str
    init_file: str
    world_size: int
    devices: list[str]


def _worker_main(rank: int, payload: _WorkerPayload) -> None:
    """A worker rank's process: serve rounds until rank 0 says stop, then leave at once.

    The process ends with ``os._exit`` instead of interpreter finalisation. A gloo loop
    thread can still be releasing a finished collective's tensors when the main thread
    returns; releasing a tensor Python dropped first takes the GIL, and finalisation ends
    threads that wait for the GIL by unwinding them through that destructor, which is
    ``std::terminate`` (SIGABRT: "terminate called without an active exception", seen as
    exit code -6 in CI, backtrace ``ProcessGroupGloo::runLoop`` -> ``~AsyncBroadcastWork``
    -> ``decref_pyobject`` -> ``PyThread_exit_thread``). Nothing is left to finalise here:
    the group was left and the logs are flushed first.
    """
    code = 1
    try:
        _worker_serve(rank, payload)
        code = 0
    except BaseException:  # noqa: BLE001 - reported here, the exit code tells rank 0
        log.exception("vectorized: worker rank %d stopped with an error", rank)
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _worker_serve(rank: int, payload: _WorkerPayload) -> None:
    """Join the group, train the jobs rank 0 broadcasts until it says stop, leave."""
    import torch.distributed as dist

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.set_default_dtype(payload.dtype)
    device = torch.device(payload.devices[rank])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(payload.backend, init_method=f"file://{payload.init_file}",
                            rank=rank, world_size=payload.world_size,
                            timeout=timedelta(hours=24))
    try:
        trainer = CohortTrainer(model=payload.model, x_train=payload.x_train.to(device),
                                y_train=payload.y_train.to(device),
                                partitions=payload.partitions, device=device,
                                layout=payload.layout, options=payload.options,
                                dp_sgd=payload.dp_sgd)
        while _worker_round(rank, trainer, payload, device):
            pass
    finally:
        dist.destroy_process_group()


def _worker_round(rank: int, trainer: CohortTrainer, payload: _WorkerPayload,
                  device: torch.device) -> bool:
    """One round on a worker rank; False when rank 0 says stop."""
    import torch.distributed as dist

    command = pickle.loads(_broadcast_bytes(None, device))  # noqa: S301 - rank 0's own
    if command["cmd"] == "stop":
        return False
    jobs: list[Job] = command["jobs"][rank]
    settings: TrainSettings = command["settings"]
    global_flat = torch.empty(payload.layout.size, dtype=payload.dtype, device=device)
    dist.broadcast(global_flat, src=0)
    corrections = None
    if command["corrections"][rank]:
        corrections = torch.empty(len(jobs), payload.layout.size, dtype=payload.dtype,
                                  device=device)
        dist.recv(corrections, src=0)
    finish: FinishSpec | None = command["finish"]
    out: TrainOutput | None = None
    try:
        out = trainer.train(jobs, settings, global_flat, corrections)
    except Exception:
        log.exception("vectorized: rank %d failed to train its clients", rank)
    if finish is None:  # rows mode: the raw rows travel to rank 0
        dist.send(torch.tensor([int(out is None)], dtype=torch.int64, device=device), dst=0)
        if out is not None and jobs:
            meta = torch.stack([out.loss_sum, out.correct.to(torch.float64)], dim=1)
            dist.send(meta, dst=0)
            dist.send(out.updates.contiguous(), dst=0)
        return True
    batch = None
    failed = out is None
    if out is not None and jobs:
        try:
            rows = [jobs[j] for j in out.order]
            pipeline: ClientPipeline = pickle.loads(finish.pipeline)  # noqa: S301
            # sums mode runs only for strategies without a client-side finalisation
            batch = finish_rows(_worker_tasks(rows, settings, finish.server_round,
                                              global_flat), rows, out.updates, out.loss_sum,
                                out.correct, settings=settings, strategy=Strategy(),
                                pipeline=pipeline, dp_sgd=payload.dp_sgd)
        except Exception:
            log.exception("vectorized: rank %d failed to finish its clients", rank)
            failed = True
    width, sums = rank_sums(batch, finish.weighting, failed=failed, device=device)
    w = torch.tensor([width], dtype=torch.int64, device=device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    width_all = int(w.item())
    if sums.numel() != width_all + len(_TAIL):  # no rows here: zeros of the agreed width
        tail = sums[-len(_TAIL):]
        sums = torch.cat([torch.zeros(width_all, dtype=torch.float64, device=device), tail])
    dist.all_reduce(sums)
    return True


class RankPool:
    """Ranks 1..N-1 of a ``torch.distributed`` group, each training on its own device."""

    def __init__(self, *, world_size: int, device: torch.device, model: nn.Module,
                 x_train: torch.Tensor, y_train: torch.Tensor,
                 partitions: Sequence[np.ndarray], layout: ModelLayout,
                 options: VectorizedOptions, dp_sgd: SampleLevelDP | None = None) -> None:
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if dist.is_initialized():
            raise ConfigError("simulation.world_size > 1 starts its own torch.distributed "
                              "group, but this process already has one")
        if device.type == "cuda":
            first = device.index if device.index is not None else torch.cuda.current_device()
            if first + world_size > torch.cuda.device_count():
                raise DeviceError(
                    f"simulation.world_size = {world_size} needs {world_size} GPUs from "
                    f"cuda:{first}, but {torch.cuda.device_count()} are visible")
            devices = [f"cuda:{first + r}" for r in range(world_size)]
            backend = "nccl"
            torch.cuda.set_device(first)  # NCCL talks through the current device
            device = torch.device(devices[0])
        else:
            devices = ["cpu"] * world_size
            backend = "gloo"
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off
        self.device = device
        self.world_size = world_size
        self._dir = tempfile.mkdtemp(prefix="confide-ranks-")
        init_file = os.path.join(self._dir, "rendezvous")
        payload = _WorkerPayload(model=copy.deepcopy(model).cpu(), x_train=x_train.cpu(),
                                 y_train=y_train.cpu(), partitions=list(partitions),
                                 layout=layout, options=options, dp_sgd=dp_sgd,
                                 dtype=torch.get_default_dtype(), backend=backend,
                                 init_file=init_file, world_size=world_size, devices=devices)
        ctx = mp.get_context("spawn")
        self.procs = []
        for rank in range(1, world_size):
            proc = ctx.Process(target=_worker_main, args=(rank, payload), daemon=True,
                               name=f"confide-rank-{rank}")
            proc.start()
            self.procs.append(proc)
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=0,
                                world_size=world_size, timeout=timedelta(hours=24))
        self._open = True

    def _check_alive(self) -> None:
        dead = [p.name for p in self.procs if not p.is_alive()]
        if dead:
            raise DeviceError(f"vectorized: worker process {dead[0]} exited; the run cannot "
                              "continue (see its log above)")

    def start_round(self, shards: list[list[Job]], settings: TrainSettings,
                    global_flat: torch.Tensor, corrections: list[torch.Tensor | None],
                    finish: FinishSpec | None, stats: ExchangeStats) -> None:
        """Send every rank its jobs, the global weights and its corrections.

        ``finish`` set: the ranks finish and sum their own rows (:meth:`reduce_sums`);
        None: they send their rows back (:meth:`gather_rows`).
        """
        import torch.distributed as dist

        self._check_alive()
        header = pickle.dumps({"cmd": "train", "jobs": shards, "settings": settings,
                               "corrections": [c is not None for c in corrections],
                               "finish": finish})
        _broadcast_bytes(header, self.device)
        stats.task_bytes += len(header) + 8
        weights = global_flat.to(self.device, torch.get_default_dtype()).contiguous()
        dist.broadcast(weights, src=0)
        stats.rank_bytes += _nbytes(weights)
        for rank in range(1, self.world_size):
            rows = corrections[rank]
            if rows is not None:
                rows = rows.to(self.device, torch.get_default_dtype()).contiguous()
                dist.send(rows, dst=rank)
                stats.rank_bytes += _nbytes(rows)

    def reduce_sums(self, width: int, dtype: torch.dtype, stats: ExchangeStats) -> Aggregate:
        """The other ranks' sums (rank 0 contributes zeros: its rows stay in its batch).

        Reading the reduced count is this exchange's one host read.
        """
        import torch.distributed as dist

        w = torch.tensor([width], dtype=torch.int64, device=self.device)
        dist.all_reduce(w, op=dist.ReduceOp.MAX)  # ranks without rows learn the width
        sums = torch.zeros(width + len(_TAIL), dtype=torch.float64, device=self.device)
        clock = DeviceClock(self.device)
        dist.all_reduce(sums)
        clock.lap()
        stats.clocks.append(clock)
        stats.rank_bytes += _nbytes(w) + _nbytes(sums)
        tail = dict(zip(_TAIL, sums[width:].tolist(), strict=True))
        if tail["failed"]:
            raise DeviceError("vectorized: a rank could not train its clients (see its log "
                              "above)")
        return Aggregate(update_sum=sums[:width].to(dtype), weight_sum=sums[width],
                         count=int(tail["count"]),
                         metric_sums={"train_loss": sums[width + 2],
                                      "num_examples": sums[width + 3]})

    def abandon_round(self, *, sums: bool, shards: list[list[Job]], size: int,
                      dtype: torch.dtype) -> None:
        """Rank 0 failed mid-round: it still takes part in the exchange the other ranks wait
        in, so that the group stays usable for ``close`` (the caller re-raises its error).
        """
        import torch.distributed as dist

        with contextlib.suppress(DeviceError):
            if not sums:
                self.gather_rows(shards, size, dtype, ExchangeStats())
                return
            w = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.all_reduce(w, op=dist.ReduceOp.MAX)
            width = int(w.item())
            sums_ = torch.zeros(width + len(_TAIL), dtype=torch.float64, device=self.device)
            sums_[-1] = 1.0  # rank 0 failed
            dist.all_reduce(sums_)

    def gather_rows(self, shards: list[list[Job]], size: int, dtype: torch.dtype,
                    stats: ExchangeStats) -> list[TrainOutput]:
        """Receive ranks 1..N-1's trained rows onto rank 0's device."""
        import torch.distributed as dist

        outputs, failed = [], []
        for rank in range(1, self.world_size):
            status = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.recv(status, src=rank)
            n = len(shards[rank])
            updates = torch.empty(n, size, dtype=dtype, device=self.device)
            meta = torch.zeros(n, 2, dtype=torch.float64, device=self.device)
            if int(status.item()):
                failed.append(rank)  # it sends nothing more this round
            elif n:
                clock = DeviceClock(self.device)
                dist.recv(meta, src=rank)
                dist.recv(updates, src=rank)
                clock.lap()
                stats.clocks.append(clock)
                stats.rank_bytes += _nbytes(meta) + _nbytes(updates)
            # the worker's trainer took its jobs in this order
            outputs.append(TrainOutput(updates, training_order(shards[rank]), meta[:, 0],
                                       meta[:, 1].to(torch.int64)))
        if failed:
            raise DeviceError(f"vectorized: rank {failed[0]} could not train its clients (see "
                              "its log above)")
        return outputs

    def close(self) -> None:
        """Stop the workers and leave the group."""
        import torch.distributed as dist

        if not self._open:
            return
        self._open = False
        try:
            if all(p.is_alive() for p in self.procs):
                _broadcast_bytes(pickle.dumps({"cmd": "stop"}), self.device)
        finally:
            # leave the group before joining: the workers leave theirs on "stop"
            if dist.is_initialized():
                dist.destroy_process_group()
            for p in self.procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
            shutil.rmtree(self._dir, ignore_errors=True)

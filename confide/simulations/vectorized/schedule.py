"""The schedule of a cohort's local training: who trains what, in which batches, on which rank.

* **Same batches as ``LocalTrainer.fit``.** Each client's batch order is
  :func:`confide.shuffle.epoch_orders` of the task's seed (counter-based: the whole chunk's
  permutations in one call, on the device), one permutation per epoch, the last partial batch
  kept; the chunk's batch indices are built on the device from the partitions, which live
  there (:class:`PartitionTable`): no per-client host work and no copy. DP-SGD's Poisson
  batches come from Opacus's own ``DPDataLoader``, seeded as ``DPSGDTrainer.fit`` seeds it,
  on the host, moved in one copy.
* **Unequal dataset sizes by masking and bucketing, never by dropping samples.** A client's
  batch is padded to the chunk's batch width with per-sample weights of 0, and the others carry
  ``1 / (real batch size)``; clients are sorted by their number of local steps, so a client
  whose steps are done leaves the active prefix of its chunk.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from confide.client.trainer import TrainSettings
from confide.shuffle import epoch_orders

__all__ = ["Job", "num_local_steps", "client_batches", "dp_sgd_steps_per_epoch",
           "dp_sgd_batches", "PartitionTable", "ChunkSchedule", "chunk_schedule",
           "training_order", "shard_jobs"]


@dataclass(frozen=True)
class Job:
    """One client's local training, as data (it travels to other ranks)."""

    slot: int
    client_id: int
    seed: int
    num_samples: int
    num_steps: int
    proximal_mu: float = 0.0
    has_correction: bool = False
    #: DP-SGD: Opacus's expected batch size ``int(n * q)`` (0 without DP-SGD)
    expected_batch_size: int = 0


def num_local_steps(num_samples: int, settings: TrainSettings) -> int:
    """Local steps ``LocalTrainer.fit`` takes on ``num_samples`` samples."""
    return settings.epochs * math.ceil(num_samples / settings.batch_size)


def client_batches(part: np.ndarray, seed: int, settings: TrainSettings) -> np.ndarray:
    """A client's batches as global sample indices, ``[steps, width]``, padded with -1.

    The order is ``LocalTrainer.fit``'s: :func:`~confide.shuffle.epoch_orders` of ``seed``,
    one permutation per epoch, consecutive slices of ``batch_size``, the last one partial.
    """
    n = len(part)
    if n == 0:
        return np.empty((0, 0), dtype=np.int64)
    orders = epoch_orders(torch.tensor([seed]), torch.tensor([n]), settings.epochs, n)[0]
    per_epoch = math.ceil(n / settings.batch_size)
    width = min(settings.batch_size, n)
    rows = np.full((settings.epochs * per_epoch, width), -1, dtype=np.int64)
    flat = np.full(per_epoch * width, -1, dtype=np.int64)
    for epoch in range(settings.epochs):
        flat[:n] = part[orders[epoch].numpy()]
        rows[epoch * per_epoch:(epoch + 1) * per_epoch] = flat.reshape(per_epoch, width)
    return rows


def dp_sgd_steps_per_epoch(num_samples: int, settings: TrainSettings) -> int:
    """Batches per epoch of Opacus's Poisson loader for ``LocalTrainer``'s batch size.

    ``DPDataLoader.from_data_loader`` samples with rate ``q = 1 / len(loader)`` and its sampler
    takes ``int(1 / q)`` steps (opacus ``UniformWithReplacementSampler``).
    """
    batches = max(1, math.ceil(num_samples / settings.batch_size))
    return int(1 / (1 / batches))


def dp_sgd_batches(part: np.ndarray, seed: int, settings: TrainSettings) -> np.ndarray:
    """A client's DP-SGD batches as global sample indices, ``[steps, width]``, padded with -1.

    Drawn by Opacus's own ``DPDataLoader`` (Poisson sampling) from the generator
    ``DPSGDTrainer.fit`` seeds, iterated once per epoch, so the batches are the ones the
    sequential DP-SGD trainer sees, empty batches included.
    """
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    from confide.seeding import derive_seed

    n = len(part)
    gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "dp-sgd-batches"))
    loader = DPDataLoader.from_data_loader(
        DataLoader(TensorDataset(torch.arange(n)), batch_size=settings.batch_size),
        generator=gen)
    batches = [part[idx.numpy()] for _ in range(settings.epochs) for (idx,) in loader]
    width = max((len(b) for b in batches), default=0)
    rows = np.full((len(batches), width), -1, dtype=np.int64)
    for i, b in enumerate(batches):
        rows[i, :len(b)] = b
    return rows


class PartitionTable:
    """The clients' partitions on a device: one flat index array and each client's offset.

    Built once per trainer (the data already lives on the device); a chunk's batches are
    gathered from it on the device. Flat, not padded to the largest partition: a skewed split
    (one client with most of the data) costs its sample count, not clients x largest size.
    ``parts`` keeps the host arrays (DP-SGD's sampler, sizes).
    """

    def __init__(self, partitions: Sequence[np.ndarray], device: torch.device) -> None:
        self.parts = [np.asarray(p, dtype=np.int64).reshape(-1) for p in partitions]
        self.sizes = np.array([len(p) for p in self.parts], dtype=np.int64)
        offsets = np.zeros(len(self.parts), dtype=np.int64)
        offsets[1:] = np.cumsum(self.sizes)[:-1]
        # one trailing 0: an empty last partition's offset still indexes inside the array
        flat = np.concatenate([*self.parts, np.zeros(1, dtype=np.int64)])
        self.device = device
        self.flat = torch.from_numpy(flat).to(device)
        self.offsets = torch.from_numpy(offsets).to(device)


@dataclass
class ChunkSchedule:
    """A chunk's batches: indices, per-sample weights, real batch sizes, active prefix."""

    index: torch.Tensor  # [C, S, B] global sample indices (padding points at sample 0)
    weight: torch.Tensor  # [C, S, B] 1/(real batch size), 0 for padding
    count: torch.Tensor  # [C, S] real batch sizes (float64, for the loss metric)
    active: list[int]  # clients still training at step s (a prefix: sorted by steps)
    uniform: bool  # every client active at every step, no padding


def chunk_schedule(jobs: Sequence[Job], partitions: PartitionTable, settings: TrainSettings,
                   device: torch.device, dtype: torch.dtype, *,
                   dp_sgd: bool = False) -> ChunkSchedule:
    """A chunk's batches on ``device``: built there (plain), or moved in one copy (DP-SGD)."""
    if dp_sgd:
        return _host_schedule(jobs, partitions, settings, device, dtype)
    bs, epochs = settings.batch_size, settings.epochs
    ids = np.array([j.client_id for j in jobs], dtype=np.int64)
    sizes = partitions.sizes[ids] if len(ids) else np.zeros(0, dtype=np.int64)
    per_epoch = -(-sizes // bs)
    lengths = epochs * per_epoch
    steps = int(lengths.max(initial=0))
    width = min(bs, int(sizes.max(initial=0)))
    active = [int((lengths > s).sum()) for s in range(steps)]
    uniform = bool(len(ids) and (lengths == steps).all() and (sizes == per_epoch * width).all())
    c, n_max = len(ids), int(sizes.max(initial=0))
    if c == 0 or steps == 0:
        zeros = torch.zeros((c, steps, width), device=device)
        return ChunkSchedule(zeros.to(torch.int64), zeros.to(dtype),
                             torch.zeros((c, steps), dtype=torch.float64, device=device),
                             active, uniform)
    host = np.stack([ids, np.array([j.seed for j in jobs], dtype=np.int64), sizes,
                     per_epoch])
    ids_d, seeds_d, sizes_d, pe_d = _to_device(host, device)
    orders = epoch_orders(seeds_d, sizes_d, epochs, n_max)  # [C, E, n_max]
    # positions past a client's size are dumped below; clamp them inside its partition
    last = (sizes_d - 1).clamp_min(0)[:, None, None]
    sample = partitions.flat[partitions.offsets[ids_d][:, None, None]
                             + torch.minimum(orders, last)]
    # epoch e of client i fills flat positions e * per_epoch_i * width + j, j < size_i
    j = torch.arange(n_max, device=device)[None, None, :]
    e = torch.arange(epochs, device=device)[None, :, None]
    pos = e * (pe_d[:, None, None] * width) + j
    dump = steps * width
    pos = torch.where(j < sizes_d[:, None, None], pos, dump)
    flat = torch.full((c, dump + 1), -1, dtype=torch.int64, device=device)
    flat.scatter_(1, pos.reshape(c, -1), sample.reshape(c, -1))
    index = flat[:, :dump].reshape(c, steps, width)
    mask = index >= 0
    count = mask.sum(-1)
    weight = mask.to(dtype) / count.clamp_min(1)[..., None].to(dtype)
    return ChunkSchedule(index.clamp_min(0), weight, count.to(torch.float64), active, uniform)


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on ``device`` without a host synchronisation (pinned, async)."""
    t = torch.from_numpy(np.ascontiguousarray(host))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" \
        else t.to(device)


def _host_schedule(jobs: Sequence[Job], partitions: PartitionTable, settings: TrainSettings,
                   device: torch.device, dtype: torch.dtype) -> ChunkSchedule:
    """DP-SGD's chunk schedule: Opacus's Poisson batches drawn on the host, one copy each."""
    index, lengths = _stacked([dp_sgd_batches(partitions.parts[j.client_id], j.seed, settings)
                               for j in jobs])
    steps = index.shape[1]
    mask = index >= 0
    count = mask.sum(-1)
    weight = mask / np.maximum(count, 1)[..., None]
    index[~mask] = 0
    active = [int((lengths > s).sum()) for s in range(steps)]
    uniform = bool(mask.all())
    return ChunkSchedule(_to_device(index, device), _to_device(weight, device).to(dtype),
                         _to_device(count.astype(np.float64), device), active, uniform)


def _stacked(per_client: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Clients' ``[steps, width]`` batches in one ``[C, S, B]`` array padded with -1."""
    steps = max((b.shape[0] for b in per_client), default=0)
    width = max((b.shape[1] for b in per_client), default=0)
    index = np.full((len(per_client), steps, width), -1, dtype=np.int64)
    for i, b in enumerate(per_client):
        index[i, : b.shape[0], : b.shape[1]] = b
    return index, np.array([b.shape[0] for b in per_client], dtype=np.int64)


def training_order(jobs: Sequence[Job]) -> list[int]:
    """The order a trainer takes jobs in (row ``r`` of its output is job ``order[r]``):
    most local steps first, so a chunk holds clients of similar length.
    """
    return sorted(range(len(jobs)), key=lambda i: (-jobs[i].num_steps, i))


def shard_jobs(jobs: Sequence[Job], world_size: int) -> list[list[Job]]:
    """Split jobs over ranks, longest first onto the least-loaded rank (LPT scheduling)."""
    shards: list[list[Job]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for job in sorted(jobs, key=lambda j: (-j.num_steps, j.slot)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        shards[r].append(job)
        load[r] += max(1, job.num_steps)
    return shards


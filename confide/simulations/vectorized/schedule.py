"""The schedule of a cohort's local training: who trains what, in which batches, on which rank.

* **Same batches as ``LocalTrainer.fit``.** Each client's batch order comes from
  ``torch.randperm`` with a CPU generator seeded by the task's seed, one permutation per
  epoch, the last partial batch kept; DP-SGD's Poisson batches come from Opacus's own
  ``DPDataLoader``, seeded as ``DPSGDTrainer.fit`` seeds it. All batch indices of a chunk are
  built at once and moved to the device in one copy; the data stays on the device.
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

__all__ = ["Job", "num_local_steps", "client_batches", "dp_sgd_steps_per_epoch",
           "dp_sgd_batches", "ChunkSchedule", "chunk_schedule", "training_order",
           "shard_jobs"]


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

    The order is ``LocalTrainer.fit``'s: ``torch.randperm`` from a CPU generator seeded with
    ``seed``, one permutation per epoch, consecutive slices of ``batch_size``, the last one
    partial.
    """
    n = len(part)
    if n == 0:
        return np.empty((0, 0), dtype=np.int64)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    per_epoch = math.ceil(n / settings.batch_size)
    width = min(settings.batch_size, n)
    rows = np.full((settings.epochs * per_epoch, width), -1, dtype=np.int64)
    flat = np.full(per_epoch * width, -1, dtype=np.int64)
    for epoch in range(settings.epochs):
        order = torch.randperm(n, generator=gen).numpy()
        flat[:n] = part[order]
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


@dataclass
class ChunkSchedule:
    """A chunk's batches: indices, per-sample weights, real batch sizes, active prefix."""

    index: torch.Tensor  # [C, S, B] global sample indices (padding points at sample 0)
    weight: torch.Tensor  # [C, S, B] 1/(real batch size), 0 for padding
    count: torch.Tensor  # [C, S] real batch sizes (float64, for the loss metric)
    active: list[int]  # clients still training at step s (a prefix: sorted by steps)
    uniform: bool  # every client active at every step, no padding


def chunk_schedule(jobs: Sequence[Job], partitions: Sequence[np.ndarray],
                   settings: TrainSettings, device: torch.device, dtype: torch.dtype, *,
                   dp_sgd: bool = False) -> ChunkSchedule:
    """A chunk's batches, padded to one width and moved to ``device`` in one copy each."""
    if dp_sgd:
        index, lengths = _stacked([dp_sgd_batches(np.asarray(partitions[j.client_id]), j.seed,
                                                  settings) for j in jobs])
    else:
        index, lengths = _plain_index(jobs, partitions, settings)
    steps = index.shape[1]
    mask = index >= 0
    count = mask.sum(-1)
    weight = mask / np.maximum(count, 1)[..., None]
    index[~mask] = 0
    active = [int((lengths > s).sum()) for s in range(steps)]
    uniform = bool(mask.all())
    pin = device.type == "cuda"

    def move(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(a).to(dt)
        return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

    return ChunkSchedule(move(index, torch.int64), move(weight, dtype),
                         move(count.astype(np.float64), torch.float64), active, uniform)


def _stacked(per_client: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Clients' ``[steps, width]`` batches in one ``[C, S, B]`` array padded with -1."""
    steps = max((b.shape[0] for b in per_client), default=0)
    width = max((b.shape[1] for b in per_client), default=0)
    index = np.full((len(per_client), steps, width), -1, dtype=np.int64)
    for i, b in enumerate(per_client):
        index[i, : b.shape[0], : b.shape[1]] = b
    return index, np.array([b.shape[0] for b in per_client], dtype=np.int64)


def _plain_index(jobs: Sequence[Job], partitions: Sequence[np.ndarray],
                 settings: TrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """:func:`client_batches` of every job, written straight into one ``[C, S, B]`` array.

    The same permutations (one generator, reseeded per client: the state of a fresh
    generator with that seed) without a per-client array: the host work of a chunk's
    schedule is one ``randperm`` and one gather per client and epoch.
    """
    bs, epochs = settings.batch_size, settings.epochs
    sizes = [len(partitions[j.client_id]) for j in jobs]
    lengths = np.array([epochs * math.ceil(n / bs) for n in sizes], dtype=np.int64)
    steps = int(lengths.max(initial=0))
    width = min(bs, max(sizes, default=0))
    index = np.full((len(jobs), steps, width), -1, dtype=np.int64)
    gen = torch.Generator(device="cpu")
    for i, (job, n) in enumerate(zip(jobs, sizes, strict=True)):
        if n == 0:
            continue
        part = np.asarray(partitions[job.client_id])
        gen.manual_seed(job.seed)
        per_epoch = math.ceil(n / bs)
        for epoch in range(epochs):
            # batch k of the epoch is row k: consecutive slices of batch_size (width is
            # batch_size whenever a client has more than one batch per epoch)
            rows = index[i, epoch * per_epoch:(epoch + 1) * per_epoch].reshape(-1)
            rows[:n] = part[torch.randperm(n, generator=gen).numpy()]
    return index, lengths


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


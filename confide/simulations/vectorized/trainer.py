"""The cohort trainer: many clients' local training at once on one device.

Every client runs exactly the local optimisation of :meth:`confide.client.LocalTrainer.fit`,
but a chunk's weights are stacked on a leading client axis and one ``vmap(grad(loss))`` call
computes every client's gradient of a local step at once. DP-SGD (when the privacy layer says
the clients train with it) is Opacus's step: per-sample gradients by a nested vmap, clipped,
summed, noised from each client's own generator.

Speed: chunks sized from the free device memory (halved and retried on out-of-memory, never a
crash), no host synchronisation inside a round (the updates stay on the device), optional
bfloat16 compute, CUDA graphs or ``torch.compile`` for the local step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call, grad, vmap

from confide.client.trainer import TrainSettings
from confide.exceptions import DeviceError
from confide.privacy.base import SampleLevelDP
from confide.simulations.vectorized.conv import lower_convolutions
from confide.simulations.vectorized.device import DeviceClock, cudnn_autotune, is_oom
from confide.simulations.vectorized.layout import ModelLayout
from confide.simulations.vectorized.optimizers import apply_local_update
from confide.simulations.vectorized.options import VectorizedOptions, autocast
from confide.simulations.vectorized.schedule import (
    ChunkSchedule,
    Job,
    PartitionTable,
    chunk_schedule,
    training_order,
)

__all__ = ["CohortTrainer", "TrainOutput"]

log = logging.getLogger("confide")


@dataclass
class _ChunkState:
    """The stacked weights and optimizer state of a chunk being trained."""

    weights: dict[str, torch.Tensor]  # trainable name -> [C, *shape]
    opt: list[dict[str, torch.Tensor]]  # momentum buffer, or Adam's two moments
    consts: dict[str, torch.Tensor]  # unbatched (buffers, frozen and unused parameters)
    global_view: dict[str, torch.Tensor]  # trainable name -> global weights [*shape]
    mu: torch.Tensor | None  # [C] proximal term
    correction: dict[str, torch.Tensor] | None  # [C, *shape]
    loss_sum: torch.Tensor  # [C] float64
    correct: torch.Tensor  # [C] int64
    #: DP-SGD: each client's noise generator and Opacus's expected batch size [C]
    noise_generators: list[torch.Generator] = field(default_factory=list)
    expected_batch_size: torch.Tensor | None = None


@dataclass
class _StaticChunk:
    """A chunk's state and step inputs in fixed buffers (what a CUDA graph reads and writes)."""

    key: tuple
    state: _ChunkState
    global_flat: torch.Tensor
    corrections: torch.Tensor | None
    index: torch.Tensor  # [C, B] the step's batch indices
    weight: torch.Tensor  # [C, B]
    count: torch.Tensor  # [C]
    active: torch.Tensor  # [C] bool
    graph: Any = None


@dataclass
class TrainOutput:
    """A trained set of jobs: per-job update rows and metric sums, on the training device."""

    updates: torch.Tensor  # [n, P] rows in ``order``
    order: list[int]  # row r holds job order[r]
    loss_sum: torch.Tensor  # [n] float64, by row
    correct: torch.Tensor  # [n] int64, by row


class CohortTrainer:
    """Trains many clients' local updates at once on one device (every rank has one)."""

    def __init__(self, *, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                 partitions: Sequence[np.ndarray], device: torch.device, layout: ModelLayout,
                 options: VectorizedOptions, dp_sgd: SampleLevelDP | None = None) -> None:
        self.device = device
        self.dp_sgd = dp_sgd
        self.x = x_train
        self.y = y_train
        self.partitions = PartitionTable(partitions, device)
        self.layout = layout
        self.options = options
        model = model.to(device)
        self.fmodel = lower_convolutions(model, layout.unfolded) if layout.unfolded else model
        self.fmodel.train()
        self.dtype = next((v.dtype for v in self.fmodel.state_dict().values()
                           if torch.is_floating_point(v)), torch.get_default_dtype())
        self._vgrad = vmap(grad(self._client_loss, has_aux=True), in_dims=(0, None, 0, 0, 0))
        # DP-SGD: per-sample gradients, a vmap over samples inside the vmap over clients
        self._vgrad_per_sample = vmap(vmap(grad(self._sample_loss, has_aux=True),
                                           in_dims=(None, None, 0, 0)),
                                      in_dims=(0, None, 0, 0))
        self._chunk_limit: dict[tuple, int] = {}
        self._step_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._step
        self._graphs_failed = False
        #: run the CUDA-graph path's masked full-chunk steps eagerly (tests it on the CPU)
        self._masked_steps = False
        self._static: _StaticChunk | None = None
        if options.compile == "torch-compile":
            self._step_fn = torch.compile(self._step, dynamic=False)
        #: the device time of the last :meth:`train` (read it after the round)
        self.last_clock: DeviceClock | None = None

    def _h2d(self, values: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without a host synchronisation (pinned, async)."""
        t = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ per-client loss
    def _client_loss(self, params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
                     xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        with autocast(self.device, self.options.mixed_precision):
            logits = functional_call(self.fmodel, (params, consts), (xb,))
        if logits.dtype != wb.dtype:
            logits = logits.to(wb.dtype)
        # per-sample weights: 1/(real batch size), 0 for padding -> the mean over the
        # client's own batch, as nn.CrossEntropyLoss() computes it in LocalTrainer
        loss = (F.cross_entropy(logits, yb, reduction="none") * wb).sum()
        correct = ((logits.argmax(-1) == yb) & (wb > 0)).sum()
        return loss, (loss.detach(), correct)

    def _sample_loss(self, params: dict[str, torch.Tensor], consts: dict[str, torch.Tensor],
                     x1: torch.Tensor, y1: torch.Tensor
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        with autocast(self.device, self.options.mixed_precision):
            logits = functional_call(self.fmodel, (params, consts), (x1.unsqueeze(0),))
        logits = logits.to(self.dtype)
        loss = F.cross_entropy(logits, y1.unsqueeze(0))
        return loss, (loss.detach(), logits.argmax(-1)[0] == y1)

    def _dp_sgd_gradients(self, state: _ChunkState, k: int, compute: dict[str, torch.Tensor],
                          xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor
                          ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Opacus's DP-SGD step for ``k`` clients: clip per-sample gradients, sum, add noise.

        Abadi et al., CCS 2016, Algorithm 1 ("flat" clipping of the whole per-sample gradient
        to ``max_grad_norm``), as ``opacus.optimizers.DPOptimizer`` implements it:
        ``clip_and_accumulate`` (factor ``min(1, C / (||g_i|| + 1e-6))``), ``add_noise``
        (``N(0, (z C)^2)`` per parameter, drawn in parameter order from the client's noise
        generator) and ``scale_grad`` (division by the expected batch size ``int(n q)``).
        """
        spec = self.dp_sgd
        if spec is None:  # pragma: no cover - only called with DP-SGD
            raise RuntimeError("DP-SGD gradients without DP-SGD settings")
        per_sample, (losses, hits) = self._vgrad_per_sample(compute, state.consts, xb, yb)
        mask = (wb > 0).to(self.dtype)
        norms = torch.stack([g.reshape(k, g.shape[1], -1).to(self.dtype).norm(2, dim=-1)
                             for g in per_sample.values()], dim=-1).norm(2, dim=-1)
        factor = (spec.max_grad_norm / (norms + 1e-6)).clamp(max=1.0) * mask  # padding: 0
        std = spec.noise_multiplier * spec.max_grad_norm
        ebs = state.expected_batch_size
        grads = {}
        for name, g in per_sample.items():
            summed = torch.einsum("cb,cb...->c...", factor, g.to(self.dtype))
            noise = torch.stack([torch.normal(0.0, std, size=tuple(summed.shape[1:]),
                                              generator=gen, device=self.device,
                                              dtype=self.dtype)
                                 for gen in state.noise_generators[:k]])
            scale = ebs[:k].view(-1, *([1] * (summed.dim() - 1)))  # type: ignore[index]
            grads[name] = (summed + noise) / scale
        count = mask.sum(-1)
        loss = (losses.to(self.dtype) * mask).sum(-1) / count.clamp(min=1)  # the batch mean
        correct = (hits & (wb > 0)).sum(-1)
        return grads, loss, correct

    # ------------------------------------------------------------------ one local step
    def _step(self, state: _ChunkState, k: int, xb: torch.Tensor, yb: torch.Tensor,
              wb: torch.Tensor, settings: TrainSettings, t: int,
              active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``t`` of the first ``k`` clients of the chunk: gradients, rule, optimizer.

        With ``active`` (a [k] mask), clients outside it keep their weights and optimizer
        state unchanged: fixed shapes for CUDA graphs when clients have unequal step counts.
        """
        names = list(state.weights)
        params = {n: state.weights[n][:k] for n in names}
        compute = params
        if self.options.mixed_precision == "bf16" and self.device.type == "cuda":
            # bf16 compute copies (fp32 masters): gradients come back in bf16, half the bytes
            compute = {n: p.to(torch.bfloat16) for n, p in params.items()}
        if self.dp_sgd is not None:
            grads, loss, correct = self._dp_sgd_gradients(state, k, compute, xb, yb, wb)
        else:
            grads, (loss, correct) = self._vgrad(compute, state.consts, xb, yb, wb)
        mutated = [params[n] for n in names] + [b[:k] for group in state.opt
                                                 for b in group.values()]
        saved = [x.clone() for x in mutated] if active is not None else []
        apply_local_update(params, grads, k=k, settings=settings, t=t, opt=state.opt,
                           mu=state.mu, global_view=state.global_view,
                           correction=state.correction)
        if active is not None:
            for x, old in zip(mutated, saved, strict=True):
                x.copy_(torch.where(active.view(-1, *([1] * (x.dim() - 1))), x, old))
        return loss, correct

    # ------------------------------------------------------------------ a chunk
    def _init_state(self, jobs: Sequence[Job], settings: TrainSettings,
                    global_flat: torch.Tensor, corrections: torch.Tensor | None) -> _ChunkState:
        c = len(jobs)
        weights, global_view, consts = {}, {}, {}
        for e in self.layout.entries:
            view = global_flat[e.start:e.stop].view(e.shape)
            if e.name in self.layout.trained:
                weights[e.name] = view.expand(c, *e.shape).clone()
                global_view[e.name] = view
            else:
                consts[e.name] = view
        n_opt = 2 if settings.optimizer == "adam" else (1 if settings.momentum else 0)
        opt = [{n: torch.zeros_like(w) for n, w in weights.items()} for _ in range(n_opt)]
        mu = None
        if any(j.proximal_mu for j in jobs):
            mu = self._h2d([j.proximal_mu for j in jobs], self.dtype)
        correction = None
        if corrections is not None:
            rows = corrections.to(self.device, self.dtype, non_blocking=True)
            correction = {e.name: rows[:, e.start:e.stop].view(c, *e.shape)
                          for e in self.layout.trainable}
        state = _ChunkState(weights, opt, consts, global_view, mu, correction,
                            torch.zeros(c, dtype=torch.float64, device=self.device),
                            torch.zeros(c, dtype=torch.int64, device=self.device))
        if self.dp_sgd is not None:
            from confide.seeding import derive_seed

            # DPSGDTrainer.fit's noise generator, one per client, on the training device
            state.noise_generators = [
                torch.Generator(device=self.device).manual_seed(
                    derive_seed(j.seed, "dp-sgd-noise")) for j in jobs]
            state.expected_batch_size = self._h2d(
                [float(j.expected_batch_size) for j in jobs], self.dtype)
        return state

    def _flat_updates(self, state: _ChunkState, global_flat: torch.Tensor) -> torch.Tensor:
        c = len(state.loss_sum)
        if len(self.layout.trained) == len(self.layout.entries):
            stacked = torch.cat([state.weights[e.name].reshape(c, -1)
                                 for e in self.layout.entries], dim=1)
            return stacked - global_flat  # get_flat_params(model) - global_params
        out = torch.zeros(c, self.layout.size, dtype=self.dtype, device=self.device)
        for e in self.layout.trainable:
            out[:, e.start:e.stop] = state.weights[e.name].reshape(c, -1) - \
                global_flat[e.start:e.stop]
        return out

    def train_chunk(self, jobs: Sequence[Job], settings: TrainSettings,
                    global_flat: torch.Tensor, corrections: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Train ``jobs`` (sorted by steps, descending) together: ``(updates, loss, correct)``."""
        sched = chunk_schedule(jobs, self.partitions, settings, self.device, self.dtype,
                          dp_sgd=self.dp_sgd is not None)
        steps = len(sched.active)
        graphs = (self.options.compile in ("auto", "cuda-graphs")
                  and self.device.type == "cuda" and settings.optimizer == "sgd" and steps > 1
                  and self.dp_sgd is None and not self._graphs_failed)
        compiled = self.options.compile == "torch-compile"
        if (graphs or compiled or self._masked_steps) and self.dp_sgd is None:
            # fixed shapes: a CUDA graph, or one torch.compile graph, serves every step
            static = self._static_chunk(jobs, sched, settings, global_flat, corrections)
            self._run_masked(static, sched, settings, graphed=graphs)
            state = static.state
            # copies: the cached state is refilled in place by the next chunk
            return (self._flat_updates(state, static.global_flat), state.loss_sum.clone(),
                    state.correct.clone())
        state = self._init_state(jobs, settings, global_flat, corrections)
        for t in range(steps):
            self._run_step(state, sched, settings, t)
        return self._flat_updates(state, global_flat), state.loss_sum, state.correct

    def _static_chunk(self, jobs: Sequence[Job], sched: ChunkSchedule, settings: TrainSettings,
                      global_flat: torch.Tensor, corrections: torch.Tensor | None
                      ) -> _StaticChunk:
        """The chunk's state in fixed buffers, refilled in place while its shape stays.

        A captured CUDA graph reads and writes these buffers, so it replays across chunks
        and rounds.
        """
        has_mu = any(j.proximal_mu for j in jobs)
        key = (len(jobs), sched.index.shape[2], settings, not sched.uniform, has_mu,
               corrections is not None)
        static = self._static
        if static is None or static.key != key:
            self._static = None  # free the previous buffers and graph first
            g = global_flat.clone()
            rows = (corrections.to(self.device, self.dtype).clone()
                    if corrections is not None else None)
            state = self._init_state(jobs, settings, g, rows)
            c, width = sched.index.shape[0], sched.index.shape[2]
            static = _StaticChunk(
                key=key, state=state, global_flat=g, corrections=rows,
                index=torch.zeros(c, width, dtype=torch.int64, device=self.device),
                weight=torch.zeros(c, width, dtype=self.dtype, device=self.device),
                count=torch.zeros(c, dtype=torch.float64, device=self.device),
                active=torch.zeros(c, dtype=torch.bool, device=self.device))
            self._static = static
            return static
        state = static.state
        static.global_flat.copy_(global_flat)
        for e in self.layout.trainable:
            state.weights[e.name].copy_(state.global_view[e.name].expand_as(
                state.weights[e.name]))
        for group in state.opt:
            for buf in group.values():
                buf.zero_()
        if state.mu is not None:
            state.mu.copy_(self._h2d([j.proximal_mu for j in jobs], self.dtype))
        if static.corrections is not None and corrections is not None:
            static.corrections.copy_(corrections)
        state.loss_sum.zero_()
        state.correct.zero_()
        return static

    def _run_step(self, state: _ChunkState, sched: ChunkSchedule, settings: TrainSettings,
                  t: int) -> None:
        k = sched.active[t]
        if k == 0:
            return
        idx = sched.index[:k, t]
        loss, correct = self._call_step(state, k, self.x[idx], self.y[idx],
                                        sched.weight[:k, t], settings, t, None)
        state.loss_sum[:k] += loss.to(torch.float64) * sched.count[:k, t]
        state.correct[:k] += correct

    def _call_step(self, state: _ChunkState, k: int, xb: torch.Tensor, yb: torch.Tensor,
                   wb: torch.Tensor, settings: TrainSettings, t: int,
                   active: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The (possibly torch.compile'd) step; a step that does not compile runs eagerly."""
        if settings.optimizer != "adam":
            t = 0  # only Adam's bias correction reads t: one compiled graph for every step
        try:
            return self._step_fn(state, k, xb, yb, wb, settings, t, active)
        except Exception as exc:
            if self._step_fn == self._step or is_oom(exc):
                raise
            log.warning("vectorized: torch.compile failed (%s: %s); running the local step "
                        "eagerly", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            self._step_fn = self._step
            return self._step(state, k, xb, yb, wb, settings, t, active)

    def _run_masked(self, static: _StaticChunk, sched: ChunkSchedule, settings: TrainSettings, *,
                    graphed: bool) -> None:
        """Every step on the whole chunk (fixed shapes), finished clients masked out.

        With ``graphed``, one step is captured as a CUDA graph (after a real step 0 as the
        warm-up capture needs, the first time a chunk of this shape trains) and replayed for
        every step: only the step's batch indices are copied in between, no Python or
        kernel-launch cost per step.
        """
        state = static.state
        c = state.loss_sum.shape[0]
        steps = len(sched.active)
        masked = static.key[3]
        lengths = self._h2d(sched.active, torch.int64)
        active_at = torch.arange(c, device=self.device)[None, :] < lengths[:, None]  # [S, C]

        def load(t: int) -> None:
            static.index.copy_(sched.index[:, t])
            static.weight.copy_(sched.weight[:, t])
            static.count.copy_(sched.count[:, t])
            static.active.copy_(active_at[t])

        def one_step(t: int) -> None:
            step = self._step if graphed else self._call_step
            loss, correct = step(state, c, self.x[static.index], self.y[static.index],
                                 static.weight, settings, t, static.active if masked else None)
            state.loss_sum.add_(loss.to(torch.float64) * static.count)
            state.correct.add_(correct)

        if not graphed:
            for t in range(steps):
                load(t)
                one_step(t)
            return
        first = 0
        if static.graph is None:
            load(0)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                one_step(0)  # the real step 0, on a side stream as capture requires
            torch.cuda.current_stream(self.device).wait_stream(side)
            first = 1
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    one_step(0)  # recorded, not run (SGD only: nothing depends on t)
            except Exception as exc:
                self._static = None
                if is_oom(exc):
                    raise
                self._graphs_failed = True
                log.warning("vectorized: CUDA graph capture failed (%s: %s); running steps "
                            "eagerly", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                for t in range(1, steps):
                    load(t)
                    one_step(t)
                return
            static.graph = graph
        for t in range(first, steps):
            load(t)
            static.graph.replay()

    # ------------------------------------------------------------------ memory
    def client_bytes(self, settings: TrainSettings) -> int:
        """Estimated device bytes one more client in a chunk costs."""
        item = torch.finfo(self.dtype).bits // 8
        n_opt = 2 if settings.optimizer == "adam" else (1 if settings.momentum else 0)
        trained = self.layout.trainable_numel
        width = min(settings.batch_size, int(self.partitions.sizes.max(initial=1)))
        # weights, gradient, temporaries, optimizer state; the update row; activations saved
        # for backward and their gradients; the batch itself
        weights = trained * item * (3 + n_opt) + self.layout.size * item
        if self.dp_sgd is not None:
            weights += trained * item * 2 * settings.batch_size  # per-sample gradients
        acts = self.layout.activation_numel * width * item * 4
        if self.options.compile in ("auto", "cuda-graphs") and self.device.type == "cuda":
            acts *= 2  # the captured graph's private pool beside the warm-up step's blocks
        data = math.prod(self.layout.sample_shape) * width * item
        return int(1.3 * (weights + acts + data)) + 1

    def free_bytes(self) -> int:
        """Bytes the device can still give a chunk."""
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            cached = (torch.cuda.memory_reserved(self.device)
                      - torch.cuda.memory_allocated(self.device))
            return int(0.85 * (free + cached))
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 4 << 30
        return int(0.5 * avail)

    def chunk_limit(self, settings: TrainSettings) -> int:
        """Clients per chunk for ``settings`` (configured, or from the free memory)."""
        key = (settings.batch_size, settings.optimizer, bool(settings.momentum))
        if key not in self._chunk_limit:
            if self.options.chunk_size:
                limit = self.options.chunk_size
            else:
                limit = max(1, self.free_bytes() // self.client_bytes(settings))
                log.info("vectorized: up to %d clients per chunk on %s (about %.1f MiB each)",
                         limit, self.device, self.client_bytes(settings) / 2**20)
            self._chunk_limit[key] = limit
        return self._chunk_limit[key]

    # ------------------------------------------------------------------ many chunks
    def train(self, jobs: Sequence[Job], settings: TrainSettings, global_flat: torch.Tensor,
              corrections: torch.Tensor | None = None) -> TrainOutput:
        """Train every job in chunks; one host synchronisation at the end.

        ``corrections`` holds one row per job (zeros where a job has none), or is None.
        Jobs are sorted by their number of steps so that a chunk holds clients of similar
        length; an out-of-memory chunk is halved and retried.
        """
        with cudnn_autotune(self.device):
            return self._train(jobs, settings, global_flat, corrections)

    def _train(self, jobs: Sequence[Job], settings: TrainSettings, global_flat: torch.Tensor,
               corrections: torch.Tensor | None) -> TrainOutput:
        n = len(jobs)
        order = training_order(jobs)
        updates = torch.empty(n, self.layout.size, dtype=self.dtype, device=self.device)
        loss_sum = torch.zeros(n, dtype=torch.float64, device=self.device)
        correct = torch.zeros(n, dtype=torch.int64, device=self.device)
        global_flat = global_flat.to(self.device, self.dtype)
        key = (settings.batch_size, settings.optimizer, bool(settings.momentum))
        clock = DeviceClock(self.device)
        pos = 0
        while pos < n:
            left = n - pos
            size = math.ceil(left / math.ceil(left / self.chunk_limit(settings)))  # even
            rows = order[pos:pos + size]
            chunk = [jobs[i] for i in rows]
            corr = corrections[rows] if corrections is not None else None
            try:
                upd, loss, corr_count = self.train_chunk(chunk, settings, global_flat, corr)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                del exc
                if size == 1:
                    raise DeviceError(
                        f"one client's local training does not fit in the memory of "
                        f"{self.device}; use a smaller model or batch, or another device"
                    ) from None
                self._chunk_limit[key] = max(1, size // 2)
                log.info("vectorized: out of memory with %d clients per chunk on %s; "
                         "retrying with %d", size, self.device, self._chunk_limit[key])
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            clock.lap()
            # device-to-device: the cohort's rows stay where they were trained
            updates[pos:pos + size].copy_(upd)
            loss_sum[pos:pos + size].copy_(loss)
            correct[pos:pos + size].copy_(corr_count)
            pos += size
        self.last_clock = clock
        return TrainOutput(updates, order, loss_sum, correct)

    @property
    def last_compute_s(self) -> float:
        """Seconds the device spent training in the last :meth:`train` (read after the round:
        on a GPU it waits for the device).
        """
        return self.last_clock.seconds() if self.last_clock is not None else 0.0

"""The ``vectorized`` executor: a whole cohort trained at once with ``torch.func``.

Every sampled client runs exactly the local optimisation of
:meth:`confide.client.LocalTrainer.fit`, but the cohort's weights are stacked on a leading
client axis and one ``vmap(grad(loss))`` call computes every client's gradient of a local step
at once (DESIGN.md, "Runtimes"). Results equal ``sequential``'s up to floating-point rounding:

* **Same batches.** Each client's batch order comes from ``torch.randperm`` with a CPU generator
  seeded by the task's seed, one permutation per epoch, the last partial batch kept, exactly as
  ``LocalTrainer.fit`` draws it. All batch indices of a chunk of clients are built at once and
  moved to the device in one copy; the data stays on the device.
* **Unequal dataset sizes by masking and bucketing, never by dropping samples.** A client's
  batch is padded to the chunk's batch width with per-sample weights of 0, and the others carry
  ``1 / (real batch size)``, so each client's loss is the mean over its own batch. Clients are
  sorted by their number of local steps and chunked in that order (bucketing); a client whose
  steps are done leaves the active prefix of its chunk and takes no further optimizer step.
* **Same optimizer.** SGD (momentum, weight decay) and Adam are the update rules of
  ``torch.optim.SGD`` / ``torch.optim.Adam``, applied with ``torch._foreach`` kernels to the
  stacked weights; the strategy's :class:`~confide.strategies.ClientRule` (FedProx's proximal
  term, SCAFFOLD's correction) is added to every gradient first, per client.
* **Same client logic after training.** ``strategy.client_finalize`` and the client pipeline
  (clipping, encoding, masking) run per client through :func:`confide.client.finish_client_task`,
  the function ``run_client_task`` uses; fault injection (``drop_after_steps``) drops the same
  clients with the same message.

What it cannot vectorise falls back to ``sequential`` with a logged message saying why, never a
silent change of results: BatchNorm (running statistics and batch coupling), dropout (its masks
come from the global RNG), tied weights, a trainer other than the plain ``LocalTrainer`` (e.g.
DP-SGD), an unknown optimizer, or a model whose vectorised gradients differ from its own
autograd gradients on a probe batch.

Speed: chunks sized from the free device memory (halved and retried on out-of-memory, never a
crash), no host synchronisation inside a round, per-client updates copied to pinned host memory
on a side stream, optional bfloat16 compute (``simulation.mixed_precision``), CUDA graphs or
``torch.compile`` for the local step (``simulation.compile``), and convolutions with per-client
weights run either as vmap's grouped convolution or as unfold + batched matmul
(``simulation.conv_lowering``; ``auto`` times both per layer on the GPU).

Scale-out: ``simulation.world_size = N`` spreads each cohort over N processes, one GPU each,
through ``torch.distributed`` (NCCL on GPUs, gloo on the CPU). Rank 0 runs the coordinator and
trains its share; the other ranks train theirs and send the per-client updates back, because
the aggregation path (clipping, secure aggregation, robust aggregators) needs each client's
update, not only their sum.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call, grad, vmap

from confide.client.round import ClientTask, finish_client_task
from confide.client.trainer import FitOutput, LocalTrainer, TrainSettings
from confide.exceptions import ClientDropped, ConfigError, DeviceError
from confide.round import ClientResult, CohortOutcome, ResultBatch
from confide.simulations.executors import (
    SequentialExecutor,
    SimulationContext,
    SimulationExecutor,
    register_executor,
)


@dataclass
class ClientOutcome:
    """One client's result, or why it has none."""

    client_id: int
    result: ClientResult | None = None
    failure: str | None = None


def _outcomes(cohort: CohortOutcome) -> list[ClientOutcome]:
    out = [ClientOutcome(r.client_id, result=r) for r in cohort.batch.results()]
    return out + [ClientOutcome(c, failure=f) for c, f in cohort.failures.items()]

__all__ = [
    "VectorizedExecutor",
    "VectorizedOptions",
    "CohortTrainer",
    "vectorization_blocker",
    "lower_convolutions",
    "conv_lowering_costs",
]

log = logging.getLogger("confide")

#: the message LocalTrainer's fault injection raises, so both executors report the same
DROP_MESSAGE = "client left mid-round (fault injection)"
_OPTIMIZERS = ("sgd", "adam")
# torch.optim.Adam's defaults, which LocalTrainer uses
_ADAM_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class VectorizedOptions:
    """The ``[simulation]`` knobs of this executor (see ``confide.config.SimulationConfig``)."""

    chunk_size: int = 0
    mixed_precision: str = "off"
    compile: str = "auto"
    conv_lowering: str = "auto"
    world_size: int = 1

    @classmethod
    def from_config(cls, config: Any) -> VectorizedOptions:
        """Read the options from a run config (defaults where it has none)."""
        sim = getattr(config, "simulation", None)
        return cls(**{f: getattr(sim, f) for f in cls.__dataclass_fields__ if hasattr(sim, f)})


# --------------------------------------------------------------------------- what vectorises

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def _is_dp_sgd_trainer(trainer: object) -> bool:
    # by name: importing confide.privacy.dpsgd would import opacus
    cls = type(trainer)
    return cls.__name__ == "DPSGDTrainer" and cls.__module__ == "confide.privacy.dpsgd"


@dataclass(frozen=True)
class DPSGDSpec:
    """DP-SGD as ``confide.privacy.dpsgd.DPSGDTrainer`` runs it through Opacus."""

    noise_multiplier: float
    max_grad_norm: float


def dp_sgd_spec(trainer: object) -> tuple[DPSGDSpec | None, str | None]:
    """The DP-SGD settings of ``trainer`` (None for plain training), or why not vectorised."""
    if not _is_dp_sgd_trainer(trainer):
        return None, None
    z = getattr(trainer, "noise_multiplier", None)
    if z is None or getattr(trainer, "target_epsilon", None) is not None:
        return None, ("DP-SGD with privacy.target_epsilon (per-client calibration and budget "
                      "checks) is not vectorised; set privacy.noise_multiplier alone")
    return DPSGDSpec(float(z), float(trainer.max_grad_norm)), None  # type: ignore[attr-defined]


def vectorization_blocker(model: nn.Module, trainer: LocalTrainer | None = None) -> str | None:
    """Why ``model`` (trained by ``trainer``) cannot be vectorised exactly, or None if it can."""
    if trainer is not None:
        if type(trainer) is not LocalTrainer and not _is_dp_sgd_trainer(trainer):
            return (f"the local trainer is {type(trainer).__name__}, which has no vectorised "
                    "equivalent")
        loss = trainer.loss_fn
        if not (type(loss) is nn.CrossEntropyLoss and loss.weight is None
                and loss.reduction == "mean" and loss.label_smoothing == 0.0):
            return "the trainer's loss is not plain mean cross-entropy"
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return (f"module {label!r} is BatchNorm: in training it couples the samples of a "
                    "batch and updates running statistics in place")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and \
                module.track_running_stats:
            return f"module {label!r} updates running statistics in place"
        if isinstance(module, _DROPOUT) and module.p > 0:
            return (f"module {label!r} is dropout: its masks come from the global random "
                    "generator, so they would differ from sequential training")
    seen: dict[int, str] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if not torch.is_floating_point(value):
            continue
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            return f"{name!r} and {seen[ptr]!r} share storage (tied weights)"
        seen[ptr] = name
    return None


# --------------------------------------------------------------------------- conv lowering


def _conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int]) -> torch.Tensor:
    """conv2d as unfold + one GEMM over the whole batch (vmap makes it a batched matmul).

    Under ``vmap`` over clients, ``F.conv2d`` with per-client weights becomes one grouped
    convolution with ``groups = clients``, which cuDNN runs slowly for few channels per group
    (measured on an H100: 1.7 TFLOP/s for LEAF's first conv). Here each client's convolution is
    one GEMM ``[C_out, C_in k k] @ [C_in k k, B L]`` over its unfolded batch; the weight
    gradient is one GEMM with the long ``B L`` inner dimension.
    """
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
        weight = weight.to(x.dtype)
    b, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [B, K, L]
    k, length = cols.shape[1], cols.shape[2]
    out = weight.reshape(c_out, k) @ cols.transpose(0, 1).reshape(k, b * length)
    if bias is not None:
        out = out + bias.to(out.dtype)[:, None]
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return out.reshape(c_out, b, h_out, w_out).transpose(0, 1)


class _UnfoldConv2d(nn.Conv2d):
    """A Conv2d computed by :func:`_conv2d_as_gemm` (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dim() != 4:
            return super().forward(x)
        return _conv2d_as_gemm(x, self.weight, self.bias, self.stride,  # type: ignore[arg-type]
                               self.padding, self.dilation)  # type: ignore[arg-type]


def _lowerable(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str))


def lower_convolutions(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose Conv2d modules ``names`` run as unfold + batched matmul."""
    model = copy.deepcopy(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if not _lowerable(old):
            continue
        new = _UnfoldConv2d(old.in_channels, old.out_channels, old.kernel_size,
                            stride=old.stride, padding=old.padding, dilation=old.dilation,
                            bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)
        new.load_state_dict(old.state_dict())
        new.train(old.training)
        setattr(parent, child, new)
    return model


def _conv_inputs(model: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The input shape (one sample) of every lowerable Conv2d, from one forward pass."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, module in model.named_modules():
        if _lowerable(module):
            def hook(_m: nn.Module, args: tuple, _out: Any, name: str = name) -> None:
                shapes[name] = tuple(args[0].shape[1:])
            hooks.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _time_cuda(fn: Callable[[], Any], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (cuDNN algorithm choice, allocator)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def conv_lowering_costs(model: nn.Module, sample: torch.Tensor, *, clients: int, batch: int,
                        mixed_precision: str = "off", repeats: int = 3
                        ) -> list[dict[str, Any]]:
    """Time forward + backward of each Conv2d of ``model`` under ``vmap`` over ``clients``
    with per-client weights, as vmap's grouped convolution and as unfold + batched matmul.

    ``sample`` is one input batch on the model's device (CUDA); returns one row per layer with
    the seconds of each lowering and the FLOPs of the layer (forward + backward, 3x forward).
    """
    device = sample.device
    rows = []
    for name, in_shape in _conv_inputs(model, sample[:1]).items():
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):  # pragma: no cover - _conv_inputs finds Conv2d
            continue
        x = torch.randn(clients, batch, *in_shape, device=device, dtype=sample.dtype)
        weights = {k: v.detach().expand(clients, *v.shape).clone()
                   for k, v in conv.named_parameters()}
        timings = {label: _time_vmapped(module, weights, x, mixed_precision, repeats)
                   for label, module in (("grouped", conv), ("unfold", _as_unfold(conv)))}
        out_numel = math.prod(conv(x[0, :1]).shape[1:])
        flops = 3 * 2 * clients * batch * out_numel * conv.in_channels * math.prod(
            conv.kernel_size)
        rows.append({"layer": name, "input": list(in_shape), "clients": clients,
                     "batch": batch, "grouped_s": timings["grouped"],
                     "unfold_s": timings["unfold"], "flops": flops})
    return rows


def _time_vmapped(module: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor,
                  mixed_precision: str, repeats: int) -> float:
    """Seconds of one vmapped forward + backward of ``module`` (NaN when out of memory)."""
    device = x.device

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:
        with _autocast(device, mixed_precision):
            return functional_call(module, p, (xb,)).float().square().mean()

    step = vmap(grad(loss))
    try:
        return _time_cuda(lambda: step(weights, x), device, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan")


def _as_unfold(conv: nn.Module) -> nn.Module:
    return lower_convolutions(nn.Sequential(conv), ["0"]).get_submodule("0")


@contextlib.contextmanager
def _cudnn_autotune(device: torch.device) -> Iterator[None]:
    """Let cuDNN pick the fastest algorithms for the chunk's fixed conv shapes."""
    if device.type != "cuda" or torch.backends.cudnn.deterministic:
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


@contextlib.contextmanager
def _autocast(device: torch.device, mixed_precision: str) -> Iterator[None]:
    if mixed_precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


# --------------------------------------------------------------------------- model layout


@dataclass(frozen=True)
class _Entry:
    """One floating-point state entry and where it lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    start: int
    stop: int
    trainable: bool


@dataclass(frozen=True)
class ModelLayout:
    """The flat-vector layout of a model (``confide.parameters`` order) and what trains."""

    entries: tuple[_Entry, ...]
    size: int
    sample_shape: tuple[int, ...]
    #: activation elements per sample (module outputs, unfolded inputs), for memory sizing
    activation_numel: int
    #: Conv2d modules run as unfold + batched matmul
    unfolded: tuple[str, ...] = ()

    @property
    def trainable(self) -> list[_Entry]:
        """The entries the optimizer updates."""
        return [e for e in self.entries if e.trainable]

    @property
    def trainable_numel(self) -> int:
        """Number of trained weights per client."""
        return sum(e.stop - e.start for e in self.entries if e.trainable)


def _layout(model: nn.Module, sample: torch.Tensor, unused: set[str],
            unfolded: Sequence[str]) -> ModelLayout:
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    entries, offset = [], 0
    for name, value in model.state_dict().items():
        if not torch.is_floating_point(value):
            continue
        n = value.numel()
        entries.append(_Entry(name, tuple(value.shape), offset, offset + n,
                              name in params and name not in unused))
        offset += n
    numel = 0
    hooks = []

    def count(module: nn.Module, args: tuple, out: Any) -> None:
        nonlocal numel
        if isinstance(out, torch.Tensor):
            numel += out.numel()
        if isinstance(module, nn.Conv2d) and args and isinstance(args[0], torch.Tensor):
            # the unfolded input of a lowered conv (or cuDNN's workspace of a grouped one)
            numel += args[0].numel() * math.prod(module.kernel_size)

    for module in model.modules():
        if not list(module.children()):
            hooks.append(module.register_forward_hook(count))
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in hooks:
            h.remove()
    return ModelLayout(tuple(entries), offset, tuple(sample.shape[1:]), numel, tuple(unfolded))


def _probe_model(model: nn.Module, fmodel: nn.Module, x: torch.Tensor, y: torch.Tensor
                 ) -> tuple[set[str], str | None]:
    """Unused parameters (no gradient in autograd), and why vmap disagrees with autograd.

    Compared in float64 on the CPU, so that GPU arithmetic (TF32 convolutions, different
    cuDNN algorithms) cannot pass for a semantic difference; on the model's device when the
    model does not run on the CPU.
    """
    try:
        cpu = torch.device("cpu")
        return _probe(copy.deepcopy(model).to(cpu, torch.float64),
                      copy.deepcopy(fmodel).to(cpu, torch.float64),
                      x[:2].to(cpu, torch.float64), y[:2].to(cpu), tol=1e-9)
    except _OwnBackwardFailed:
        pass
    try:
        return _probe(model, fmodel, x[:2], y[:2], tol=1e-2)
    except _OwnBackwardFailed as exc:  # the model itself does not train: sequential says so
        return set(), f"the model's own backward pass failed ({exc})"


class _OwnBackwardFailed(Exception):  # noqa: N818 - internal signal
    """The model's own forward/backward raised."""


def _probe(model: nn.Module, fmodel: nn.Module, xb: torch.Tensor, yb: torch.Tensor, *,
           tol: float) -> tuple[set[str], str | None]:
    model.train()
    fmodel.train()
    model.zero_grad(set_to_none=True)
    try:
        F.cross_entropy(model(xb), yb).backward()
    except Exception as exc:
        raise _OwnBackwardFailed(f"{type(exc).__name__}: {exc}") from None
    unused = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    ref = {n: p.grad.detach().clone() for n, p in model.named_parameters()
           if p.grad is not None}
    model.zero_grad(set_to_none=True)
    trained = {n: p.detach() for n, p in model.named_parameters() if n in ref}
    consts = {n: v.detach() for n, v in model.state_dict().items() if n not in trained}

    def loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(fmodel, (p, consts), (xb,)), yb)

    stacked = {n: v.expand(2, *v.shape).clone() for n, v in trained.items()}
    try:
        grads = vmap(grad(loss))(stacked, xb.expand(2, *xb.shape), yb.expand(2, *yb.shape))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return unused, f"the model cannot run under torch.func.vmap ({type(exc).__name__}: " \
                       f"{first})"
    for n, g in ref.items():
        scale = float(g.abs().max()) + 1e-12
        err = float((grads[n] - g).abs().max()) / scale
        if not math.isfinite(err) or err > tol:
            return unused, (f"vectorised gradients differ from the model's own for {n!r} "
                            f"(relative difference {err:.2e})")
    return unused, None


# --------------------------------------------------------------------------- the schedule


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
class _Schedule:
    """A chunk's batches: indices, per-sample weights, real batch sizes, active prefix."""

    index: torch.Tensor  # [C, S, B] global sample indices (padding points at sample 0)
    weight: torch.Tensor  # [C, S, B] 1/(real batch size), 0 for padding
    count: torch.Tensor  # [C, S] real batch sizes (float64, for the loss metric)
    active: list[int]  # clients still training at step s (a prefix: sorted by steps)
    uniform: bool  # every client active at every step, no padding


def _schedule(jobs: Sequence[Job], partitions: Sequence[np.ndarray], settings: TrainSettings,
              device: torch.device, dtype: torch.dtype, *, dp_sgd: bool = False) -> _Schedule:
    batches = dp_sgd_batches if dp_sgd else client_batches
    per_client = [batches(np.asarray(partitions[j.client_id]), j.seed, settings) for j in jobs]
    steps = max((b.shape[0] for b in per_client), default=0)
    width = max((b.shape[1] for b in per_client), default=0)
    index = np.full((len(jobs), steps, width), -1, dtype=np.int64)
    for i, b in enumerate(per_client):
        index[i, : b.shape[0], : b.shape[1]] = b
    mask = index >= 0
    count = mask.sum(-1)
    weight = mask / np.maximum(count, 1)[..., None]
    index[~mask] = 0
    lengths = np.array([b.shape[0] for b in per_client])
    active = [int((lengths > s).sum()) for s in range(steps)]
    uniform = bool(mask.all())
    pin = device.type == "cuda"

    def move(a: np.ndarray, dt: torch.dtype) -> torch.Tensor:
        t = torch.from_numpy(a).to(dt)
        return t.pin_memory().to(device, non_blocking=True) if pin else t.to(device)

    return _Schedule(move(index, torch.int64), move(weight, dtype),
                     move(count.astype(np.float64), torch.float64), active, uniform)


# --------------------------------------------------------------------------- the trainer


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
    """A trained set of jobs: per-job update rows (host memory) and metric sums."""

    updates: torch.Tensor  # [n, P] rows in ``order``
    order: list[int]  # row r holds job order[r]
    loss_sum: torch.Tensor  # [n] float64, by row
    correct: torch.Tensor  # [n] int64, by row

    def row_of(self) -> dict[int, int]:
        """Job index -> row."""
        return {j: r for r, j in enumerate(self.order)}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text
                                              or "can't allocate memory" in text)


class _Clock:
    """Device time of the training kernels, chunk by chunk.

    CUDA events on the compute stream (the copies to the host run on a side stream and are not
    counted); wall time on the CPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.laps: list[tuple[Any, Any]] = []
        self._mark = self._event()

    def _event(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self) -> None:
        """End of a chunk's training."""
        end = self._event()
        self.laps.append((self._mark, end))
        self._mark = self._event()

    def seconds(self) -> float:
        """Total training time (call after the device has synchronised)."""
        if not self.cuda:
            return sum(b - a for a, b in self.laps)
        for _, end in self.laps:
            end.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.laps) / 1e3


class CohortTrainer:
    """Trains many clients' local updates at once on one device (every rank has one)."""

    def __init__(self, *, model: nn.Module, x_train: torch.Tensor, y_train: torch.Tensor,
                 partitions: Sequence[np.ndarray], device: torch.device, layout: ModelLayout,
                 options: VectorizedOptions, dp_sgd: DPSGDSpec | None = None) -> None:
        self.device = device
        self.dp_sgd = dp_sgd
        self.x = x_train
        self.y = y_train
        self.partitions = partitions
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
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        #: seconds the device spent training in the last :meth:`train` (copies excluded)
        self.last_compute_s = 0.0

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
        with _autocast(self.device, self.options.mixed_precision):
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
        with _autocast(self.device, self.options.mixed_precision):
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
        self._update(state, params, grads, k, settings, t)
        if active is not None:
            for x, old in zip(mutated, saved, strict=True):
                x.copy_(torch.where(active.view(-1, *([1] * (x.dim() - 1))), x, old))
        return loss, correct

    def _update(self, state: _ChunkState, params: dict[str, torch.Tensor],
                grads: dict[str, torch.Tensor], k: int, settings: TrainSettings, t: int
                ) -> None:
        """The client rule, then the optimizer, on the first ``k`` clients' weights."""
        names = list(params)
        pl = [params[n] for n in names]
        plain = (settings.optimizer == "sgd" and not settings.momentum
                 and not settings.weight_decay and state.mu is None
                 and state.correction is None)
        if plain:
            # w -= lr g straight from the (bf16) gradient: the same fp32 arithmetic as
            # casting g first, one pass over the weights fewer
            for p, n in zip(pl, names, strict=True):
                p.add_(grads[n], alpha=-settings.lr)
            return
        gl = [grads[n].to(params[n].dtype) for n in names]
        if state.mu is not None:
            # FedProx (Li et al. 2020, Eq. 2): grad += mu * (w - w_global)
            mu = state.mu[:k]
            for g, p, n in zip(gl, pl, names, strict=True):
                g.add_((p - state.global_view[n]) * mu.view(-1, *([1] * (p.dim() - 1))))
        if state.correction is not None:
            # SCAFFOLD (Karimireddy et al. 2020, Alg. 1 line 10): grad += c - c_i
            for g, n in zip(gl, names, strict=True):
                g.add_(state.correction[n][:k])
        if settings.optimizer == "adam":
            self._adam(state, pl, gl, k, settings, t)
        else:
            self._sgd(state, pl, gl, k, settings)

    @staticmethod
    def _sgd(state: _ChunkState, pl: list[torch.Tensor], gl: list[torch.Tensor], k: int,
             s: TrainSettings) -> None:
        # torch.optim.SGD (dampening 0, no Nesterov): d = g + wd w; b = m b + d; w -= lr b.
        # The buffer starts at 0, so the first step's b = d, as torch's clone(d).
        if s.weight_decay:
            torch._foreach_add_(gl, pl, alpha=s.weight_decay)
        if s.momentum:
            bl = [b[:k] for b in state.opt[0].values()]
            torch._foreach_mul_(bl, s.momentum)
            torch._foreach_add_(bl, gl)
            gl = bl
        torch._foreach_add_(pl, gl, alpha=-s.lr)

    @staticmethod
    def _adam(state: _ChunkState, pl: list[torch.Tensor], gl: list[torch.Tensor], k: int,
              s: TrainSettings, t: int) -> None:
        # torch.optim.Adam (single-tensor form), step t+1 for every active client: all
        # clients of a chunk start together, so their step counts agree.
        beta1, beta2 = _ADAM_BETAS
        step = t + 1
        if s.weight_decay:
            gl = list(torch._foreach_add(gl, pl, alpha=s.weight_decay))
        ml = [m[:k] for m in state.opt[0].values()]
        vl = [v[:k] for v in state.opt[1].values()]
        torch._foreach_lerp_(ml, gl, 1 - beta1)
        torch._foreach_mul_(vl, beta2)
        torch._foreach_addcmul_(vl, gl, gl, value=1 - beta2)
        step_size = s.lr / (1 - beta1 ** step)
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = torch._foreach_sqrt(vl)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, _ADAM_EPS)
        torch._foreach_addcdiv_(pl, ml, denom, value=-step_size)

    # ------------------------------------------------------------------ a chunk
    def _init_state(self, jobs: Sequence[Job], settings: TrainSettings,
                    global_flat: torch.Tensor, corrections: torch.Tensor | None) -> _ChunkState:
        c = len(jobs)
        weights, global_view, consts = {}, {}, {}
        for e in self.layout.entries:
            view = global_flat[e.start:e.stop].view(e.shape)
            if e.trainable:
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
        if all(e.trainable for e in self.layout.entries):
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
        sched = _schedule(jobs, self.partitions, settings, self.device, self.dtype,
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

    def _static_chunk(self, jobs: Sequence[Job], sched: _Schedule, settings: TrainSettings,
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

    def _run_step(self, state: _ChunkState, sched: _Schedule, settings: TrainSettings,
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
            if self._step_fn == self._step or _is_oom(exc):
                raise
            log.warning("vectorized: torch.compile failed (%s: %s); running the local step "
                        "eagerly", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
            self._step_fn = self._step
            return self._step(state, k, xb, yb, wb, settings, t, active)

    def _run_masked(self, static: _StaticChunk, sched: _Schedule, settings: TrainSettings, *,
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
                if _is_oom(exc):
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
        width = min(settings.batch_size, max((len(p) for p in self.partitions), default=1))
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
        with _cudnn_autotune(self.device):
            return self._train(jobs, settings, global_flat, corrections)

    def _train(self, jobs: Sequence[Job], settings: TrainSettings, global_flat: torch.Tensor,
               corrections: torch.Tensor | None) -> TrainOutput:
        n = len(jobs)
        order = sorted(range(n), key=lambda i: (-jobs[i].num_steps, i))
        pin = self.device.type == "cuda"
        updates = torch.empty(n, self.layout.size, dtype=self.dtype, pin_memory=pin)
        loss_sum = torch.zeros(n, dtype=torch.float64, pin_memory=pin)
        correct = torch.zeros(n, dtype=torch.int64, pin_memory=pin)
        global_flat = global_flat.to(self.device, self.dtype)
        key = (settings.batch_size, settings.optimizer, bool(settings.momentum))
        clock = _Clock(self.device)
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
                if not _is_oom(exc):
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
            self._to_host(updates[pos:pos + size], upd)
            self._to_host(loss_sum[pos:pos + size], loss)
            self._to_host(correct[pos:pos + size], corr_count)
            pos += size
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        self.last_compute_s = clock.seconds()
        return TrainOutput(updates, order, loss_sum, correct)

    def _to_host(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self._copy_stream is None:
            dst.copy_(src)
            return
        # on a side stream, so the copy overlaps the next chunk's training
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            dst.copy_(src, non_blocking=True)
        src.record_stream(self._copy_stream)


# --------------------------------------------------------------------------- several ranks


def _send_rows(rows: torch.Tensor, dst: int, device: torch.device) -> None:
    """Send a host tensor ``[n, P]`` to rank ``dst`` in pieces staged on ``device``."""
    import torch.distributed as dist

    if rows.numel() == 0:
        return
    step = _piece_rows(rows)
    for start in range(0, rows.shape[0], step):
        piece = rows[start:start + step]
        dist.send(piece.to(device, non_blocking=True) if device.type != "cpu"
                  else piece.contiguous(), dst=dst)


def _recv_rows(out: torch.Tensor, src: int, device: torch.device) -> None:
    """Receive what :func:`_send_rows` sent into the host tensor ``out``."""
    import torch.distributed as dist

    if out.numel() == 0:
        return
    step = _piece_rows(out)
    for start in range(0, out.shape[0], step):
        target = out[start:start + step]
        if device.type == "cpu":
            buf = torch.empty_like(target)
            dist.recv(buf, src=src)
            target.copy_(buf)
        else:
            buf = torch.empty(target.shape, dtype=target.dtype, device=device)
            dist.recv(buf, src=src)
            target.copy_(buf)


def _piece_rows(rows: torch.Tensor) -> int:
    return max(1, (256 << 20) // max(1, rows.shape[1] * rows.element_size()))


@dataclass
class _WorkerPayload:
    """What a worker rank needs to train (pickled once, at start-up)."""

    model: nn.Module
    x_train: torch.Tensor
    y_train: torch.Tensor
    partitions: list[np.ndarray]
    layout: ModelLayout
    options: VectorizedOptions
    dp_sgd: DPSGDSpec | None
    dtype: torch.dtype
    backend: str
    init_file: str
    world_size: int
    devices: list[str]


def _worker_main(rank: int, payload: _WorkerPayload) -> None:
    """A worker rank: train the jobs rank 0 broadcasts until it says stop."""
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
        size = payload.layout.size
        while True:
            header: list[Any] = [None]
            dist.broadcast_object_list(header, src=0, device=device)
            command = header[0]
            if command["cmd"] == "stop":
                break
            jobs: list[Job] = command["jobs"][rank]
            settings: TrainSettings = command["settings"]
            global_flat = torch.empty(size, dtype=payload.dtype, device=device)
            dist.broadcast(global_flat, src=0)
            corrections = None
            if command["corrections"][rank]:
                corrections = torch.empty(len(jobs), size, dtype=payload.dtype)
                _recv_rows(corrections, 0, device)
            status = torch.zeros(1, dtype=torch.int64, device=device)
            try:
                out = trainer.train(jobs, settings, global_flat, corrections)
            except Exception:
                log.exception("vectorized: rank %d failed to train its clients", rank)
                status.fill_(1)
                dist.send(status, dst=0)
                continue
            dist.send(status, dst=0)
            if not jobs:
                continue
            meta = torch.stack([out.loss_sum, out.correct.to(torch.float64),
                                torch.tensor(out.order, dtype=torch.float64)], dim=1)
            dist.send(meta.to(device), dst=0)
            _send_rows(out.updates, 0, device)
    finally:
        dist.destroy_process_group()


class _RankPool:
    """Ranks 1..N-1 of a ``torch.distributed`` group, each training on its own device."""

    def __init__(self, *, world_size: int, device: torch.device, model: nn.Module,
                 x_train: torch.Tensor, y_train: torch.Tensor,
                 partitions: Sequence[np.ndarray], layout: ModelLayout,
                 options: VectorizedOptions, dp_sgd: DPSGDSpec | None = None) -> None:
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
                    global_flat: torch.Tensor, corrections: list[torch.Tensor | None]) -> None:
        """Send every rank its jobs, the global weights and its corrections."""
        import torch.distributed as dist

        self._check_alive()
        header = [{"cmd": "train", "jobs": shards, "settings": settings,
                   "corrections": [c is not None for c in corrections]}]
        dist.broadcast_object_list(header, src=0, device=self.device)
        dist.broadcast(global_flat.to(self.device, torch.get_default_dtype()).contiguous(),
                       src=0)
        for rank in range(1, self.world_size):
            rows = corrections[rank]
            if rows is not None:
                _send_rows(rows, rank, self.device)

    def finish_round(self, shards: list[list[Job]], size: int, dtype: torch.dtype
                     ) -> list[TrainOutput]:
        """Receive ranks 1..N-1's results."""
        import torch.distributed as dist

        outputs = []
        for rank in range(1, self.world_size):
            status = torch.zeros(1, dtype=torch.int64, device=self.device)
            dist.recv(status, src=rank)
            if int(status.item()):
                raise DeviceError(f"vectorized: rank {rank} could not train its clients (see "
                                  "its log above)")
            n = len(shards[rank])
            updates = torch.empty(n, size, dtype=dtype,
                                  pin_memory=self.device.type == "cuda" and n > 0)
            if n == 0:
                outputs.append(TrainOutput(updates, [], torch.zeros(0, dtype=torch.float64),
                                           torch.zeros(0, dtype=torch.int64)))
                continue
            meta = torch.empty(n, 3, dtype=torch.float64, device=self.device)
            dist.recv(meta, src=rank)
            meta = meta.cpu()
            _recv_rows(updates, rank, self.device)
            outputs.append(TrainOutput(updates, [int(v) for v in meta[:, 2].tolist()],
                                       meta[:, 0].clone(), meta[:, 1].to(torch.int64)))
        return outputs

    def close(self) -> None:
        """Stop the workers and leave the group."""
        import torch.distributed as dist

        if not self._open:
            return
        self._open = False
        try:
            if all(p.is_alive() for p in self.procs):
                dist.broadcast_object_list([{"cmd": "stop"}], src=0, device=self.device)
        finally:
            # leave the group before joining: the workers leave theirs on "stop"
            if dist.is_initialized():
                dist.destroy_process_group()
            for p in self.procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
            shutil.rmtree(self._dir, ignore_errors=True)


def shard_jobs(jobs: Sequence[Job], world_size: int) -> list[list[Job]]:
    """Split jobs over ranks, longest first onto the least-loaded rank (LPT scheduling)."""
    shards: list[list[Job]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for job in sorted(jobs, key=lambda j: (-j.num_steps, j.slot)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        shards[r].append(job)
        load[r] += max(1, job.num_steps)
    return shards


# --------------------------------------------------------------------------- the executor


@dataclass
class _Plan:
    """Jobs of one round that share settings and global weights."""

    settings: TrainSettings
    global_params: torch.Tensor
    jobs: list[Job] = field(default_factory=list)
    corrections: dict[int, torch.Tensor] = field(default_factory=dict)


class VectorizedExecutor(SimulationExecutor):
    """The cohort trained at once with ``torch.func`` on one device, or several ranks."""

    name = "vectorized"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        self.options = VectorizedOptions.from_config(context.config)
        self._sequential = SequentialExecutor(context)
        self._pool: _RankPool | None = None
        self._unsupported_logged: set[str] = set()
        self.fallback_reason: str | None = None
        self.trainer: CohortTrainer | None = None
        #: per round: clients trained, executor wall seconds, device training seconds (rank 0)
        self.stats: list[dict[str, float]] = []
        model = context.model_factory().to(context.device)
        self.fallback_reason = vectorization_blocker(model, self._sequential.trainer)
        self.dp_sgd: DPSGDSpec | None = None
        if self.fallback_reason is None:
            self.dp_sgd, self.fallback_reason = dp_sgd_spec(self._sequential.trainer)
        if self.fallback_reason is None:
            self.fallback_reason = self._build_trainer(model)
        if self.fallback_reason is not None:
            log.warning("vectorized executor: falling back to sequential training because %s",
                        self.fallback_reason)
        if self.options.world_size > 1 and self.fallback_reason is None and \
                context.device.type == "cuda" and torch.cuda.device_count() < \
                self.options.world_size + (context.device.index or 0):
            raise DeviceError(f"simulation.world_size = {self.options.world_size} needs that "
                              f"many GPUs; {torch.cuda.device_count()} are visible")

    def _build_trainer(self, model: nn.Module) -> str | None:
        ctx = self.context
        sample = ctx.x_train[:2]
        unfolded = self._choose_lowering(model, sample)
        fmodel = lower_convolutions(model, unfolded) if unfolded else model
        unused, problem = _probe_model(copy.deepcopy(model), fmodel, ctx.x_train, ctx.y_train)
        if problem is not None:
            return problem
        if self.dp_sgd is not None and unused:
            return (f"parameters {sorted(unused)} get no gradient, which Opacus's DP-SGD does "
                    "not accept")
        layout = _layout(model, sample, unused, unfolded)
        self.layout = layout
        self.trainer = CohortTrainer(model=model, x_train=ctx.x_train, y_train=ctx.y_train,
                                     partitions=ctx.partitions, device=ctx.device,
                                     layout=layout, options=self.options, dp_sgd=self.dp_sgd)
        return None

    def _choose_lowering(self, model: nn.Module, sample: torch.Tensor) -> list[str]:
        names = [n for n, m in model.named_modules() if _lowerable(m)]
        mode = self.options.conv_lowering
        if not names or mode == "grouped":
            return []
        if mode == "unfold":
            return names
        if self.context.device.type != "cuda":
            return []  # auto on the CPU: vmap's grouped convolution
        cfg = self.context.config
        batch = cfg.client.batch_size if cfg is not None else 32
        clients = max(1, min(64, cfg.cohort_size() if cfg is not None else 64))
        chosen = []
        try:
            for row in conv_lowering_costs(model, sample, clients=clients, batch=batch,
                                           mixed_precision=self.options.mixed_precision):
                faster = row["unfold_s"] < row["grouped_s"]
                log.info("vectorized: conv %s under vmap (%d clients x %d): grouped %.2f ms, "
                         "unfold+bmm %.2f ms -> %s", row["layer"], clients, batch,
                         1e3 * row["grouped_s"], 1e3 * row["unfold_s"],
                         "unfold" if faster else "grouped")
                if faster:
                    chosen.append(row["layer"])
        except Exception as exc:  # timing is advisory: keep vmap's own conv
            log.info("vectorized: conv lowering not timed (%s); using grouped convolution",
                     type(exc).__name__)
            return []
        return chosen

    # ------------------------------------------------------------------ a round
    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        if self.fallback_reason is not None or self.trainer is None:
            return self._sequential.run_cohort(tasks)
        outs = self.run_clients(tasks)
        return CohortOutcome(
            ResultBatch.from_results([o.result for o in outs if o.result is not None],
                                     dim=self.context.dim, device=self.context.device),
            {o.client_id: o.failure or "" for o in outs if o.result is None})

    def run_clients(self, tasks: Sequence[ClientTask]) -> list[ClientOutcome]:
        """One outcome per task (the cohort trained at once)."""
        if self.trainer is None:  # pragma: no cover - run_cohort checks first
            raise RuntimeError("vectorized executor has no trainer")
        start = time.perf_counter()
        compute = 0.0
        ctx = self.context
        outcomes: list[ClientOutcome | None] = [None] * len(tasks)
        plans: dict[tuple[TrainSettings, int], _Plan] = {}
        leftovers: list[int] = []
        for slot, task in enumerate(tasks):
            rule = ctx.strategy.client_rule(task.instructions, task.client_state)
            n = len(ctx.partitions[task.client_id])
            steps = num_local_steps(n, task.settings)
            expected_batch_size = 0
            if self.dp_sgd is not None:
                per_epoch = dp_sgd_steps_per_epoch(n, task.settings)
                steps = task.settings.epochs * per_epoch
                expected_batch_size = int(n * (1 / per_epoch))  # Opacus make_private
            if task.drop_after_steps is not None and task.drop_after_steps < steps:
                # LocalTrainer.fit raises ClientDropped before step ``drop_after_steps``
                outcomes[slot] = ClientOutcome(task.client_id, failure=DROP_MESSAGE)
                continue
            if task.settings.optimizer not in _OPTIMIZERS:
                self._log_once(f"optimizer {task.settings.optimizer!r} has no vectorised "
                               "update rule; those clients train sequentially")
                leftovers.append(slot)
                continue
            plan = plans.setdefault((task.settings, id(task.global_params)),
                                    _Plan(task.settings, task.global_params))
            correction = rule.gradient_correction
            plan.jobs.append(Job(slot=slot, client_id=task.client_id, seed=task.seed,
                                 num_samples=n, num_steps=steps,
                                 proximal_mu=float(rule.proximal_mu),
                                 has_correction=correction is not None,
                                 expected_batch_size=expected_batch_size))
            if correction is not None:
                plan.corrections[slot] = correction
        for plan in plans.values():
            self._run_plan(plan, tasks, outcomes)
            compute += self.trainer.last_compute_s if self.trainer is not None else 0.0
        if leftovers:
            done = _outcomes(self._sequential.run_cohort([tasks[i] for i in leftovers]))
            order = {tasks[i].client_id: k for k, i in enumerate(leftovers)}
            done.sort(key=lambda o: order[o.client_id])
            for slot, outcome in zip(leftovers, done, strict=True):
                outcomes[slot] = outcome
        self.stats.append({"clients": float(sum(len(p.jobs) for p in plans.values())),
                           "wall_s": time.perf_counter() - start, "compute_s": compute})
        return [o for o in outcomes if o is not None]

    def _log_once(self, message: str) -> None:
        if message not in self._unsupported_logged:
            self._unsupported_logged.add(message)
            log.warning("vectorized executor: %s", message)

    def _corrections(self, jobs: Sequence[Job], plan: _Plan) -> torch.Tensor | None:
        if not any(j.has_correction for j in jobs):
            return None
        rows = torch.zeros(len(jobs), self.layout.size, dtype=self.trainer.dtype)  # type: ignore[union-attr]
        for i, j in enumerate(jobs):
            if j.has_correction:
                rows[i] = plan.corrections[j.slot].reshape(-1).to(rows.dtype)
        return rows

    def _run_plan(self, plan: _Plan, tasks: Sequence[ClientTask],
                  outcomes: list[ClientOutcome | None]) -> None:
        trainer = self.trainer
        if trainer is None:  # pragma: no cover - run_clients checks first
            raise RuntimeError("vectorized executor has no trainer")
        world = self.options.world_size
        if world > 1 and self._pool is None:
            self._pool = _RankPool(world_size=world, device=self.context.device,
                                   model=self.context.model_factory(),
                                   x_train=self.context.x_train, y_train=self.context.y_train,
                                   partitions=self.context.partitions, layout=self.layout,
                                   options=self.options, dp_sgd=self.dp_sgd)
        if self._pool is not None:
            shards = shard_jobs(plan.jobs, world)
            self._pool.start_round(shards, plan.settings, plan.global_params,
                                   [self._corrections(s, plan) for s in shards])
            own = trainer.train(shards[0], plan.settings, plan.global_params,
                                self._corrections(shards[0], plan))
            others = self._pool.finish_round(shards, self.layout.size, trainer.dtype)
            results = [(shards[0], own)] + list(zip(shards[1:], others, strict=True))
        else:
            out = trainer.train(plan.jobs, plan.settings, plan.global_params,
                                self._corrections(plan.jobs, plan))
            results = [(plan.jobs, out)]
        for jobs, out in results:
            losses = out.loss_sum.tolist()
            corrects = out.correct.tolist()
            for row, j in enumerate(out.order):
                job = jobs[j]
                seen = max(1, job.num_samples * plan.settings.epochs)
                metrics = {"train_loss": losses[row] / seen,
                           "train_accuracy": corrects[row] / seen}
                if self.dp_sgd is not None:
                    self._report_dp_sgd(job, plan.settings, metrics)
                fit = FitOutput(update=out.updates[row], num_examples=job.num_samples,
                                num_steps=job.num_steps, metrics=metrics)
                task = tasks[job.slot]
                try:
                    result = finish_client_task(task, fit, self.context.strategy,
                                                self.context.pipeline)
                except ClientDropped as exc:
                    outcomes[job.slot] = ClientOutcome(task.client_id, failure=str(exc))
                    continue
                outcomes[job.slot] = ClientOutcome(task.client_id, result=result)

    def _report_dp_sgd(self, job: Job, settings: TrainSettings, metrics: dict[str, float]
                       ) -> None:
        """Report what ``DPSGDTrainer.fit`` reports once Opacus's accountant saw the steps.

        The event ``(z, q, steps)`` goes to its ``on_fit`` hook (the privacy layer charges it to
        the client's account in the pipeline), and into the metrics.
        """
        spec = self.dp_sgd
        if spec is None:  # pragma: no cover
            return
        q = 1 / dp_sgd_steps_per_epoch(job.num_samples, settings)
        event = (float(spec.noise_multiplier), float(q), int(job.num_steps))
        on_fit = getattr(self._sequential.trainer, "on_fit", None)
        if on_fit is not None:
            on_fit(event)
        metrics.update({"dp_noise_multiplier": event[0], "dp_sample_rate": event[1],
                        "dp_steps": float(event[2])})

    def close(self) -> None:  # noqa: D102
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.trainer is not None:
            self.trainer._static = None  # a cached CUDA graph and its buffers
        self._sequential.close()


register_executor("vectorized", VectorizedExecutor)

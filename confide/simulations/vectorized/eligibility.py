"""What the vectorized executor can train exactly, and the probe that checks a model.

A model is refused (the executor falls back to ``sequential``, saying why) when vectorising
would change its results: BatchNorm (batch coupling, running statistics), dropout (masks from
the global RNG), tied weights, a trainer other than the plain ``LocalTrainer`` or the privacy
layer's DP-SGD, a loss other than mean cross-entropy, or vectorised gradients that differ from
the model's own autograd gradients on a probe batch.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name
from torch import nn
from torch.func import functional_call, grad, vmap

from confide.client.trainer import LocalTrainer

__all__ = ["vectorization_blocker", "probe_model"]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)


def vectorization_blocker(model: nn.Module, trainer: LocalTrainer | None = None, *,
                          dp_sgd: bool = False) -> str | None:
    """Why ``model`` (trained by ``trainer``) cannot be vectorised exactly, or None if it can.

    ``dp_sgd``: the privacy layer says the clients train with DP-SGD
    (``RoundPrivacy.sample_level_dp()``), so ``trainer`` is its DP-SGD trainer, whose steps
    the executor reproduces; otherwise the trainer must be the plain ``LocalTrainer``.
    """
    if trainer is not None:
        if type(trainer) is not LocalTrainer and not dp_sgd:
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


def probe_model(model: nn.Module, fmodel: nn.Module, x: torch.Tensor, y: torch.Tensor
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


"""The local update rules of ``LocalTrainer`` on a chunk of clients' stacked weights.

The strategy's :class:`~confide.strategies.ClientRule` (FedProx's proximal term, SCAFFOLD's
correction) is added to every gradient first, per client; then SGD (momentum, weight decay)
or Adam, the update rules of ``torch.optim.SGD`` / ``torch.optim.Adam``, applied with
``torch._foreach`` kernels to the first ``k`` clients' weights.
"""

from __future__ import annotations

import torch

from confide.client.trainer import TrainSettings
from confide.simulations.vectorized.options import ADAM_BETAS, ADAM_EPS

__all__ = ["apply_local_update"]


def _per_client(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def apply_local_update(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], *,
                       k: int, settings: TrainSettings, t: int,
                       opt: list[dict[str, torch.Tensor]], mu: torch.Tensor | None,
                       global_view: dict[str, torch.Tensor],
                       correction: dict[str, torch.Tensor] | None) -> None:
    """The client rule, then the optimizer, on the first ``k`` clients' weights (in place).

    ``opt`` holds the optimizer state (a momentum buffer, or Adam's two moments) for the
    whole chunk; ``t`` is the local step (Adam's bias correction).
    """
    names = list(params)
    pl = [params[n] for n in names]
    plain = (settings.optimizer == "sgd" and not settings.momentum
             and not settings.weight_decay and mu is None and correction is None)
    if plain:
        # w -= lr g straight from the (bf16) gradient: the same fp32 arithmetic as
        # casting g first, one pass over the weights fewer
        for p, n in zip(pl, names, strict=True):
            p.add_(grads[n], alpha=-settings.lr)
        return
    gl = [grads[n].to(params[n].dtype) for n in names]
    if mu is not None:
        # FedProx (Li et al. 2020, Eq. 2): grad += mu * (w - w_global)
        for g, p, n in zip(gl, pl, names, strict=True):
            g.add_((p - global_view[n]) * _per_client(mu[:k], p))
    if correction is not None:
        # SCAFFOLD (Karimireddy et al. 2020, Alg. 1 line 10): grad += c - c_i
        for g, n in zip(gl, names, strict=True):
            g.add_(correction[n][:k])
    if settings.optimizer == "adam":
        _adam(opt, pl, gl, k, settings, t)
    else:
        _sgd(opt, pl, gl, k, settings)


def _sgd(opt: list[dict[str, torch.Tensor]], pl: list[torch.Tensor], gl: list[torch.Tensor],
         k: int, s: TrainSettings) -> None:
    # torch.optim.SGD (dampening 0, no Nesterov): d = g + wd w; b = m b + d; w -= lr b.
    # The buffer starts at 0, so the first step's b = d, as torch's clone(d).
    if s.weight_decay:
        torch._foreach_add_(gl, pl, alpha=s.weight_decay)
    if s.momentum:
        bl = [b[:k] for b in opt[0].values()]
        torch._foreach_mul_(bl, s.momentum)
        torch._foreach_add_(bl, gl)
        gl = bl
    torch._foreach_add_(pl, gl, alpha=-s.lr)


def _adam(opt: list[dict[str, torch.Tensor]], pl: list[torch.Tensor], gl: list[torch.Tensor],
          k: int, s: TrainSettings, t: int) -> None:
    # torch.optim.Adam (single-tensor form), step t+1 for every active client: all
    # clients of a chunk start together, so their step counts agree.
    beta1, beta2 = ADAM_BETAS
    step = t + 1
    if s.weight_decay:
        gl = list(torch._foreach_add(gl, pl, alpha=s.weight_decay))
    ml = [m[:k] for m in opt[0].values()]
    vl = [v[:k] for v in opt[1].values()]
    torch._foreach_lerp_(ml, gl, 1 - beta1)
    torch._foreach_mul_(vl, beta2)
    torch._foreach_addcmul_(vl, gl, gl, value=1 - beta2)
    step_size = s.lr / (1 - beta1 ** step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = torch._foreach_sqrt(vl)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, ADAM_EPS)
    torch._foreach_addcdiv_(pl, ml, denom, value=-step_size)

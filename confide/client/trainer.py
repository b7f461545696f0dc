"""The local trainer every client runs on its own device.

``client_update = w_local - w_global`` after ``epochs`` passes of minibatch SGD (or Adam) over
the client's data, with the strategy's :class:`~confide.strategies.ClientRule` applied to
every gradient. Shuffling is seeded per client and round, so runs are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from confide.exceptions import ClientDropped
from confide.parameters import flat_layout, get_flat_params, set_flat_params
from confide.round import TrainSettings
from confide.shuffle import epoch_orders
from confide.strategies.base import ClientRule

__all__ = ["TrainSettings", "FitOutput", "LocalOptimizer", "LocalTrainer", "evaluate_model"]


@dataclass
class FitOutput:
    """What local training produced."""

    update: torch.Tensor
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def _param_slices(model: nn.Module) -> list[tuple[nn.Parameter, slice]]:
    """Where each trainable parameter lives in the flat vector (``flat_layout`` order)."""
    by_name = dict(model.named_parameters())
    return [(by_name[e.name], slice(e.start, e.stop)) for e in flat_layout(model)
            if e.name in by_name]


ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
ADAM_EPS = 1e-8


class LocalOptimizer:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) or ``torch.optim.Adam`` (defaults), the
    same update rules, element for element, without ``torch.optim``.

    Why our own: constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` (the
    ``_disable_dynamo`` wrapper on ``Optimizer.__init__``), 2-7 s of a small job's start-up on
    a 2-core machine (``benchmarks/cpu_default_job.py``); local training needs neither
    compilation nor hooks. ``tests/client/test_local_optimizer.py`` holds it to
    ``torch.optim`` step for step. DP-SGD keeps ``torch.optim`` (Opacus wraps it).
    """

    def __init__(self, params: list[nn.Parameter], s: TrainSettings) -> None:
        self.params, self.s = params, s
        self.state: dict[int, list[torch.Tensor]] = {}
        self.steps: dict[int, int] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:  # noqa: D102
        s = self.s
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if s.weight_decay:
                g = g.add(p, alpha=s.weight_decay)
            if s.optimizer == "adam":
                beta1, beta2 = ADAM_BETAS
                m, v = self.state.setdefault(i, [torch.zeros_like(p), torch.zeros_like(p)])
                t = self.steps[i] = self.steps.get(i, 0) + 1  # per parameter, as torch
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = s.lr / (1 - beta1 ** t)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(ADAM_EPS)
                p.addcdiv_(m, denom, value=-step_size)
                continue
            if s.momentum:
                buf = self.state.get(i)
                if buf is None:  # torch: the first buffer is a copy of d
                    buf = self.state[i] = [torch.clone(g).detach()]
                else:
                    buf[0].mul_(s.momentum).add_(g)
                g = buf[0]
            p.add_(g, alpha=-s.lr)


class LocalTrainer:
    """Trains a model replica on one client's data and returns its update."""

    #: called as ``on_epoch(epoch, epochs)`` when a local epoch starts (progress display)
    on_epoch: Callable[[int, int], None] | None = None

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device
        self._slices = _param_slices(self.model)
        self.loss_fn = nn.CrossEntropyLoss()

    def _optimizer(self, s: TrainSettings) -> torch.optim.Optimizer:
        params = [p for p, _ in self._slices]
        if s.optimizer == "adam":
            return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        global_params: torch.Tensor,
        settings: TrainSettings,
        *,
        rule: ClientRule | None = None,
        seed: int = 0,
        drop_after_steps: int | None = None,
    ) -> FitOutput:
        """Run local training from ``global_params``; ``drop_after_steps`` injects a dropout."""
        rule = rule or ClientRule()
        global_params = global_params.to(self.device)
        set_flat_params(self.model, global_params)
        self.model.train()
        opt = LocalOptimizer([p for p, _ in self._slices], settings)
        n = len(y)
        # the same counter-based orders the vectorized executor computes for a whole cohort
        orders = epoch_orders(torch.tensor([seed]), torch.tensor([n]), settings.epochs, n)[0]
        correction = (rule.gradient_correction.to(self.device)
                      if rule.gradient_correction is not None else None)
        steps = 0
        # Metrics accumulate on the device: no host synchronisation inside the loop.
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        for _epoch in range(settings.epochs):
            if self.on_epoch is not None:
                self.on_epoch(_epoch + 1, settings.epochs)
            order = orders[_epoch].to(self.device)
            for start in range(0, n, settings.batch_size):
                if drop_after_steps is not None and steps >= drop_after_steps:
                    raise ClientDropped("client left mid-round (fault injection)")
                idx = order[start : start + settings.batch_size]
                xb, yb = x[idx], y[idx]
                opt.zero_grad(set_to_none=True)
                logits = self.model(xb)
                loss = self.loss_fn(logits, yb)
                loss.backward()
                if rule.proximal_mu or correction is not None:
                    self._modify_gradients(rule.proximal_mu, global_params, correction)
                opt.step()
                steps += 1
                loss_sum += loss.detach().double() * len(yb)
                correct += (logits.detach().argmax(1) == yb).sum()
        update = get_flat_params(self.model) - global_params
        seen = max(1, n * settings.epochs)
        return FitOutput(update=update, num_examples=n, num_steps=steps,
                         metrics={"train_loss": float(loss_sum) / seen,
                                  "train_accuracy": int(correct) / seen})

    @torch.no_grad()
    def _modify_gradients(self, mu: float, global_params: torch.Tensor,
                          correction: torch.Tensor | None) -> None:
        # FedProx (Li et al. 2020, Eq. 2): grad += mu * (w - w_global);
        # SCAFFOLD (Karimireddy et al. 2020, Alg. 1 line 10): grad += c - c_i.
        for p, sl in self._slices:
            if p.grad is None:
                continue
            g = p.grad.view(-1)
            if mu:
                g.add_(p.detach().view(-1) - global_params[sl], alpha=mu)
            if correction is not None:
                g.add_(correction[sl])


@torch.no_grad()
def evaluate_model(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   batch_size: int = 2048) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``(x, y)`` (one host sync at the end)."""
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=x.device)  # loss sum, correct
    for start in range(0, len(y), batch_size):
        logits = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        totals[0] += nn.functional.cross_entropy(logits, yb, reduction="sum").double()
        totals[1] += (logits.argmax(1) == yb).sum().double()
    loss_sum, correct = totals.tolist()
    n = max(1, len(y))
    loss = loss_sum / n
    return {"accuracy": int(correct) / n,
            "loss": loss if math.isfinite(loss) else float("nan")}

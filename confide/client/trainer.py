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
from confide.strategies.base import ClientRule

__all__ = ["TrainSettings", "FitOutput", "LocalTrainer", "evaluate_model"]


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
        opt = self._optimizer(settings)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        n = len(y)
        correction = (rule.gradient_correction.to(self.device)
                      if rule.gradient_correction is not None else None)
        steps = 0
        # Metrics accumulate on the device: no host synchronisation inside the loop.
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.int64)
        for _epoch in range(settings.epochs):
            if self.on_epoch is not None:
                self.on_epoch(_epoch + 1, settings.epochs)
            order = torch.randperm(n, generator=gen).to(self.device)
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

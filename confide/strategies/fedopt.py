"""Adaptive server optimizers: FedAdagrad, FedYogi, FedAdam.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021, Algorithm 2. With the mean client update ``Δ_t`` (Confide's
``mean_update``, already pointing downhill):

    m_t = β1 m_{t-1} + (1 - β1) Δ_t
    v_t = v_{t-1} + Δ_t²                                  (FedAdagrad)
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)    (FedYogi)
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²                      (FedAdam)
    x_{t+1} = x_t + η m_t / (sqrt(v_t) + τ)

Algorithm 2 starts from ``m = 0`` and any ``v ≥ τ²``; we take ``v = τ²`` and, as the paper,
no bias correction. Defaults: β1 = 0.9, β2 = 0.99 and τ = 1e-3, the values Reddi et al. use
throughout Sec. 5; server learning rate η = 1e-2 for FedAdam/FedYogi and 1e-1 for FedAdagrad
(η is tuned per task on a log grid in the paper; these are the usual starting points, and
Flower's defaults for FedYogi and FedAdagrad).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from confide.strategies.base import Strategy, param

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "FedAdagradParams",
    "FedAdamParams",
    "FedYogiParams",
]


@dataclass(frozen=True)
class FedAdagradParams:
    """``[strategy]`` keys of ``fedadagrad``."""

    server_lr: float = param(0.1, gt=0, help="server learning rate η")
    beta1: float = param(0.9, ge=0, lt=1, help="first-moment decay β1")
    tau: float = param(1e-3, gt=0, help="adaptivity τ (Algorithm 2)")


@dataclass(frozen=True)
class FedAdamParams:
    """``[strategy]`` keys of ``fedadam``."""

    server_lr: float = param(0.01, gt=0, help="server learning rate η")
    beta1: float = param(0.9, ge=0, lt=1, help="first-moment decay β1")
    beta2: float = param(0.99, ge=0, lt=1, help="second-moment decay β2")
    tau: float = param(1e-3, gt=0, help="adaptivity τ (Algorithm 2)")


@dataclass(frozen=True)
class FedYogiParams(FedAdamParams):
    """``[strategy]`` keys of ``fedyogi`` (the same as ``fedadam``)."""


class _FedOpt(Strategy):
    """Shared moments and update of Algorithm 2; subclasses give the ``v`` rule."""

    citation: ClassVar[str] = "Reddi et al. 2021 (ICLR), Algorithm 2"

    def __init__(self, params: Any = None) -> None:
        super().__init__(params)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Δ_t²``."""
        raise NotImplementedError

    def apply(self, global_params: torch.Tensor, mean_update: torch.Tensor,
              mean_aux: Mapping[str, torch.Tensor], server_round: int, *, num_clients: int,
              total_clients: int) -> torch.Tensor:
        """``x + η m / (sqrt(v) + τ)`` after updating the moments (Algorithm 2)."""
        p = self.params
        m = self.m if self.m is not None else torch.zeros_like(mean_update)
        v = self.v if self.v is not None else torch.full_like(mean_update, p.tau**2)  # v ≥ τ²
        self.m = p.beta1 * m + (1.0 - p.beta1) * mean_update
        self.v = self.second_moment(v, mean_update * mean_update)
        return global_params + p.server_lr * self.m / (self.v.sqrt() + p.tau)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        if self.m is None or self.v is None:
            return {}
        return {"m": self.m.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        m, v = state.get("m"), state.get("v")
        self.m = None if m is None else m.clone()
        self.v = None if v is None else v.clone()


class FedAdagrad(_FedOpt):
    """Server Adagrad: ``v_t = v_{t-1} + Δ_t²``."""

    name = "fedadagrad"
    Params = FedAdagradParams

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return v + delta_sq


class FedAdam(_FedOpt):
    """Server Adam: ``v_t = β2 v_{t-1} + (1 - β2) Δ_t²``."""

    name = "fedadam"
    Params = FedAdamParams

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b2 = self.params.beta2
        return b2 * v + (1.0 - b2) * delta_sq


class FedYogi(_FedOpt):
    """Server Yogi: ``v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)``."""

    name = "fedyogi"
    Params = FedYogiParams

    def second_moment(self, v: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b2 = self.params.beta2
        return v - (1.0 - b2) * delta_sq * torch.sign(v - delta_sq)

"""The strategy contract: a client update rule plus a server update rule on the mean update.

This is the FedOpt view (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Alg. 1):
clients return ``client_update = w_local - w_global``; the coordinator only ever needs the
(weighted) *mean* of those updates, which is exactly what secure aggregation and DP reveal.
A strategy therefore splits into

* client side (runs on the client's device, in simulation and deployment alike):
  :meth:`Strategy.client_rule` (proximal term, gradient correction) and
  :meth:`Strategy.client_finalize` (per-client state such as SCAFFOLD's ``c_i`` and auxiliary
  vectors that are summed like the update);
* server side: :meth:`Strategy.configure_round` (what every sampled client receives) and
  :meth:`Strategy.apply` (the server optimizer on the mean update).

Strategies that must see individual updates (median, trimmed mean, Krum) set
``requires_individual_updates = True`` and override :meth:`Strategy.aggregate_individual`;
the coordinator refuses to run them under secure aggregation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from confide.exceptions import ConfigError, StrategyError
from confide.round import RoundInstructions
from confide.strategies.aux_vectors import AuxVector

__all__ = [
    "Strategy",
    "ClientRule",
    "RoundInstructions",
    "NoParams",
    "param",
    "effective_local_steps",
    "AuxVector",
]


def param(default: Any, *, ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A field of a strategy's ``Params`` dataclass with bounds checked when it is built.

    ``lr: float = param(0.01, gt=0, help="server learning rate")`` makes
    ``[strategy] lr = -1`` a one-line error naming ``strategy.lr``.
    """
    from confide.validation import _c

    return _c(default, ge=ge, gt=gt, le=le, lt=lt, help=help)


def effective_local_steps(num_steps: int, momentum: float) -> float:
    """How many plain-SGD steps ``num_steps`` heavy-ball steps with ``momentum`` amount to.

    With a constant gradient g, SGD with momentum β moves ``lr * g * a`` in K steps, where
    ``a = sum_{k=1..K} (1 - β^k) / (1 - β) = (K - β (1 - β^K) / (1 - β)) / (1 - β)``
    (the ``||a_i||_1`` that FedNova derives for local momentum SGD: Wang et al., "Tackling
    the Objective Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS
    2020). It is K for β = 0; a test checks it against ``torch.optim.SGD``.
    """
    if momentum <= 0.0:
        return float(num_steps)
    b = momentum
    return (num_steps - b * (1.0 - b**num_steps) / (1.0 - b)) / (1.0 - b)


@dataclass(frozen=True)
class NoParams:
    """A strategy without parameters."""


@dataclass
class ClientRule:
    """How a client's local optimisation differs from plain SGD on its loss.

    The trainer adds ``proximal_mu * (w - w_global) + gradient_correction`` to every
    gradient (FedProx, Li et al. 2020, Eq. 2; SCAFFOLD, Karimireddy et al. 2020, Alg. 1 l.10).
    Expressed as data, so the vectorised executor can apply it to a whole cohort at once.
    """

    proximal_mu: float = 0.0
    gradient_correction: torch.Tensor | None = None


class Strategy:
    """Base class of every federated optimisation strategy.

    Subclasses set ``name`` (registry key), ``citation``, and ``Params`` (a frozen dataclass of
    the ``[strategy]`` keys they accept, validated when the strategy is built). Every hook has a
    no-op default, so FedAvg is this class with nothing overridden.
    """

    name: ClassVar[str] = "base"
    citation: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    #: Needs each client's update individually: incompatible with secure aggregation.
    requires_individual_updates: ClassVar[bool] = False
    #: The auxiliary per-client vectors, summed like updates (the contract:
    #: :mod:`confide.strategies.aux_vectors`). Declaring them sets ``aux_names``.
    aux_vectors: ClassVar[tuple[AuxVector, ...]] = ()
    #: Their names (a strategy that only names them gets model-length, unbounded vectors).
    aux_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__.get("aux_vectors")
        if (isinstance(declared, tuple) and "aux_names" not in cls.__dict__
                and all(isinstance(a, AuxVector) for a in declared)):
            cls.aux_names = tuple(a.name for a in declared)

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Strategy:
        """Build from the ``[strategy]`` keys, validating them against ``Params``."""
        from confide.validation import validate_dataclass

        try:
            params = validate_dataclass(cls.Params, dict(options), "strategy.")
        except ConfigError as exc:
            raise StrategyError(str(exc)) from None
        return cls(params)

    # ----------------------------------------------------------------- server side
    def initialize(self, global_params: torch.Tensor) -> None:
        """Called once with the initial global weights, before round 1 (not on resume)."""

    def configure_round(self, server_round: int) -> RoundInstructions:
        """Instructions sent to every sampled client this round."""
        return RoundInstructions()

    def apply(
        self,
        global_params: torch.Tensor,
        mean_update: torch.Tensor,
        mean_aux: Mapping[str, torch.Tensor],
        server_round: int,
        *,
        num_clients: int,
        total_clients: int,
    ) -> torch.Tensor:
        """The server update rule; the default is FedAvg's ``w + mean_update``."""
        return global_params + mean_update

    def aggregate_individual(self, updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Combine individual updates ``[n, dim]`` with weights ``[n]`` (only for
        ``requires_individual_updates``), as tensor operations on their device.
        """
        raise StrategyError(f"strategy {self.name!r} does not aggregate individual updates")

    def state_dict(self) -> dict[str, Any]:
        """Server state (momentum, moments, control variates) saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # ----------------------------------------------------------------- client side
    def client_rule(
        self,
        instructions: RoundInstructions,
        client_state: Mapping[str, torch.Tensor],
    ) -> ClientRule:
        """The client's local-update modification for this round."""
        return ClientRule()

    def client_finalize(
        self,
        instructions: RoundInstructions,
        client_state: Mapping[str, torch.Tensor],
        client_update: torch.Tensor,
        *,
        num_steps: int,
        lr: float,
        momentum: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """After local training: ``(aux vectors to aggregate, new client state)``.

        ``num_steps``, ``lr`` and ``momentum`` describe the local optimisation that produced
        ``client_update`` (SCAFFOLD's option II divides by the effective step length).
        """
        return {}, dict(client_state)

    def client_finalize_batch(
        self,
        instructions: RoundInstructions,
        client_states: Sequence[Mapping[str, torch.Tensor]],
        client_updates: torch.Tensor,
        *,
        num_steps: Sequence[int],
        lr: float,
        momentum: float = 0.0,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """:meth:`client_finalize` for a cohort (updates ``[n, dim]``): stacked columns.

        The default calls :meth:`client_finalize` row by row; strategies whose rule is a
        tensor expression override it so a vectorized cohort stays on its device.
        """
        if type(self).client_finalize is Strategy.client_finalize:
            return {}, {}
        rows = [self.client_finalize(instructions, st, u, num_steps=int(k), lr=lr,
                                     momentum=momentum)
                for st, u, k in zip(client_states, client_updates, num_steps, strict=True)]
        aux = {k: torch.stack([r[0][k] for r in rows]) for k in (rows[0][0] if rows else {})}
        state = {k: torch.stack([r[1][k] for r in rows]) for k in (rows[0][1] if rows else {})}
        return aux, state

    # ----------------------------------------------------------------- misc
    def check_compatible(self, *, secure_aggregation: bool) -> None:
        """Raise :class:`StrategyError` when this strategy cannot run in the given setup."""
        if secure_aggregation and self.requires_individual_updates:
            raise StrategyError(
                f"strategy {self.name!r} needs individual client updates, but secure "
                "aggregation reveals only their sum; disable secure_aggregation or choose a "
                "sum-based strategy (fedavg, fedprox, fedadam, ...)"
            )

    def describe(self) -> str:
        """One line: name and parameters."""
        p = self.params
        is_instance = dataclasses.is_dataclass(p) and not isinstance(p, type)
        fields = dataclasses.asdict(p) if is_instance else {}  # type: ignore[arg-type]
        args = ", ".join(f"{k}={v}" for k, v in fields.items())
        return f"{self.name}({args})"

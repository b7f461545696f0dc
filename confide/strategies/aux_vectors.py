"""The aux-vector contract: what a strategy's clients may send beside their update.

A strategy that needs more than the mean update (SCAFFOLD's control-variate delta ``Δc_i``)
declares each auxiliary vector as an :class:`AuxVector` in ``aux_vectors``. The contract:

1. **Summed like the update.** Every aux vector is summed *unweighted* across the clients
   that report, and the server's :meth:`~confide.strategies.Strategy.apply` receives the mean
   (sum / clients) in ``mean_aux``. Nothing else is revealed, so under secure aggregation the
   vectors are masked and summed in the same protocol run as the update (SecAgg+, Bell et al.
   2020; the quantised contribution is ``[w * update, aux..., w]``, see
   :mod:`confide.privacy.secagg.quantisation`).
2. **Length.** ``"model"`` (the flat parameter count) or a fixed positive integer. Secure
   aggregation masks the update and aux vectors coordinate by coordinate in one fixed-point
   layout of model-length blocks, so under it every aux vector must have the model's length.
3. **Bound.** ``bound`` is the largest ``|entry|`` the strategy guarantees, or ``None``. Secure
   aggregation's fixed-point encoding represents entries in ``[-clipping_range,
   clipping_range]`` (``secure_aggregation.clipping_range``; Bonawitz et al. 2017, §7 on
   fixed-point inputs), so a declared bound above it is refused at start; without a declared
   bound, any entry the encoding clips is reported (a warning), never clipped silently.
4. **As declared, every round.** Each client's aux vectors are checked against the
   declaration (names, length, bound) before anything is encoded; a client whose aux vector
   is not finite is rejected for the round like one whose update is not
   (:func:`confide.round.accept_finite`), never averaged.
5. **Not under distributed DP**, which privatises only the update.

:func:`check_aux_contract` checks the declaration when a job is built (one line naming the
strategy and the broken rule); :func:`check_aux_values` checks what a client produced.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from confide.exceptions import StrategyError

#: a Strategy class or instance (typed loosely: the base class imports this module)
StrategyLike = Any

__all__ = ["AuxVector", "check_aux_declaration", "check_aux_contract", "check_aux_values",
           "declared_aux", "describe_aux"]


@dataclass(frozen=True)
class AuxVector:
    """One auxiliary vector of a strategy (module docstring: the contract)."""

    name: str
    #: ``"model"``: the flat parameter count; else a fixed length
    length: int | Literal["model"] = "model"
    #: the largest ``|entry|`` the strategy guarantees; None: no a-priori bound
    bound: float | None = None


def declared_aux(cls: StrategyLike) -> tuple[AuxVector, ...]:
    """The strategy's aux vectors: ``aux_vectors``, or model-length unbounded ``aux_names``."""
    declared = getattr(cls, "aux_vectors", ())
    if declared:
        return tuple(declared)
    return tuple(AuxVector(name) for name in getattr(cls, "aux_names", ()))


def check_aux_declaration(cls: StrategyLike, label: str) -> None:
    """The declaration's own rules (types, names, lengths, bounds); one line if broken."""
    declared = getattr(cls, "aux_vectors", ())
    if not isinstance(declared, tuple) or not all(isinstance(a, AuxVector) for a in declared):
        raise StrategyError(f"{label}: aux_vectors must be a tuple of AuxVector "
                            "(confide.strategies.AuxVector)")
    names = [a.name for a in declared_aux(cls)]
    if declared and tuple(getattr(cls, "aux_names", ())) not in ((), tuple(names)):
        raise StrategyError(f"{label}: aux_names {tuple(cls.aux_names)} and aux_vectors "
                            f"{tuple(names)} disagree; declare aux_vectors only")
    for aux in declared_aux(cls):
        if not isinstance(aux.name, str) or not aux.name.isidentifier():
            raise StrategyError(f"{label}: aux vector name {aux.name!r} is not an identifier")
        if names.count(aux.name) > 1:
            raise StrategyError(f"{label}: aux vector {aux.name!r} is declared twice")
        if aux.length != "model" and (isinstance(aux.length, bool)
                                      or not isinstance(aux.length, int) or aux.length < 1):
            raise StrategyError(f"{label}: aux vector {aux.name!r} has length "
                                f"{aux.length!r}; use 'model' or a positive integer")
        if aux.bound is not None and (isinstance(aux.bound, bool)
                                      or not isinstance(aux.bound, int | float)
                                      or not math.isfinite(aux.bound) or aux.bound <= 0):
            raise StrategyError(f"{label}: aux vector {aux.name!r} has bound {aux.bound!r}; "
                                "use a positive finite number or None")


def check_aux_contract(strategy: StrategyLike, *, dim: int,
                       secure_aggregation: bool, clipping_range: float,
                       privacy_mode: str = "none") -> None:
    """Refuse, in one line, a declaration this job cannot honour (rules 2, 3 and 5)."""
    label = f"strategy {strategy.name!r}"
    check_aux_declaration(strategy, label)
    declared = declared_aux(strategy)
    if declared and privacy_mode == "distributed":
        raise StrategyError(f"{label} sends aux vectors ({', '.join(a.name for a in declared)})"
                            "; distributed DP privatises only the update: choose a strategy "
                            "without them or another privacy.mode")
    if not secure_aggregation:
        return
    for aux in declared:
        length = dim if aux.length == "model" else aux.length
        if length != dim:
            raise StrategyError(f"{label}: aux vector {aux.name!r} has length {length}, but "
                                "under secure aggregation every aux vector must have the "
                                f"model's length ({dim}): it is masked coordinate by "
                                "coordinate beside the update")
        if aux.bound is not None and aux.bound > clipping_range:
            raise StrategyError(f"{label}: aux vector {aux.name!r} declares entries up to "
                                f"{aux.bound:g}, beyond secure_aggregation.clipping_range = "
                                f"{clipping_range:g}, which secure aggregation's fixed-point "
                                f"encoding would clip; set clipping_range >= {aux.bound:g}")


def check_aux_values(strategy: StrategyLike, aux: Mapping[str, torch.Tensor], *, dim: int,
                     batched: bool = False) -> None:
    """What a client (``batched``: a cohort, rows ``[n, d]``) produced obeys the declaration."""
    declared = declared_aux(strategy)
    label = f"strategy {strategy.name!r} broke its aux-vector contract"
    if sorted(aux) != sorted(a.name for a in declared):
        raise StrategyError(f"{label}: it sent aux vectors {sorted(aux)}, declared "
                            f"{sorted(a.name for a in declared)}")
    for spec in declared:
        value = aux[spec.name]
        length = dim if spec.length == "model" else spec.length
        shape = tuple(value.shape[1:]) if batched else tuple(value.shape)
        if shape != (length,):
            raise StrategyError(f"{label}: aux vector {spec.name!r} has shape {shape}, "
                                f"declared ({length},)")
        if not value.numel():
            continue
        if spec.bound is None:
            continue
        # non-finite entries are the finite check's (accept_finite): the client is rejected
        v = value.detach()
        peak = float(torch.where(torch.isfinite(v), v.abs(), torch.zeros_like(v)).amax())
        if peak > spec.bound:
            raise StrategyError(f"{label}: aux vector {spec.name!r} has an entry of size "
                                f"{peak:g}, beyond its declared bound {spec.bound:g}")


def describe_aux(cls: StrategyLike) -> list[dict[str, object]]:
    """The declaration as plain data (``confide strategies``)."""
    return [{"name": a.name, "length": a.length, "bound": a.bound} for a in declared_aux(cls)]

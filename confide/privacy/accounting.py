"""Privacy accounting through Opacus's accountants (RDP and PRV), and calibration.

Confide does not implement an accountant: every epsilon comes from
:class:`opacus.accountants.RDPAccountant` (Mironov 2017; Mironov, Talwar, Zhang 2019 for the
sampled Gaussian mechanism) or :class:`opacus.accountants.PRVAccountant` (Gopi, Lee, Wutschitz
2021, whose ``get_epsilon`` returns the *upper* end of its error interval). This module only
validates inputs, turns Opacus's exceptions into :class:`~confide.exceptions.PrivacyError`
and composes a history of events.

A privacy *event* is ``(noise_multiplier, sample_rate, steps)``: ``steps`` applications of the
sampled Gaussian mechanism with noise ``noise_multiplier * sensitivity`` on a Poisson sample of
rate ``sample_rate`` (the same triple as ``opacus.accountants.IAccountant.history``). One
DP-FedAvg round is one step at ``q = expected cohort / population``; one DP-SGD client round
is ``epochs * batches`` steps at ``q = 1 / batches``.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from confide.exceptions import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "PrivacyEvent",
    "make_accountant",
    "compose",
    "epsilon_of",
    "compute_epsilon",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_sample_rate",
]

#: the Opacus accountants Confide exposes (``privacy.accountant``)
ACCOUNTANTS = ("rdp", "prv")

PrivacyEvent = tuple[float, float, int]


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant (``rdp`` or ``prv``)."""
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"accountant {name!r} is not available; choose one of: "
                           + ", ".join(ACCOUNTANTS))
    return create_accountant(mechanism=name)


def check_delta(delta: float) -> float:
    """``delta`` must lie in (0, 1); returns it as a float."""
    if not isinstance(delta, int | float) or isinstance(delta, bool) or math.isnan(delta):
        raise PrivacyError(f"delta = {delta!r} must be a number in (0, 1)")
    if not 0 < delta < 1:
        raise PrivacyError(f"delta = {delta!r} is out of range; it must be in (0, 1), and "
                           "well below 1 / population size")
    return float(delta)


def check_sample_rate(sample_rate: float) -> float:
    """``sample_rate`` must lie in (0, 1]; returns it as a float."""
    if not 0 < sample_rate <= 1:
        raise PrivacyError(f"sample rate = {sample_rate!r} is out of range; it must be in (0, 1]")
    return float(sample_rate)


def _check_event(event: PrivacyEvent) -> PrivacyEvent:
    z, q, steps = event
    if not (math.isfinite(z) and z > 0):
        raise PrivacyError(f"noise multiplier = {z!r} must be > 0 (no noise: epsilon is "
                           "infinite)")
    check_sample_rate(q)
    if int(steps) != steps or steps < 1:
        raise PrivacyError(f"steps = {steps!r} must be a whole number >= 1")
    return float(z), float(q), int(steps)


def compose(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Merge consecutive events with the same ``(z, q)`` (as ``RDPAccountant.step`` does)."""
    merged: list[PrivacyEvent] = []
    for event in events:
        z, q, steps = _check_event(event)
        if merged and merged[-1][0] == z and merged[-1][1] == q:
            merged[-1] = (z, q, merged[-1][2] + steps)
        else:
            merged.append((z, q, steps))
    return merged


def _opacus_call(what: str, fn, /, **kwargs):  # type: ignore[no-untyped-def]
    """Call into Opacus; its ValueErrors become one-line PrivacyErrors."""
    try:
        with warnings.catch_warnings():
            # RDP warns when the optimal order is at the edge of its alpha grid: the bound
            # is still valid (only possibly loose), and the reference table uses that grid.
            warnings.simplefilter("ignore", UserWarning)
            return fn(**kwargs)
    except (ValueError, OverflowError, ZeroDivisionError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrivacyError(f"{what}: {first}") from None


@functools.lru_cache(maxsize=4096)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """Opacus's RDP curve of one sampled-Gaussian step on ``RDPAccountant.DEFAULT_ALPHAS``."""
    return tuple(float(v) for v in rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS))


def _rdp_epsilon(history: Sequence[PrivacyEvent], delta: float) -> float:
    """What ``RDPAccountant.get_epsilon`` computes, with each ``(z, q)`` curve computed once.

    RDP composes by addition and ``compute_rdp(steps=T) = T * compute_rdp(steps=1)`` (Mironov
    2017, Prop. 1; Opacus ``analysis/rdp.py``), so a ledger that re-evaluates its growing
    history every round only pays for the conversion to (ε, δ), not for the RDP curves.
    """
    rdp = sum(steps * np.asarray(_rdp_of_one_step(z, q)) for z, q, steps in history)
    eps, _order = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp,
                                                 delta=delta)
    return float(eps)


def epsilon_of(events: Sequence[PrivacyEvent], *, delta: float, accountant: str = "rdp"
               ) -> float:
    """Epsilon of the composition of ``events`` at ``delta`` (0 for no events)."""
    check_delta(delta)
    history = compose(events)
    if not history:
        return 0.0
    if accountant == "rdp":
        eps = float(_opacus_call("cannot compute epsilon", _rdp_epsilon, history=history,
                                 delta=delta))
    else:
        acc = make_accountant(accountant)
        acc.history = list(history)
        eps = float(_opacus_call("cannot compute epsilon", acc.get_epsilon, delta=delta))
    if math.isnan(eps):
        raise PrivacyError("cannot compute epsilon: the accountant returned NaN")
    return eps


def compute_epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
    """Epsilon after ``steps`` sampled-Gaussian steps (``confide privacy epsilon``)."""
    return epsilon_of([(noise_multiplier, sample_rate, steps)], delta=delta,
                      accountant=accountant)


def calibrate_noise_multiplier(*, target_epsilon: float, sample_rate: float, steps: int,
                               delta: float, accountant: str = "rdp",
                               epsilon_tolerance: float = 0.01) -> float:
    """The smallest noise multiplier (within Opacus's binary search) that keeps epsilon
    <= ``target_epsilon`` after ``steps`` steps at ``sample_rate``.

    Wraps :func:`opacus.accountants.utils.get_noise_multiplier`, which returns the upper end
    of its bracket, so the result never overspends.
    """
    check_delta(delta)
    check_sample_rate(sample_rate)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target epsilon = {target_epsilon!r} must be > 0")
    if int(steps) != steps or steps < 1:
        raise PrivacyError(f"steps = {steps!r} must be a whole number >= 1")
    if accountant not in ACCOUNTANTS:
        make_accountant(accountant)
    return float(_opacus_call(
        f"cannot reach epsilon {target_epsilon:g} in {int(steps)} steps at sample rate "
        f"{sample_rate:g}", get_noise_multiplier, target_epsilon=target_epsilon,
        target_delta=delta, sample_rate=sample_rate, steps=int(steps), accountant=accountant,
        epsilon_tolerance=epsilon_tolerance))

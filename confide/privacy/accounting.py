"""Privacy accounting through Opacus's accountants (RDP, PRV) and Google's PLD, and calibration.

Confide does not implement an accountant: every epsilon comes from
:class:`opacus.accountants.RDPAccountant` (Mironov 2017; Mironov, Talwar, Zhang 2019 for the
sampled Gaussian mechanism), :class:`opacus.accountants.PRVAccountant` (Gopi, Lee, Wutschitz
2021, whose ``get_epsilon`` returns the *upper* end of its error interval) or
:class:`dp_accounting.pld.PLDAccountant` (privacy loss distributions: Koskela, Jälkö, Honkela
2020; Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022 — its discretisation is pessimistic,
so the epsilon it reports is an upper bound). This module only validates inputs, turns the
accountants' exceptions into :class:`~confide.exceptions.PrivacyError` and composes a history
of events.

A privacy *event* is ``(noise_multiplier, sample_rate, steps)``: ``steps`` applications of the
sampled Gaussian mechanism with noise ``noise_multiplier * sensitivity`` on a Poisson sample of
rate ``sample_rate`` (the same triple as ``opacus.accountants.IAccountant.history``). One
DP-FedAvg round is one step at ``q = expected cohort / population``; one DP-SGD client round
is ``epochs * batches`` steps at ``q = 1 / batches``. An event with ``q = 1`` is the plain
Gaussian mechanism (DP-FTRL's rounds: :mod:`confide.privacy.ftrl`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import dp_accounting
import numpy as np
from dp_accounting import mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.accountant import IAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from confide.exceptions import PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "OPACUS_ACCOUNTANTS",
    "check_accountant",
    "PrivacyEvent",
    "make_accountant",
    "compose",
    "fold_gaussians",
    "epsilon_of",
    "compute_epsilon",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_sample_rate",
]

#: the accountants Confide exposes (``privacy.accountant``)
ACCOUNTANTS = ("rdp", "prv", "pld")
#: those of them that Opacus implements (``pld`` is Google's ``dp_accounting``)
OPACUS_ACCOUNTANTS = ("rdp", "prv")

PrivacyEvent = tuple[float, float, int]


def check_accountant(name: str) -> str:
    """``name`` must be one of :data:`ACCOUNTANTS`; returns it."""
    if name not in ACCOUNTANTS:
        raise PrivacyError(f"accountant {name!r} is not available; choose one of: "
                           + ", ".join(ACCOUNTANTS))
    return name


def make_accountant(name: str) -> IAccountant:
    """A fresh Opacus accountant (``rdp`` or ``prv``)."""
    check_accountant(name)
    if name not in OPACUS_ACCOUNTANTS:
        raise PrivacyError(f"accountant {name!r} is not an Opacus accountant; Opacus has: "
                           + ", ".join(OPACUS_ACCOUNTANTS))
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


def fold_gaussians(history: Sequence[PrivacyEvent]) -> list[PrivacyEvent]:
    """Replace the ``q = 1`` events (plain Gaussian mechanisms) by one equivalent Gaussian.

    ``k`` Gaussian mechanisms with multipliers ``z_i`` compose to exactly one Gaussian
    mechanism with ``z^-2 = sum_i steps_i / z_i^2`` (Dong, Roth, Su 2019, Cor. 3.3: mu-GDP
    composes as the root sum of squares; in RDP the curves ``α / (2 z_i^2)`` add, Mironov 2017,
    Prop. 1 and Table 2). A history of many distinct Gaussians (DP-FTRL's rounds) thus costs one
    accountant evaluation, and is accounted exactly as that one Gaussian (no numerical
    composition error). A history with at most one ``q = 1`` step is unchanged.
    """
    gaussians = [e for e in history if e[1] == 1.0]
    if sum(steps for _z, _q, steps in gaussians) <= 1:
        return list(history)
    inverse_square = math.fsum(steps / z ** 2 for z, _q, steps in gaussians)
    return [e for e in history if e[1] != 1.0] + [(inverse_square ** -0.5, 1.0, 1)]


def _dp_event(history: Sequence[PrivacyEvent]) -> dp_accounting.DpEvent:
    """The history as a ``dp_accounting`` event: Poisson-sampled Gaussians, composed."""
    parts: list[dp_accounting.DpEvent] = []
    for z, q, steps in history:
        one: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            one = dp_accounting.PoissonSampledDpEvent(q, one)
        parts.append(dp_accounting.SelfComposedDpEvent(one, steps) if steps > 1 else one)
    return parts[0] if len(parts) == 1 else dp_accounting.ComposedDpEvent(parts)


def _pld_epsilon(history: Sequence[PrivacyEvent], delta: float) -> float:
    """``PLDAccountant().compose(event).get_epsilon(delta)`` with dp_accounting's defaults
    (add-or-remove-one neighbours, value discretisation interval 1e-4).
    """
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(_dp_event(history))
    return float(accountant.get_epsilon(delta))


def _opacus_call(what: str, fn, /, **kwargs):  # type: ignore[no-untyped-def]
    """Call into an accountant; its ValueErrors become one-line PrivacyErrors."""
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
    check_accountant(accountant)
    history = fold_gaussians(compose(events))
    if not history:
        return 0.0
    if accountant == "rdp":
        eps = float(_opacus_call("cannot compute epsilon", _rdp_epsilon, history=history,
                                 delta=delta))
    elif accountant == "pld":
        eps = float(_opacus_call("cannot compute epsilon", _pld_epsilon, history=history,
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
    check_accountant(accountant)
    if accountant == "pld":
        return float(_opacus_call(
            f"cannot reach epsilon {target_epsilon:g} in {int(steps)} steps at sample rate "
            f"{sample_rate:g}", _pld_calibrate, target_epsilon=target_epsilon, delta=delta,
            sample_rate=sample_rate, steps=int(steps), epsilon_tolerance=epsilon_tolerance))
    return float(_opacus_call(
        f"cannot reach epsilon {target_epsilon:g} in {int(steps)} steps at sample rate "
        f"{sample_rate:g}", get_noise_multiplier, target_epsilon=target_epsilon,
        target_delta=delta, sample_rate=sample_rate, steps=int(steps), accountant=accountant,
        epsilon_tolerance=epsilon_tolerance))


def _pld_calibrate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                   epsilon_tolerance: float) -> float:
    """The PLD accountant's multiplier for ``target_epsilon``: ``dp_accounting``'s
    ``calibrate_dp_mechanism`` (Brent's method, then a check that guarantees
    ``epsilon <= target``), searched to a tolerance of ``epsilon_tolerance / 10`` in ``z``.

    The RDP multiplier brackets it from above (PLD's epsilon is the tighter bound, so it
    needs no more noise than RDP does), which keeps the number of PLD evaluations small.
    """
    upper = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                 sample_rate=sample_rate, steps=steps, accountant="rdp",
                                 epsilon_tolerance=epsilon_tolerance)
    def search(bracket: mechanism_calibration.BracketInterval, interval: float) -> float:
        return float(dp_accounting.calibrate_dp_mechanism(
            lambda: pld_privacy_accountant.PLDAccountant(
                value_discretization_interval=interval),
            lambda z: _dp_event([(float(z), sample_rate, steps)]),
            target_epsilon, delta, bracket_interval=bracket, tol=epsilon_tolerance / 10))

    def calibrate(interval: float) -> float:
        try:
            return search(dp_accounting.ExplicitBracketInterval(upper / 4, upper), interval)
        except ValueError:  # upper / 4 already within budget: search below it from scratch
            return search(dp_accounting.LowerEndpointAndGuess(0.05, upper / 4), interval)

    # Search on a 10x coarser discretisation (cheaper), then check the result with the
    # accountant that enforces the budget (the default 1e-4); only if that check fails,
    # search again at 1e-4. Either way the returned multiplier never overspends.
    z = calibrate(1e-3)
    if _pld_epsilon([(z, sample_rate, steps)], delta) <= target_epsilon:
        return z
    return calibrate(1e-4)

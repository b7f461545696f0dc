"""Correlated-noise mechanisms for DP-FTRL as matrix factorisations, and their sensitivity.

DP-FTRL releases noisy prefix sums ``S̃_t = sum_{i<=t} x_i + N_t`` of the per-round sums
``x_i`` of clipped client updates. Every mechanism here is a factorisation ``A = B C`` of the
prefix-sum matrix ``A`` (lower-triangular ones): the *encoder* ``C`` is privatised as
``C x + z`` with ``z ~ N(0, σ² I)`` and the prefix sums are decoded as ``B (C x + z)``, i.e.
``A x + B z`` (Denisov, McMahan, Rush, Smith, Thakurta 2022, Sec. 2; Choquette-Choo et al.,
NeurIPS 2023 "Amplified Banded Matrix Factorization", Sec. 2). The privacy of the release is
that of one Gaussian mechanism with noise multiplier ``z / sens(C)``, where ``sens(C)`` is
the largest ``||C u||_F`` over a client's possible contributions ``u`` (one clipped update per
participation, norm <= 1) under the participation pattern the coordinator enforces
(:func:`sensitivities`).

:class:`BandedToeplitz` is a banded lower-triangular Toeplitz ``C`` (band ``b``); tree
aggregation (:mod:`confide.privacy.ftrl_tree`) is another ``C``. Each mechanism generates its
noise online, one round at a time (:meth:`CorrelatedNoise.step` returns ``N_t - N_{t-1}``, the
noise on round ``t``'s increment), from a :class:`~confide.privacy.ftrl_noise.NoiseSource`.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from confide.exceptions import PrivacyError
from confide.privacy.ftrl_noise import NoiseSource

__all__ = ["CorrelatedNoise", "BandedToeplitz", "sqrt_prefix_coefficients", "sensitivities"]


class CorrelatedNoise:
    """An online correlated-noise mechanism: an encoder ``C`` and its noise stream."""

    #: a short name for the ledger
    name = "correlated"

    def __init__(self) -> None:
        self.source: NoiseSource | None = None
        self.dim = 0
        self.std = 0.0
        self.rounds_done = 0

    def encoder(self, rounds: int) -> tuple[np.ndarray, np.ndarray]:
        """``(C, released)``: ``C`` (noise vectors x rounds) and, per row, the round (1-based)
        after which that row's noisy value is in use. The first ``t`` rounds' mechanism is
        ``C[released <= t, :t]``.
        """
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        """Parameters for the ledger's settings."""
        return {"mechanism": self.name}

    def start(self, *, source: NoiseSource, dim: int, std: float) -> None:
        """Begin round 1's noise: vectors of ``dim`` coordinates, each node ``N(0, std^2)``."""
        self.source, self.dim, self.std, self.rounds_done = source, int(dim), float(std), 0
        self._reset()

    def _reset(self) -> None:
        raise NotImplementedError

    def _normal(self, stream: int, index: int) -> np.ndarray:
        if self.source is None:
            raise PrivacyError("the DP-FTRL noise was used before it was started")
        return self.std * self.source.normal(stream, index, self.dim)

    def step(self) -> np.ndarray:
        """The next round's noise ``N_t - N_{t-1}`` (float64, ``dim`` coordinates)."""
        raise NotImplementedError


def sqrt_prefix_coefficients(count: int) -> np.ndarray:
    """The first ``count`` coefficients of ``(1 - x)^(-1/2)``: ``c_k = binom(2k, k) / 4^k``.

    The lower-triangular Toeplitz matrix with these coefficients squares to the prefix-sum
    matrix ``A`` (the power series of ``(1-x)^-1`` is the all-ones Toeplitz ``A``), which makes
    it the optimal Toeplitz factorisation up to lower-order terms (Fichtenberger, Henzinger,
    Upadhyay, ICML 2023, Sec. 3; Henzinger, Upadhyay, Upadhyay, SODA 2023).
    """
    c = np.ones(count)
    for k in range(1, count):
        c[k] = c[k - 1] * (2 * k - 1) / (2 * k)
    return c


class BandedToeplitz(CorrelatedNoise):
    """A ``b``-banded lower-triangular Toeplitz encoder ``C`` (``C[i, j] = c_{i-j}`` for
    ``0 <= i - j < b``) and noise ``C^{-1} z`` on the increments.

    The coefficients are those of the square root of ``A`` truncated to the band and scaled to
    unit column norm (a valid banded factorisation; Choquette-Choo et al. 2023 optimise ``C``
    instead, Sec. 5). ``b = 1`` is independent noise per round. A ``b``-banded ``C`` has
    columns with disjoint supports once they are ``b`` or more rounds apart, which makes the
    sensitivity under ``b``-min-separation exact (Choquette-Choo et al. 2023, Sec. 4:
    ``sens = sqrt(k) * max column norm`` for ``k`` participations at most).

    The noise is generated online by forward substitution: ``y_t = (z_t - sum_{j=1}^{b-1}
    c_j y_{t-j}) / c_0``, so only the last ``b - 1`` vectors ``y`` are kept. The truncated
    coefficients are positive and decreasing, so by the Eneström-Kakeya theorem the polynomial
    ``sum_k c_k x^k`` has no zero inside the unit disc and the recursion does not blow up.
    """

    name = "banded"

    def __init__(self, *, band: int) -> None:
        super().__init__()
        if int(band) != band or band < 1:
            raise PrivacyError(f"band = {band!r} must be a whole number >= 1")
        self.band = int(band)
        c = sqrt_prefix_coefficients(self.band)
        self.coefficients = c / math.sqrt(float(np.sum(c ** 2)))
        self._past: deque[np.ndarray] = deque(maxlen=max(1, self.band - 1))

    def describe(self) -> dict[str, object]:  # noqa: D102
        return {"mechanism": self.name, "band": self.band}

    def encoder(self, rounds: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        c = np.zeros((rounds, rounds))
        for k, value in enumerate(self.coefficients[:rounds]):
            c += value * np.eye(rounds, k=-k)
        return c, np.arange(1, rounds + 1)

    def _reset(self) -> None:
        self._past.clear()

    def step(self) -> np.ndarray:  # noqa: D102
        self.rounds_done += 1
        z = self._normal(2, self.rounds_done)
        acc = z.copy()
        # self._past[-j] is y_{t-j}
        for j in range(1, min(self.band, self.rounds_done)):
            acc -= self.coefficients[j] * self._past[-j]
        y = acc / self.coefficients[0]
        if self.band > 1:
            self._past.append(y)
        return y


def _max_separated_sum(values: np.ndarray, separation: int) -> float:
    """``max sum_{j in P} values[j]`` over index sets ``P`` whose gaps are >= ``separation``
    (dynamic programme; ``values >= 0``).
    """
    best = np.zeros(len(values) + 1)
    for t in range(1, len(values) + 1):
        take = values[t - 1] + best[max(0, t - separation)]
        best[t] = max(best[t - 1], take)
    return float(best[-1])


def sensitivities(encoder: np.ndarray, released: np.ndarray, *, participation: str,
                  min_separation: int | None = None) -> np.ndarray:
    """``sens_t`` of the first ``t`` rounds' mechanism, for ``t = 1 .. rounds``.

    * ``single`` — a client takes part at most once: ``sens = max_j ||C[:, j]||``.
    * ``cyclic`` — any number of times, at least ``min_separation`` rounds apart. When all
      columns that far apart have disjoint supports (banded ``C`` with ``b <= separation``,
      tree aggregation restarted at least every ``separation`` rounds), ``||sum_j C[:, j]
      g_j^T||_F^2 = sum_j ||C[:, j]||^2 ||g_j||^2`` exactly, so the sensitivity is the largest
      sum of squared column norms over separated participation sets (Choquette-Choo et al.
      2023, Sec. 4, "b-min-sep participation"). Other encoders are refused: their exact
      sensitivity needs a search over participation patterns this module does not do.
    """
    rounds = encoder.shape[1]
    order = np.argsort(released, kind="stable")
    rows, when = encoder[order], released[order]
    # squared column norms of the first t rounds' rows, for every t
    cumulative = np.cumsum(rows ** 2, axis=0)
    last_row = np.searchsorted(when, np.arange(1, rounds + 1), side="right") - 1
    if participation == "single":
        return np.array([math.sqrt(float(cumulative[last_row[t - 1], :t].max()))
                         for t in range(1, rounds + 1)])
    if participation != "cyclic":
        raise PrivacyError(f"participation = {participation!r} must be 'single' or 'cyclic'")
    if min_separation is None or min_separation < 1:
        raise PrivacyError("cyclic participation needs a minimum separation >= 1")
    support = (encoder != 0).astype(np.float64)
    overlap = support.T @ support
    gap = np.abs(np.subtract.outer(np.arange(rounds), np.arange(rounds)))
    if bool((overlap[gap >= min_separation] > 0).any()):
        raise PrivacyError(
            f"this mechanism's columns overlap for rounds {min_separation} or more apart, so "
            "its sensitivity under cyclic participation is not computed exactly here; use a "
            f"band (or tree restart) <= privacy.min_separation = {min_separation}")
    return np.array([math.sqrt(_max_separated_sum(cumulative[last_row[t - 1], :t],
                                                  min_separation))
                     for t in range(1, rounds + 1)])

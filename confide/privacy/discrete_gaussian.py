"""Distributed DP's client-side encoding and its discrete Gaussian, as pure functions.

Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation", ICML 2021 (DDG): randomised Hadamard rotation (§4.2), conditional
randomised rounding (§4.1), the exact discrete Gaussian sampler of Canonne, Kamath, Steinke
(NeurIPS 2020, Alg. 1-3), the mechanism's RDP (§3, Theorem 1/Prop. 14) and its Poisson
subsampling (Zhu & Wang, ICML 2019). The mechanism that uses them is
:class:`confide.privacy.distributed.DistributedDP`.
"""

from __future__ import annotations

import decimal
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis import rdp as opacus_rdp

from confide.exceptions import PrivacyError

__all__ = [
    "BETA",
    "fwht",
    "padded_length",
    "rotation_signs",
    "rotate",
    "unrotate",
    "conditional_stochastic_round",
    "rounded_l2_bound",
    "sample_discrete_gaussian",
    "DiscreteGaussianShares",
    "ddg_rdp",
    "poisson_subsampled_rdp",
]

#: conditional randomised rounding parameter (Kairouz et al. 2021, §4.1 and §6)
BETA = math.exp(-0.5)
#: largest per-client integer noise scale; keeps the exact sampler inside int64 arithmetic
MAX_SIGMA_INT = 2.0**24


# --------------------------------------------------------------------------- rotation


def fwht(x: np.ndarray) -> np.ndarray:
    """The unnormalised Walsh-Hadamard transform of a vector whose length is a power of two."""
    n = x.shape[0]
    if n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-two length, got {n}")
    y = np.array(x, dtype=np.float64)
    h = 1
    while h < n:
        blocks = y.reshape(-1, 2, h)
        y = np.stack((blocks[:, 0] + blocks[:, 1], blocks[:, 0] - blocks[:, 1]), axis=1)
        h *= 2
    return y.reshape(n)


def padded_length(dim: int) -> int:
    """``d' = 2^ceil(log2 d)``."""
    return 1 << max(0, math.ceil(math.log2(max(dim, 1))))


def rotation_signs(seed: int, length: int) -> np.ndarray:
    """The public random diagonal ``D`` of a round (+-1), from the round's shared seed."""
    return np.random.default_rng(seed).integers(0, 2, size=length).astype(np.float64) * 2 - 1


def rotate(x: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``H D [x, 0] / sqrt(d')`` (Kairouz et al. 2021, §4.2): orthonormal, norm-preserving."""
    padded = np.zeros(signs.shape[0], dtype=np.float64)
    padded[:x.shape[0]] = x
    return fwht(padded * signs) / math.sqrt(signs.shape[0])


def unrotate(y: np.ndarray, signs: np.ndarray, dim: int) -> np.ndarray:
    """Inverse of :func:`rotate` (``H`` is symmetric and ``H H = d' I``), unpadded to ``dim``."""
    return (signs * fwht(y) / math.sqrt(signs.shape[0]))[:dim]


# --------------------------------------------------------------------------- rounding


def rounded_l2_bound(scaled_clip: float, dim: int, beta: float = BETA) -> float:
    """``Delta_2``: the L2 norm conditional randomised rounding guarantees (Kairouz et al.
    2021, §4.1): ``min(c + sqrt(d), sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2)))``
    for a vector of norm ``c`` in ``d`` dimensions (``beta = 0``: unconditional rounding).
    """
    plain = scaled_clip + math.sqrt(dim)
    if beta <= 0:
        return plain
    sq = (scaled_clip**2 + dim / 4
          + math.sqrt(2 * math.log(1 / beta)) * (scaled_clip + math.sqrt(dim) / 2))
    return min(plain, math.sqrt(sq))


def conditional_stochastic_round(x: np.ndarray, bound: float, rng: np.random.Generator,
                                 max_tries: int = 1000) -> np.ndarray:
    """Round every entry of ``x`` stochastically (unbiased), repeating until the rounded
    vector's L2 norm is at most ``bound`` (Kairouz et al. 2021, §4.1).
    """
    low = np.floor(x)
    frac = x - low
    for _ in range(max_tries):
        rounded = (low + (rng.random(x.shape) < frac)).astype(np.int64)
        if float(np.linalg.norm(rounded.astype(np.float64))) <= bound:
            return rounded
    raise PrivacyError(f"conditional rounding failed {max_tries} times: the scaled update "
                       "does not fit the rounding bound (a clip norm / scale mismatch)")


# --------------------------------------------------------------------------- exact sampler
# Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy", NeurIPS 2020:
# Algorithm 3 (discrete Gaussian by rejection from a discrete Laplace of integer scale t),
# vectorised. Their Algorithms 1-2 build the Laplace and the Bernoulli(exp(-x)) draws from
# loops of rational Bernoullis; here the same distributions are drawn exactly by comparing
# one uniform U with exp(-x): the discrete Laplace's magnitude X has P(X >= x) = exp(-x/t),
# so X = max{x : U < exp(-x/t)} (inversion), and Bernoulli(exp(-x)) is [U < exp(-x)].
# float64 decides each comparison where a rigorous error margin allows (all but ~1e-9 of
# them); the rest extend U with fresh random bits and compare against exp(-x) computed to
# ever higher precision with Python's correctly rounded ``decimal``. No outcome is ever
# decided on a rounded probability.

_U_BITS = 62
_SCALE = float(2**_U_BITS)


def _margin(x: np.ndarray) -> np.ndarray:
    """A bound on the relative error of float64 ``exp(-num/den)`` (and of the products that
    scale it), with a safety factor of over 1000: converting num and den and dividing cost
    3 * 2^-53 of x, which an exponential turns into a relative error of 3 * 2^-53 * x; numpy's
    exp is within 4 ulp (2^-50); each product adds 2^-53.
    """
    return 2.0**-40 + 2.0**-45 * x


class _LazyUniform:
    """U = (u + V) / 2^62 with V's bits drawn on demand, compared exactly with exp(-n/d)."""

    def __init__(self, u: int, rng: np.random.Generator) -> None:
        self.value, self.bits, self.rng = u, _U_BITS, rng

    def less_than_exp(self, num: int, den: int) -> bool:
        """``U < exp(-num/den)``, decided exactly."""
        digits = 50
        while True:
            with decimal.localcontext() as ctx:
                ctx.prec = digits
                p = (-(decimal.Decimal(num) / decimal.Decimal(den))).exp()
                err = decimal.Decimal(10) ** (5 - digits)
                while True:
                    unit = decimal.Decimal(2) ** -self.bits
                    low = decimal.Decimal(self.value) * unit
                    if low + unit <= p - err:
                        return True
                    if low >= p + err:
                        return False
                    if unit < err:
                        break  # U is known finer than p: p needs more digits
                    self.value = (self.value << 64) | int(
                        self.rng.integers(0, 2**64, dtype=np.uint64))
                    self.bits += 64
            digits += 40


def _bernoulli_exp(num: np.ndarray, den: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exact Bernoulli(exp(-num/den)) for integer arrays ``num >= 0``, ``den >= 1``."""
    x = num.astype(np.float64) / den.astype(np.float64)
    with np.errstate(under="ignore"):
        p = np.exp(-x)
    m = _margin(x)
    lo = np.floor(np.minimum(p * (1 - m), 1.0) * _SCALE).astype(np.int64)
    hi = np.maximum(np.ceil(np.minimum(p * (1 + m), 1.0) * _SCALE).astype(np.int64), 1)
    u = rng.integers(0, 2**_U_BITS, size=num.shape, dtype=np.int64)
    out = u < lo  # U < (u + 1) / 2^62 <= lo / 2^62 < exp(-x): certainly a success
    for i in np.nonzero((u >= lo) & (u < hi))[0]:  # u >= hi: U >= exp(-x), a failure
        out[i] = _LazyUniform(int(u[i]), rng).less_than_exp(int(num[i]), int(den[i]))
    return out


def _geometric(t: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` exact draws of X >= 0 with P(X >= x) = exp(-x/t): X = max{x: U < exp(-x/t)}."""
    u = rng.integers(0, 2**_U_BITS, size=size, dtype=np.int64)
    guess = np.floor(-t * np.log((u.astype(np.float64) + 0.5) / _SCALE)).astype(np.int64)
    guess = np.maximum(guess, 0)
    # certain when U < exp(-guess/t) and U >= exp(-(guess+1)/t), with margins
    x0, x1 = guess / t, (guess + 1) / t
    p0, p1 = np.exp(-x0), np.exp(-x1)
    lo0 = np.floor(np.minimum(p0 * (1 - _margin(x0)), 1.0) * _SCALE).astype(np.int64)
    hi1 = np.maximum(np.ceil(np.minimum(p1 * (1 + _margin(x1)), 1.0) * _SCALE)
                     .astype(np.int64), 1)
    certain = (u < lo0) & (u >= hi1)
    for i in np.nonzero(~certain)[0]:
        lazy, x = _LazyUniform(int(u[i]), rng), int(guess[i])
        while x > 0 and not lazy.less_than_exp(x, t):
            x -= 1
        while lazy.less_than_exp(x + 1, t):
            x += 1
        guess[i] = x
    return guess


def _discrete_laplace(t: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of P(y) ∝ exp(-|y|/t), integer ``t >= 1`` (the output of CKS 2020,
    Algorithm 2: a magnitude with P(X >= x) = exp(-x/t), a fair sign, and -0 rejected).
    """
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    while pending.size:
        m = pending.size
        x = _geometric(t, m, rng)
        b = rng.integers(0, 2, size=m)
        ok = ~((b == 1) & (x == 0))
        out[pending[ok]] = ((1 - 2 * b) * x)[ok]
        pending = pending[~ok]
    return out


def sample_discrete_gaussian(sigma_sq_s: int, sigma_sq_t: int, size: int,
                             rng: np.random.Generator) -> np.ndarray:
    """``size`` exact draws of N_Z(0, s*t) (CKS 2020, Algorithm 3 with Laplace scale ``t``).

    The variance parameter is the integer ``sigma^2 = s*t``, so the acceptance probability
    ``exp(-(|Y| - sigma^2/t)^2 / (2 sigma^2)) = exp(-(|Y| - s)^2 / (2 s t))`` is a ratio of
    integers. ``t = floor(sigma) + 1`` is efficient; any ``t >= 1`` is exact.
    """
    s, t = int(sigma_sq_s), int(sigma_sq_t)
    if s < 1 or t < 1 or s * t > MAX_SIGMA_INT**2:
        raise PrivacyError(f"discrete Gaussian variance {s}*{t} is outside the sampler's range")
    out = np.empty(size, dtype=np.int64)
    pending = np.arange(size)
    den = 2 * s * t
    while pending.size:
        y = _discrete_laplace(t, pending.size, rng)
        gap = np.abs(y) - s
        huge = np.abs(gap) > 2**30  # never in practice; keeps the squares inside int64
        accept = _bernoulli_exp(np.where(huge, 0, gap) ** 2,
                                np.full(y.shape, den, dtype=np.int64), rng)
        for i in np.nonzero(huge)[0]:
            accept[i] = _LazyUniform(int(rng.integers(0, 2**_U_BITS)), rng).less_than_exp(
                int(gap[i]) ** 2, den)
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    return out


@dataclass(frozen=True)
class DiscreteGaussianShares:
    """A client's noise share ``N_Z(0, s*t)`` with ``t = floor(sigma) + 1``, ``s*t ~ sigma^2``."""

    s: int
    t: int

    @classmethod
    def for_sigma(cls, sigma_int: float) -> DiscreteGaussianShares:
        """The exact-sampler parameters closest to integer-unit noise scale ``sigma_int``."""
        if not sigma_int >= 0.5:
            raise PrivacyError(f"the per-client noise scale {sigma_int:.3g} (integer units) is "
                               "too small for the discrete Gaussian; raise "
                               "secure_aggregation.bits")
        t = math.floor(sigma_int) + 1
        return cls(max(1, round(sigma_int**2 / t)), t)

    @property
    def sigma(self) -> float:
        """The exact noise scale, ``sqrt(s*t)``."""
        return math.sqrt(self.s * self.t)

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """``size`` exact draws."""
        return sample_discrete_gaussian(self.s, self.t, size, rng)


# --------------------------------------------------------------------------- accounting


def ddg_rdp(order: int, *, l2: float, l1: float, tau: float, dim: int) -> float:
    """RDP at integer ``order`` of the (distributed) discrete Gaussian mechanism, given
    ``l2 = Delta_2 / sigma_total``, ``l1 = Delta_1 / sigma_total`` and the summation term
    ``tau`` (Kairouz et al. 2021, Proposition 14 / Eq. (17) with Theorem 1).
    """
    a = float(order)
    return min(a / 2 * l2**2 + tau * dim,
               a / 2 * (l2**2 + 2 * l1 * tau + tau**2 * dim),
               a / 2 * (l2 + math.sqrt(dim) * tau) ** 2)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _logsumexp(terms: Sequence[float], weights: Sequence[float]) -> float:
    top = max(t for t, w in zip(terms, weights, strict=True) if w > 0)
    return top + math.log(sum(w * math.exp(t - top) for t, w in zip(terms, weights,
                                                                      strict=True)))


def poisson_subsampled_rdp(order: int, q: float, rdp: Mapping[int, float]) -> float:
    """RDP at integer ``order`` of a mechanism with integer-order RDP ``rdp`` run on a
    Poisson sample of rate ``q`` (Zhu & Wang, ICML 2019, general upper bound)::

        1/(a-1) log[ (1-q)^(a-1) (a q - q + 1) + C(a,2) q^2 (1-q)^(a-2) e^{eps(2)}
                     + 3 sum_{l=3..a} C(a,l) q^l (1-q)^(a-l) e^{(l-1) eps(l)} ]

    capped by the unsampled ``rdp[order]`` (sampling never hurts).
    """
    a = int(order)
    if q >= 1:
        return rdp[a]
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * log_1q + math.log(a * q - q + 1),
             _log_comb(a, 2) + 2 * log_q + (a - 2) * log_1q + rdp[2]]
    weights = [1.0, 1.0]
    for ell in range(3, a + 1):
        terms.append(_log_comb(a, ell) + ell * log_q + (a - ell) * log_1q
                     + (ell - 1) * rdp[ell])
        weights.append(3.0)
    return min(rdp[a], _logsumexp(terms, weights) / (a - 1))


def _interpolate(order: float, table: Mapping[int, float]) -> float:
    """A valid RDP bound at a fractional order from integer orders: ``(a-1) eps(a)`` is convex
    in ``a`` (Mironov 2017; interpolate between floor and ceil), and eps is non-decreasing,
    so orders below 2 take eps(2).
    """
    if order <= 2:
        return table[2]
    lo, hi = math.floor(order), math.ceil(order)
    if lo == hi:
        return table[lo]
    w = order - lo
    return ((1 - w) * (lo - 1) * table[lo] + w * (hi - 1) * table[hi]) / (order - 1)


def _conversion_floor(order: float, delta: float) -> float:
    """Opacus's RDP -> (epsilon, delta) conversion at ``order`` with zero RDP: no epsilon
    computed at this order can be smaller.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = opacus_rdp.get_privacy_spent(orders=[order], rdp=[0.0], delta=delta)
    return float(eps)

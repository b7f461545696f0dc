"""Distributed DP: the distributed discrete Gaussian mechanism under secure aggregation.

``privacy.mode = "distributed"`` (Kairouz, Liu, Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021). No party, the
coordinator included, ever sees a client's update with less than the full noise: each client
adds a share of discrete Gaussian noise to its own quantised update, secure aggregation sums
the shares exactly in Z_{2^b}, and only the noised sum is revealed.

Client (a pipeline stage, DESIGN.md step 4; Kairouz et al. 2021, Algorithm 1):

1. clip the flattened update to L2 norm ``c`` (``privacy.clip_norm``);
2. pad to ``d' = 2^ceil(log2 d)`` and rotate, ``x <- H D x / sqrt(d')``: a randomised
   Walsh-Hadamard transform with a per-round public sign vector ``D`` (§4.2: it flattens the
   vector so that modular clipping of single coordinates becomes unlikely);
3. scale by ``1/gamma`` and round each coordinate stochastically, repeating until the
   rounded vector's norm is at most ``Delta_2`` (conditional randomised rounding with
   ``beta = exp(-0.5)``, §4.1), which bounds the sensitivity after rounding;
4. add discrete Gaussian noise ``N_Z(0, sigma_int^2)`` to every coordinate, sampled exactly
   (Canonne, Kamath, Steinke, NeurIPS 2020, Algorithms 1-3, integer arithmetic only);
5. reduce modulo ``2^b`` (``secure_aggregation.bits``): the vector enters SecAgg+ as is.

Coordinator (``process_aggregate``, step 6): the modular sum is lifted to
``[-2^(b-1), 2^(b-1))``, multiplied by ``gamma``, rotated back, unpadded, and divided by the
expected cohort size (fixed denominator, as central DP-FedAvg).

Accounting (step 8). The mechanism's own Rényi DP at integer orders: Kairouz et al. 2021,
Theorem 1 (the sum of n discrete Gaussians is close to one, the ``tau`` term) and
Proposition 14 / Eq. (17) (three bounds, the smallest is taken), with the sensitivities
inflated by rounding (§4.1); amplified by Poisson sampling of clients with the general upper
bound of Zhu & Wang (ICML 2019, "Poisson subsampled RDP"). The ledger of
:mod:`confide.privacy.ledger` records sampled-Gaussian events; each round records the
*Gaussian-equivalent* multiplier ``z_eq``: the largest ``z`` whose sampled-Gaussian RDP
(Opacus) is at least the mechanism's bound at every order that can determine an epsilon up
to the budget. The ledger's epsilon is therefore never below the mechanism's own; the latter
is also reported every round (``ddg_epsilon`` in the history). Each round is accounted with
the number of clients whose noise actually reached the sum (dropouts lower it).

Noise and rounding in simulation are seeded (per client and round, from the run seed) so
runs are reproducible; a deployment must draw them from a CSPRNG.
"""

from __future__ import annotations

import decimal
import functools
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.rdp import RDPAccountant

from confide.client.pipeline import StageContext, UpdateStage
from confide.exceptions import ConfigError, PrivacyError
from confide.privacy.accounting import PrivacyEvent, calibrate_noise_multiplier
from confide.privacy.ledger import POPULATION, LedgeredPrivacy
from confide.privacy.mechanisms import l2_clip
from confide.privacy.secagg.aggregator import ENCODED_INFO_KEY, PROTOCOL_DROPOUT_STAGES
from confide.seeding import derive_seed

if TYPE_CHECKING:
    from confide.config import Config
    from confide.round import Aggregate

__all__ = [
    "BETA",
    "fwht",
    "rotate",
    "unrotate",
    "conditional_stochastic_round",
    "rounded_l2_bound",
    "sample_discrete_gaussian",
    "DiscreteGaussianShares",
    "ddg_rdp",
    "poisson_subsampled_rdp",
    "DistributedDP",
    "build_round_privacy",
]

log = logging.getLogger("confide")

#: conditional randomised rounding parameter (Kairouz et al. 2021, §4.1 and §6)
BETA = math.exp(-0.5)
#: standard deviations of the noisy sum that must fit in Z_{2^b} (Kairouz et al. 2021, §4.4)
K_STDDEVS = 4.0
#: largest per-client integer noise scale; keeps the exact sampler inside int64 arithmetic
MAX_SIGMA_INT = 2.0**24
#: Opacus's RDP orders, at which the ledger converts RDP to epsilon
LEDGER_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: integer orders for the mechanism's own epsilon
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 257))


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


@dataclass(frozen=True)
class _Round:
    """One round's mechanism parameters (in integer units after scaling)."""

    l2: float
    l1: float
    tau: float
    dim: int


# --------------------------------------------------------------------------- the mode


class DistributedDP(LedgeredPrivacy):
    """Client-level DP-FedAvg with the distributed discrete Gaussian under SecAgg+."""

    weighting = "uniform"
    sampling = "poisson"

    def __init__(self, *, clip_norm: float, sigma_local: float, bits: int, dim: int,
                 sample_rate: float, expected_clients: float, max_clients: int, delta: float,
                 target_epsilon: float | None = None, seed: int = 0,
                 noise_multiplier_pinned: bool = True,
                 planned_clients: int | None = None) -> None:
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise PrivacyError(f"clip norm = {clip_norm!r} must be > 0")
        if not sigma_local > 0:
            raise PrivacyError("distributed DP needs noise: sigma_local must be > 0")
        self.clip_norm = float(clip_norm)
        self.bits = int(bits)
        self.dim = int(dim)
        self.padded = padded_length(dim)
        self.sample_rate = float(sample_rate)
        self.expected_clients = float(expected_clients)
        self.max_clients = int(max_clients)
        #: noise shares a round is planned (and the noise calibrated) for
        self.planned_clients = int(planned_clients or math.floor(expected_clients))
        self.seed = int(seed)
        self._pinned = noise_multiplier_pinned
        self.target = target_epsilon
        self._set_noise(sigma_local)
        self._last: dict[str, float] = {}
        self._ddg_rdp_total = np.zeros(len(INTEGER_ORDERS))
        super().__init__(mode="distributed", accountant="rdp", delta=delta,
                         target_epsilon=target_epsilon, settings=self._settings())

    # ------------------------------------------------------------------ parameters
    def _set_noise(self, sigma_local: float) -> None:
        """Fix sigma (original units), then gamma (Kairouz et al. 2021, §4.4) and the
        integer noise shares.
        """
        self.sigma_local = float(sigma_local)
        self.gamma = scale_for_bits(bits=self.bits, clip_norm=self.clip_norm,
                                    sigma_local=self.sigma_local, clients=self.max_clients,
                                    dim=self.padded)
        self.noise = DiscreteGaussianShares.for_sigma(self.sigma_local / self.gamma)
        self.delta_2 = rounded_l2_bound(self.clip_norm / self.gamma, self.padded)

    def _settings(self) -> dict[str, Any]:
        return {"mechanism": "distributed discrete Gaussian (Kairouz et al. 2021)",
                "clip_norm": self.clip_norm, "sigma_local": self.sigma_local,
                "bits": self.bits, "gamma": self.gamma, "noise_s": self.noise.s,
                "noise_t": self.noise.t, "dim": self.dim, "padded_dim": self.padded,
                "beta": BETA, "sample_rate": self.sample_rate,
                "expected_clients": self.expected_clients, "max_clients": self.max_clients,
                "planned_clients": self.planned_clients}

    def round_parameters(self, n: int) -> _Round:
        """The mechanism with ``n`` noise shares, in integer units (Kairouz et al. 2021)."""
        sigma_total = math.sqrt(n) * self.noise.sigma
        d = self.padded
        l1_sens = self.delta_2 * min(math.sqrt(d), self.delta_2)
        # Theorem 1: the sum of n discrete Gaussians N_Z(0, sigma^2) is close to N_Z(0, n
        # sigma^2); the gap is tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k/(k+1)).
        s2 = self.noise.sigma**2
        tau = 10 * sum(math.exp(-2 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, n))
        return _Round(l2=self.delta_2 / sigma_total, l1=l1_sens / sigma_total, tau=tau, dim=d)

    def mechanism_rdp(self, n: int) -> dict[int, float]:
        """Subsampled RDP of one round with ``n`` noise shares, at every integer order."""
        return dict(zip(INTEGER_ORDERS, _mechanism_rdp(self.round_parameters(n),
                                                       self.sample_rate), strict=True))

    def equivalent_multiplier(self, n: int) -> float:
        """``z_eq``: the largest sampled-Gaussian multiplier whose RDP (Opacus) dominates this
        round's bound at every ledger order that can set an epsilon within the budget.
        """
        return _equivalent_multiplier(self.round_parameters(n), self.sample_rate,
                                      self.ledger.delta, self._epsilon_cap())

    def _epsilon_cap(self) -> float:
        # With a budget, the ledger never reports more than it, so orders whose conversion
        # alone exceeds it cannot set its epsilon; without one, every order counts.
        return float(self.target) if self.target is not None else math.inf

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Config, *, num_clients: int, dim: int) -> DistributedDP:
        """Build from ``[privacy]`` and ``[secure_aggregation]``; calibrate sigma when needed."""
        p, sa = config.privacy, config.secure_aggregation
        if not sa.enabled:
            raise ConfigError("privacy.mode = 'distributed' needs secure_aggregation.enabled = "
                              "true: without it the coordinator sees each client's update "
                              "with only its small share of the noise")
        if p.accountant != "rdp":
            raise ConfigError("privacy.mode = 'distributed' accounts with Rényi DP; set "
                              "privacy.accountant = 'rdp'")
        if p.adaptive_clipping:
            raise ConfigError("privacy.adaptive_clipping is not available with privacy.mode "
                              "= 'distributed'; use a fixed privacy.clip_norm")
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ConfigError("privacy.mode = 'distributed' needs privacy.noise_multiplier or "
                              "privacy.target_epsilon")
        if p.noise_multiplier is not None and p.noise_multiplier == 0:
            raise ConfigError("privacy.noise_multiplier = 0 adds no noise; give a multiplier "
                              "> 0, or set privacy.mode = 'off'")
        expected = config.cohort_size()
        q = expected / num_clients
        # Noise shares are sized for the clients expected to reach the sum: fewer than
        # the expected cohort when the simulation drops clients before their input is sent.
        sim = config.simulation
        lost = sim.dropout_rate if sim.dropout_stage in ("training",
                                                         *PROTOCOL_DROPOUT_STAGES[:-1]) else 0.0
        rounds = config.run.rounds
        # Poisson sampling: the realised count wanders around its mean; a 3-sigma margin on
        # the average over the run keeps the budget from running out before the last round.
        margin = 1 - 3 / math.sqrt(max(expected * rounds, 1))
        n_cal = max(2, math.floor(expected * (1 - lost) * margin))
        max_clients = min(num_clients, math.ceil(expected + 4 * math.sqrt(expected) + 1))
        common = dict(clip_norm=p.clip_norm, bits=sa.bits, dim=dim, sample_rate=q,
                      expected_clients=expected, max_clients=max_clients, delta=p.delta,
                      target_epsilon=p.target_epsilon, seed=config.run.seed,
                      planned_clients=n_cal)
        if p.noise_multiplier is not None:
            sigma_total = p.noise_multiplier * p.clip_norm
            return cls(sigma_local=sigma_total / math.sqrt(n_cal), **common)  # type: ignore[arg-type]
        target = float(p.target_epsilon)  # type: ignore[arg-type]
        z_central = calibrate_noise_multiplier(target_epsilon=target, sample_rate=q,
                                               steps=rounds, delta=p.delta, accountant="rdp")
        # The smallest total noise whose Gaussian-equivalent multiplier (with n_cal shares)
        # reaches the central one: the ledger then reaches the target after run.rounds.
        # z_eq grows almost linearly with the noise, so a few secant steps find it.
        z_total = z_central
        probe = cls(sigma_local=z_total * p.clip_norm / math.sqrt(n_cal),
                    noise_multiplier_pinned=False, **common)  # type: ignore[arg-type]
        for _ in range(20):
            z_eq = probe.equivalent_multiplier(n_cal)
            if z_central <= z_eq <= z_central * (1 + 1e-3):
                break
            z_total *= (z_central / z_eq) * (1 + 5e-4)
            probe._set_noise(z_total * p.clip_norm / math.sqrt(n_cal))
        else:
            raise PrivacyError(f"cannot calibrate the distributed discrete Gaussian to "
                               f"epsilon {target:g}; raise secure_aggregation.bits")
        hi = z_total
        dp = cls(sigma_local=probe.sigma_local, noise_multiplier_pinned=False,
                 **common)  # type: ignore[arg-type]
        log.info("distributed DP: central multiplier %.4f for epsilon %g over %d rounds at q = "
                 "%.4g; discrete noise of total multiplier %.4f from %d clients (sigma_local "
                 "%.4g, gamma %.3g, %d bits)", z_central, target, rounds, q, hi, n_cal,
                 dp.sigma_local, dp.gamma, sa.bits)
        return dp

    # ------------------------------------------------------------------ step 4 (client)
    def client_stages(self) -> list[UpdateStage]:  # noqa: D102
        return [self.encode_update]

    def encode_update(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        """Clip, rotate, scale, round, noise and wrap one client's update (module docstring).

        Returns a float64 tensor of integers in ``[0, 2^b)``: the SecAgg+ input.
        """
        flat = update.detach().reshape(-1).cpu()
        if flat.numel() != self.dim:
            raise PrivacyError(f"distributed DP was set up for {self.dim} parameters, the "
                               f"update has {flat.numel()}")
        # Clip in the update's own precision (l2_clip verifies the norm in float64; for
        # float64 input its verification can miss by a few ulps of a long sum), then rotate
        # in float64: the rotation is orthonormal and the rounding bound has ample slack.
        clipped = l2_clip(flat.to(torch.float32), self.clip_norm).double().numpy()
        signs = rotation_signs(derive_seed(self.seed, "ddp-rotation", ctx.server_round),
                               self.padded)
        scaled = rotate(clipped, signs) / self.gamma
        rng = np.random.default_rng(derive_seed(ctx.seed, "ddp-rounding-and-noise"))
        rounded = conditional_stochastic_round(scaled, self.delta_2, rng)
        noised = rounded + self.noise.sample(self.padded, rng)
        ctx.info[ENCODED_INFO_KEY] = self.bits
        return torch.from_numpy(np.mod(noised, 1 << self.bits).astype(np.float64))

    # ------------------------------------------------------------------ step 6 (server)
    def process_aggregate(self, aggregate: Aggregate, server_round: int) -> Aggregate:  # noqa: D102
        if aggregate.aux_sum:
            raise PrivacyError("distributed DP does not privatise auxiliary vectors ("
                               + ", ".join(sorted(aggregate.aux_sum)) + ")")
        if aggregate.robust_update is not None:
            raise PrivacyError("robust aggregators see individual updates; they cannot be "
                               "combined with distributed DP")
        words = aggregate.update_sum.to(torch.float64).numpy().astype(np.int64)
        if words.shape[0] != self.padded:
            raise PrivacyError(f"the aggregated vector has {words.shape[0]} entries, expected "
                               f"{self.padded}: were the updates encoded by distributed DP?")
        modulus = 1 << self.bits
        words = np.mod(words, modulus)
        centred = np.where(words >= modulus // 2, words - modulus, words).astype(np.float64)
        signs = rotation_signs(derive_seed(self.seed, "ddp-rotation", server_round),
                               self.padded)
        decoded = unrotate(centred * self.gamma, signs, self.dim)
        n = aggregate.count
        aggregate.update_sum = torch.from_numpy(decoded).to(torch.float32)
        aggregate.weight_sum = float(n)
        # McMahan et al. 2018, Alg. 1: the fixed denominator (expected cohort size).
        aggregate.denominator = self.expected_clients
        z_eq = self.equivalent_multiplier(n)
        self.stage_event(POPULATION, (z_eq, self.sample_rate, 1))
        self._ddg_rdp_total = self._ddg_rdp_total + np.array(
            [self.mechanism_rdp(n)[a] for a in INTEGER_ORDERS])
        self._last = {"noise_clients": float(n), "equivalent_noise_multiplier": z_eq,
                      "ddg_epsilon": self.mechanism_epsilon()}
        return aggregate

    def mechanism_epsilon(self) -> float:
        """The mechanism's own epsilon so far (integer orders, Opacus's conversion)."""
        if not self._ddg_rdp_total.any():
            return 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            eps, _ = opacus_rdp.get_privacy_spent(orders=list(INTEGER_ORDERS),
                                                  rdp=list(self._ddg_rdp_total),
                                                  delta=self.ledger.delta)
        return float(eps)

    # ------------------------------------------------------------------ step 8 and state
    def planned_events(self, server_round: int, num_sampled_expected: int
                       ) -> dict[str, PrivacyEvent]:
        """A round with the noise shares the noise was calibrated for. A round whose
        realised count falls short costs a little more (the ledger records what it cost);
        the calibration's margin keeps the run's total within the target with high
        probability, but the last round can overshoot it by a hair.
        """
        return {POPULATION: (self.equivalent_multiplier(max(2, self.planned_clients)),
                             self.sample_rate, 1)}

    def round_metrics(self) -> dict[str, float]:  # noqa: D102
        return dict(self._last)

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "sigma_local": self.sigma_local, "bits": self.bits,
                "sample_rate": self.sample_rate,
                "ddg_rdp_total": [float(v) for v in self._ddg_rdp_total]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        for key, mine in (("bits", self.bits), ("sample_rate", self.sample_rate)):
            if key in state and abs(float(state[key]) - float(mine)) > 1e-12:
                raise PrivacyError(f"the checkpoint was accounted with {key} = {state[key]}, "
                                   f"this run has {mine}; resume with the run's own config")
        saved = float(state.get("sigma_local", self.sigma_local))
        if self._pinned and abs(saved - self.sigma_local) > 1e-12 * max(saved, 1):
            raise PrivacyError("privacy.noise_multiplier differs from the one this run was "
                               "accounted with; resume with the run's own config")
        self._set_noise(saved)
        if "ddg_rdp_total" in state:
            self._ddg_rdp_total = np.array(state["ddg_rdp_total"], dtype=np.float64)
        self.ledger.settings.update(self._settings())


def scale_for_bits(*, bits: int, clip_norm: float, sigma_local: float, clients: int,
                   dim: int) -> float:
    """``gamma`` such that K_STDDEVS standard deviations of the noisy sum of ``clients``
    vectors fit in Z_{2^bits} (Kairouz et al. 2021, §4.4, the sub-Gaussian heuristic with
    ``||sum x_i|| <= n c``):
    ``2^b = 2k sqrt(c^2 n^2 / d + (gamma^2/4 + sigma^2) n) / gamma``; never so fine that the
    per-client noise exceeds MAX_SIGMA_INT integer units.
    """
    k, n = K_STDDEVS, clients
    head = 2.0 ** (2 * bits) - n * k**2
    if head <= 0:
        raise ConfigError(f"secure_aggregation.bits = {bits} is too small for distributed DP "
                          f"with {n} clients")
    inv_gamma = math.sqrt(head) / (2 * k * math.sqrt(clip_norm**2 * n**2 / dim
                                                     + n * sigma_local**2))
    gamma = 1 / inv_gamma
    return max(gamma, sigma_local / MAX_SIGMA_INT)


def _mechanism_rdp(r: _Round, q: float) -> list[float]:
    return _mechanism_rdp_cached(r.l2, r.l1, r.tau, r.dim, q)


@functools.lru_cache(maxsize=512)
def _mechanism_rdp_cached(l2: float, l1: float, tau: float, dim: int, q: float) -> list[float]:
    plain = {a: ddg_rdp(a, l2=l2, l1=l1, tau=tau, dim=dim) for a in INTEGER_ORDERS}
    return [poisson_subsampled_rdp(a, q, plain) for a in INTEGER_ORDERS]


def _sgm_rdp(q: float, z: float, orders: Sequence[float]) -> np.ndarray:
    return np.asarray(opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1,
                                             orders=list(orders)))


def _largest_dominating(q: float, orders: Sequence[float], bound: np.ndarray, lo: float,
                        hi: float) -> float:
    """The largest z in [lo, hi] (to 1e-5 relative) with SGM RDP >= ``bound`` at ``orders``."""
    while not np.all(_sgm_rdp(q, lo, orders) >= bound):
        lo, hi = lo / 2, lo
        if lo < 1e-6:
            raise PrivacyError("the distributed discrete Gaussian's privacy cannot be "
                               "expressed by a sampled Gaussian event; raise the noise or "
                               "the bit width")
    while hi / lo > 1 + 1e-5:
        mid = math.sqrt(lo * hi)
        if np.all(_sgm_rdp(q, mid, orders) >= bound):
            lo = mid
        else:
            hi = mid
    return lo


@functools.lru_cache(maxsize=512)
def _equivalent_multiplier_cached(l2: float, l1: float, tau: float, dim: int, q: float,
                                  delta: float, cap: float) -> float:
    table = dict(zip(INTEGER_ORDERS, _mechanism_rdp_cached(l2, l1, tau, dim, q), strict=True))
    # Orders whose conversion alone exceeds the cap cannot set an epsilon within it.
    orders = [a for a in LEDGER_ORDERS if _conversion_floor(a, delta) <= cap]
    if not orders:
        raise PrivacyError("no Rényi order can certify an epsilon within the budget; raise "
                           "privacy.target_epsilon or privacy.delta")
    bound = {a: _interpolate(a, table) * (1 + 1e-9) for a in orders}
    whole = [a for a in orders if float(a).is_integer()]
    frac = [a for a in orders if not float(a).is_integer()]
    # 1. Integer orders are cheap in Opacus: bisect on all of them at once. The Gaussian of
    #    term 3 of Proposition 14 has the same RDP curve before sampling; the answer lies
    #    below it (the general sampling bound is looser than Opacus's exact one).
    guess = 1 / (l2 + math.sqrt(dim) * tau)
    z = guess * 1.01
    if whole:
        z = _largest_dominating(q, whole, np.array([bound[a] for a in whole]), guess / 2, z)
    # 2. Fractional orders are slow (a series each): check them once at z and lower z only
    #    as far as the violated ones require (RDP falls as z grows, so lowering z keeps every
    #    satisfied order satisfied).
    while frac:
        sgm = _sgm_rdp(q, z, frac)
        violated = [a for a, v in zip(frac, sgm, strict=True) if v < bound[a]]
        if not violated:
            break
        z = min(_largest_dominating(q, [a], np.array([bound[a]]), z / 2, z) for a in violated)
    return z


def _equivalent_multiplier(r: _Round, q: float, delta: float, cap: float) -> float:
    return _equivalent_multiplier_cached(r.l2, r.l1, r.tau, r.dim, q, delta, cap)


def build_round_privacy(config: Config, *, num_clients: int, dataset_size: int
                        ) -> DistributedDP:
    """The :class:`DistributedDP` for ``config`` (called by ``confide.privacy``)."""
    from confide.models import build_model
    from confide.parameters import num_params
    from confide.simulations.datasets import load_dataset

    data = load_dataset(config.data.dataset, seed=config.run.seed,
                        test_fraction=config.data.test_fraction, path=config.data.path,
                        client_column=config.data.client_column,
                        label_column=config.data.label_column)
    model = build_model(config.model.name, input_shape=data.input_shape,
                        num_classes=data.num_classes, hidden_units=config.model.hidden_units)
    return DistributedDP.from_config(config, num_clients=num_clients, dim=num_params(model))

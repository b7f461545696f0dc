"""Empirical privacy audit: a lower bound on epsilon from canaries, in one run.

Method (``confide audit``):

1. ``m`` canary clients join the population, each independently with probability 1/2
   (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
   Sec. 3: the inclusion bits are the secret the auditor guesses). A canary's update is a
   fixed random direction in model space, far longer than the clip norm (Andrew et al.,
   "One-shot Empirical Privacy Estimation for Federated Learning", ICLR 2024, Sec. 3:
   random canary directions are nearly orthogonal to everything else in high dimension).
2. The real federation trains for ``run.rounds`` rounds with the configured client-level DP
   mechanism, real clients and included canaries alike: central DP-FedAvg
   (:class:`~confide.privacy.central.CentralDP`), the distributed discrete Gaussian under
   SecAgg+ (:class:`~confide.privacy.distributed.DistributedDP`) or DP-FTRL
   (:class:`~confide.privacy.ftrl.DPFTRL`, whose canaries follow its participation pattern
   instead of Poisson sampling). DP-SGD is audited with canary *examples* whose per-sample
   gradients are Dirac vectors (:mod:`confide.app.audit_dpsgd`); its score is the canary's
   coordinate of the final model delta instead of the cosine of step 3.
3. Each canary's score is the cosine between its direction and the final model delta
   ``w_T - w_0`` (the "final model only" threat model of Andrew et al. 2024).
4. Lower bound (Steinke et al. 2023, Theorem 5.2 with the delta term of Appendix D): guess
   "included" for the ``k+`` highest scores and "excluded" for the ``k-`` lowest; if the
   mechanism were (ε, δ)-DP, the number of correct guesses ``v`` out of ``r`` would exceed a
   Binomial(r, e^ε/(1+e^ε)) tail only with small probability. The reported bound is the
   largest ε rejected at the given confidence; the few (k+, k-) pairs tried share the
   confidence by a union bound.
5. Beside it, the Gaussian-fit *estimate* of Andrew et al. 2024 (Sec. 3.1): the epsilon of
   the Gaussian mechanism that separates the included canaries' mean score from the excluded
   ones' by as many standard deviations. It is an estimate, not a bound.

A correct implementation keeps the lower bound below the accountant's epsilon; with no noise
it is as large as ``m`` canaries can show.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy import stats

from confide.exceptions import PrivacyError
from confide.seeding import derive_seed

__all__ = ["AuditResult", "one_run_p_value", "one_run_epsilon_lower_bound",
           "guess_epsilon_lower_bound", "gaussian_fit_epsilon", "canary_direction"]


# --------------------------------------------------------------------------- statistics
def one_run_p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P-value of ``v`` correct guesses out of ``r`` (``m`` canaries) if the run were
    (ε, δ)-DP (Steinke et al. 2023, Theorem 5.2; delta term as in their Appendix D).
    """
    if not 0 <= v <= r <= m:
        raise PrivacyError(f"audit counts must satisfy 0 <= v <= r <= m (got v={v}, r={r}, "
                           f"m={m})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise PrivacyError("audit needs epsilon >= 0 and delta in [0, 1]")
    if r == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    beta = float(stats.binom.sf(v - 1, r, p))  # P[Binomial(r, p) >= v]
    if delta == 0 or v == 0:
        return min(1.0, beta)
    # alpha = max_i P[v - i <= Binomial(r, p) < v] / i, i = 1..v
    pmf = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(pmf) / np.arange(1, v + 1)))
    return min(1.0, beta + alpha * delta * 2 * m)


def one_run_epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, alpha: float
                                ) -> float:
    """The largest ε whose (ε, δ)-DP null hypothesis ``v`` of ``r`` correct guesses rejects
    at level ``alpha`` (0 when none is rejected).
    """
    if not 0 < alpha < 1:
        raise PrivacyError(f"audit significance level = {alpha!r} must be in (0, 1)")

    def rejected(eps: float) -> bool:
        return one_run_p_value(m=m, r=r, v=v, epsilon=eps, delta=delta) < alpha

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
        if hi > 1e3:  # pragma: no cover - m canaries cannot show more than about log(m)
            return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        if rejected(mid):
            lo = mid
        else:
            hi = mid
    return lo


def guess_epsilon_lower_bound(scores: np.ndarray, included: np.ndarray, *, delta: float,
                              confidence: float = 0.95) -> tuple[float, int, int]:
    """Best lower bound over a few (k+, k-) guess counts; returns (ε, guesses, correct)."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    grid = sorted({(k, k2) for k in (m // 40, m // 20, m // 10, m // 5)
                   for k2 in (0, k) if k > 0})
    if not grid:
        raise PrivacyError(f"the audit needs at least 5 canaries (got {m})")
    level = (1 - confidence) / len(grid)  # union bound over the guess counts tried
    best = (0.0, 0, 0)
    for k_pos, k_neg in grid:
        top, bottom = order[:k_pos], order[m - k_neg:] if k_neg else order[:0]
        correct = int(included[top].sum()) + int((~included[bottom]).sum())
        r = k_pos + k_neg
        eps = one_run_epsilon_lower_bound(m=m, r=r, v=correct, delta=delta, alpha=level)
        if eps > best[0]:
            best = (eps, r, correct)
    return best


def gaussian_fit_epsilon(in_scores: np.ndarray, out_scores: np.ndarray, *, delta: float
                         ) -> float:
    """Epsilon of the Gaussian mechanism with ``μ = (mean_in - mean_out) / sd_out``
    (Andrew et al. 2024, Sec. 3.1), from Balle & Wang 2018, Theorem 8:
    ``δ(ε) = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)``.
    """
    in_scores = np.asarray(in_scores, dtype=np.float64)
    out_scores = np.asarray(out_scores, dtype=np.float64)
    if len(in_scores) < 2 or len(out_scores) < 2:
        return 0.0
    sd = float(np.std(out_scores, ddof=1))
    if sd == 0:
        return math.inf
    mu = abs(float(np.mean(in_scores) - np.mean(out_scores))) / sd
    if mu == 0:
        return 0.0

    def delta_of(eps: float) -> float:
        a = stats.norm.logcdf(-eps / mu + mu / 2)
        b = stats.norm.logcdf(-eps / mu - mu / 2) + eps
        return float(np.exp(a) - np.exp(b)) if a > b else 0.0

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        lo, hi = hi, 2 * hi
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


# --------------------------------------------------------------------------- the audit run
@dataclass(frozen=True)
class AuditResult:
    """What ``confide audit`` reports."""

    #: the audited ``privacy.mode`` and its mechanism in words
    mechanism: str
    description: str
    #: ``client`` (canary clients) or ``gradient`` (canary examples, Dirac gradients)
    canary_kind: str
    canaries: int
    included: int
    rounds: int
    noise_multiplier: float
    sample_rate: float
    delta: float
    confidence: float
    epsilon_accountant: float
    epsilon_lower_bound: float
    guesses: int
    correct: int
    epsilon_estimate: float
    mean_score_included: float
    mean_score_excluded: float

    def to_dict(self) -> dict[str, float | int | str | None]:
        """JSON-safe (infinite values become None)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}


def canary_direction(seed: int, index: int, dim: int) -> torch.Tensor:
    """Canary ``index``'s unit direction in model space (Andrew et al. 2024, Sec. 3)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "audit-canary", index))
    d = torch.randn(dim, generator=gen, dtype=torch.float64)
    return d / torch.linalg.vector_norm(d)

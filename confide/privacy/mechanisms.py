"""DP mechanisms as ``clip()`` + ``add_noise()``; ``privatize()`` is built from the two.

* :func:`l2_clip` bounds one client's contribution (its L2 sensitivity) by ``clip_norm``.
* :class:`GaussianMechanism` adds ``N(0, (noise_multiplier * clip_norm)^2)`` to every
  coordinate of a *sum* of clipped contributions (DP-FedAvg, McMahan et al. 2018, Alg. 1).
* :class:`AdaptiveClipping` moves ``clip_norm`` towards a target quantile of the update norms
  with a privately estimated (noised) count (Andrew et al. 2021).

Randomness: in simulation the noise comes from a ``torch.Generator`` seeded from the run seed
(:func:`confide.seeding.derive_seed`), so the same seed gives the same run. A deployment must
draw DP noise from a cryptographically secure generator (e.g. Opacus ``secure_mode`` with
``torchcsprng``, or a generator seeded from ``os.urandom`` per round and never stored):
a seeded PRNG lets whoever knows the seed subtract the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from confide.exceptions import PrivacyError

if TYPE_CHECKING:
    from confide.round import Aggregate

__all__ = [
    "require_clipped_sum",
    "l2_clip",
    "gaussian_noise",
    "PrivacyMechanism",
    "GaussianMechanism",
    "AdaptiveClipping",
    "split_noise_multiplier",
]


def _check_clip_norm(clip_norm: float) -> float:
    if not (isinstance(clip_norm, int | float) and math.isfinite(clip_norm) and clip_norm > 0):
        raise PrivacyError(f"clip norm = {clip_norm!r} must be a finite number > 0")
    return float(clip_norm)


def l2_clip(vector: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """``vector * min(1, clip_norm / ||vector||_2)``, guaranteed ``||result||_2 <= clip_norm``.

    The L2 sensitivity of a sum of clipped vectors is ``clip_norm`` (McMahan et al. 2018,
    Sec. 3, "flat clipping"); the guarantee is checked after rounding to ``vector``'s dtype,
    since a factor computed in float64 can round *up* in float32.
    """
    c = _check_clip_norm(clip_norm)
    if not bool(torch.isfinite(vector).all()):
        raise PrivacyError("cannot clip a vector with NaN or infinite entries")
    v64 = vector.detach().to(torch.float64)
    norm = float(torch.linalg.vector_norm(v64))
    if norm <= c:
        return vector.clone()
    factor = c / norm
    eps = torch.finfo(vector.dtype).eps
    for i in range(40):
        clipped = (v64 * factor).to(vector.dtype)
        if float(torch.linalg.vector_norm(clipped.to(torch.float64))) <= c:
            return clipped
        # The computed norm itself can be tens of ulp off for long vectors: shrink the factor
        # by a geometrically growing margin so the check is met in a few steps.
        factor = math.nextafter(factor, 0.0) * (1 - min(0.5, (4 << i) * eps))
    raise PrivacyError("clipping did not converge (a vector too large for its dtype?)")


def l2_clip_rows(rows: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """:func:`l2_clip` of every row of ``rows`` ``[n, dim]`` at once, on their device.

    The factor ``C / ||v||`` is shrunk by ``(dim + 2)`` units in the last place of the rows'
    dtype, which bounds both the rounding of the cast (at most half an ulp per entry, so at
    most a factor ``1 + eps/2`` on the norm) and the float64 norm's own summation error
    (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., Sec. 4.2: relative
    error at most ``dim * u``): so ``||result||_2 <= clip_norm`` holds without a host check.
    Rows that are not finite stay non-finite, for the coordinator to reject.
    """
    c = _check_clip_norm(clip_norm)
    v64 = rows.detach().to(torch.float64)
    norms = torch.linalg.vector_norm(v64, dim=1, keepdim=True)
    margin = 1.0 - (rows.shape[1] + 2) * torch.finfo(rows.dtype).eps
    factor = torch.where(norms <= c, torch.ones_like(norms), (c / norms) * margin)
    return (v64 * factor).to(rows.dtype)


def require_clipped_sum(aggregate: Aggregate, *, mechanism: str, advice: str) -> None:
    """Refuse to privatise a sum whose sensitivity the clip does not bound.

    Auxiliary vectors (SCAFFOLD's ``delta_c``) are neither clipped nor noised, and a robust
    aggregator's output depends on individual updates: either would be released without the
    mechanism's guarantee (McMahan et al. 2018, Sec. 3: the bound is on the clipped sum).
    """
    if aggregate.aux_sum:
        raise PrivacyError(
            "this strategy sends auxiliary vectors (" + ", ".join(sorted(aggregate.aux_sum))
            + f") that {mechanism} neither clips nor noises; use {advice}")
    if aggregate.robust_update is not None:
        raise PrivacyError("robust aggregators see individual updates; they cannot be "
                           f"combined with {mechanism}")


def gaussian_noise(like: torch.Tensor, std: float, *, generator: torch.Generator | None
                   ) -> torch.Tensor:
    """Noise shaped like ``like``, i.i.d. ``N(0, std^2)`` per coordinate (float64, then cast)."""
    if not (math.isfinite(std) and std >= 0):
        raise PrivacyError(f"noise standard deviation = {std!r} must be a finite number >= 0")
    if std == 0:
        return torch.zeros_like(like)
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float64, device="cpu")
    return (noise * std).to(device=like.device, dtype=like.dtype)


class PrivacyMechanism:
    """A DP mechanism: ``clip`` bounds a contribution, ``add_noise`` privatises a sum.

    ``privatize`` is ``add_noise(clip(x))``: the local (one contribution) form. Central and
    distributed modes call ``clip`` on each client and ``add_noise`` once on the sum.
    """

    def clip(self, contribution: torch.Tensor) -> torch.Tensor:
        """Bound one contribution's sensitivity."""
        raise NotImplementedError

    def add_noise(self, total: torch.Tensor, *, generator: torch.Generator | None
                  ) -> torch.Tensor:
        """Add noise calibrated to the sensitivity :meth:`clip` enforces."""
        raise NotImplementedError

    def privatize(self, contribution: torch.Tensor, *, generator: torch.Generator | None
                  ) -> torch.Tensor:
        """``add_noise(clip(contribution))``."""
        return self.add_noise(self.clip(contribution), generator=generator)


@dataclass
class GaussianMechanism(PrivacyMechanism):
    """L2 clipping to ``clip_norm`` and Gaussian noise of std ``noise_multiplier * clip_norm``.

    Sampled-Gaussian accounting (Abadi et al. 2016; Mironov et al. 2019) needs exactly this:
    sensitivity ``clip_norm`` per client and noise std ``z * clip_norm`` on the sum
    (McMahan et al. 2018, Alg. 1, "σ = z S").
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        _check_clip_norm(self.clip_norm)
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise PrivacyError(f"noise multiplier = {self.noise_multiplier!r} must be >= 0")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum."""
        return self.noise_multiplier * self.clip_norm

    def clip(self, contribution: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return l2_clip(contribution, self.clip_norm)

    def add_noise(self, total: torch.Tensor, *, generator: torch.Generator | None  # noqa: D102
                  ) -> torch.Tensor:
        return total + gaussian_noise(total, self.noise_std, generator=generator)


def split_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's noise multiplier when a noised count (std ``count_stddev``) shares the round.

    Andrew et al. 2021, Sec. 3.1: releasing the sum of clipped updates with noise multiplier
    ``z_Δ`` and the sum of centred indicators ``b_i - 1/2`` (sensitivity 1/2) with std
    ``σ_b`` composes to one Gaussian mechanism with ``z^-2 = z_Δ^-2 + (2 σ_b)^-2``, so
    ``z_Δ = (z^-2 - (2 σ_b)^-2)^(-1/2)`` keeps the accountant's ``z`` exact. It needs
    ``z < 2 σ_b`` (TFF ``DifferentiallyPrivateFactory.gaussian_adaptive`` checks the same).
    """
    if noise_multiplier <= 0:
        raise PrivacyError("adaptive clipping needs a noise multiplier > 0")
    if noise_multiplier >= 2 * count_stddev:
        raise PrivacyError(
            f"adaptive clipping needs noise_multiplier < 2 * count noise std "
            f"({2 * count_stddev:g} with {count_stddev * 20:g} clients per round); lower "
            f"privacy.noise_multiplier ({noise_multiplier:g}), sample more clients per round, "
            "or use fixed clipping")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass
class AdaptiveClipping:
    """Quantile-based adaptive clip norm (Andrew et al. 2021, Alg. 1, geometric update).

    Each client reports ``b_i - 1/2`` with ``b_i = 1[||Δ_i|| <= C]``; the server noises the sum
    with std ``count_stddev`` (paper: ``σ_b = m / 20`` for ``m`` expected clients per round),
    estimates ``b̃ = noised_sum / m + 1/2`` and updates ``C <- C * exp(-η (b̃ - γ))``.
    """

    clip_norm: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    expected_clients: float = 1.0
    count_stddev: float | None = None

    def __post_init__(self) -> None:
        _check_clip_norm(self.clip_norm)
        if not 0 < self.target_quantile < 1:
            raise PrivacyError(f"target quantile = {self.target_quantile!r} must be in (0, 1)")
        if not self.learning_rate > 0:
            raise PrivacyError(f"clip learning rate = {self.learning_rate!r} must be > 0")
        if not self.expected_clients > 0:
            raise PrivacyError("adaptive clipping needs an expected cohort size > 0")
        if self.count_stddev is None:
            # Andrew et al. 2021, Sec. 4: σ_b = m / 20 (REFERENCES.md, adaptive clipping).
            self.count_stddev = self.expected_clients / 20

    def indicator(self, norm: float) -> float:
        """A client's centred report ``1[norm <= C] - 1/2`` (sensitivity 1/2)."""
        return (1.0 if norm <= self.clip_norm else 0.0) - 0.5

    def update(self, indicator_sum: float, *, generator: torch.Generator | None) -> float:
        """Noise the summed reports, take the geometric step; returns the noised fraction b̃."""
        std = float(self.count_stddev or 0.0)
        noise = float(torch.randn((), generator=generator, dtype=torch.float64)) * std
        fraction = (indicator_sum + noise) / self.expected_clients + 0.5
        fraction = min(1.0, max(0.0, fraction))  # post-processing: clamp to [0, 1]
        self.clip_norm = self.clip_norm * math.exp(
            -self.learning_rate * (fraction - self.target_quantile))
        return fraction

"""Client-level DP with a trusted coordinator: DP-FedAvg (McMahan et al., ICLR 2018).

Per round (McMahan et al. 2018, Alg. 1; the coordinator's DESIGN.md steps in brackets):

1. [1] clients are Poisson-sampled with rate ``q = cohort / population`` — the sampling the
   RDP/PRV accountants of the sampled Gaussian mechanism assume;
2. [4] each client clips its update to L2 norm ``C`` (client stage);
3. [5] the coordinator sums the clipped updates with weight 1 each ("uniform": a client's
   influence must not depend on its data size for the sensitivity to be ``C``);
4. [6] Gaussian noise of std ``z * C`` is added to the sum, and the mean divides by the
   *expected* cohort size ``q * N`` (the "fixed denominator" estimator, Alg. 1 ``f̃_f``), so
   the denominator does not depend on who took part;
5. [8] the ledger records one sampled-Gaussian step ``(z, q, 1)``.

Adaptive clipping (Andrew et al., NeurIPS 2021): each client also reports ``b_i - 1/2`` with
``b_i = 1[||Δ_i|| <= C]``. The report rides as one extra coordinate of the clipped update, so
any aggregator — secure aggregation included — sums it with the update; ``process_aggregate``
splits it off, noises it with ``σ_b = m / 20`` and moves ``C`` geometrically towards the target
quantile. The update's noise multiplier is lowered to ``z_Δ = (z^-2 - (2 σ_b)^-2)^-1/2`` so
that update and count together are exactly one Gaussian mechanism with multiplier ``z``
(Andrew et al. 2021, Sec. 3.1), which is what the ledger accounts.

Noise in simulation is seeded from the run seed (per round), so the same seed gives the same
run; a deployment must draw it from a CSPRNG (see :mod:`confide.privacy.mechanisms`). In
deployment the round's clip norm travels to clients with the round's instructions; in
simulation the client stage reads it from this object.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from confide.client.pipeline import StageContext, UpdateStage
from confide.exceptions import ConfigError, PrivacyError
from confide.privacy.accounting import PrivacyEvent, calibrate_noise_multiplier, epsilon_of
from confide.privacy.ledger import POPULATION, LedgeredPrivacy, cohort_sampling
from confide.privacy.mechanisms import (
    AdaptiveClipping,
    GaussianMechanism,
    l2_clip_rows,
    require_clipped_sum,
    split_noise_multiplier,
)
from confide.seeding import derive_seed

if TYPE_CHECKING:
    from confide.config import Config
    from confide.round import Aggregate

__all__ = ["CentralDP"]

log = logging.getLogger("confide")

#: executors whose clients run this very object's client stage (adaptive clipping reads the
#: round's clip norm from it and appends the clipped-count bit to the update)
IN_PROCESS_EXECUTORS = ("sequential", "vectorized")


class CentralDP(LedgeredPrivacy):
    """DP-FedAvg with fixed or adaptive clipping and central Gaussian noise."""

    weighting = "uniform"
    sampling = "poisson"

    def __init__(self, *, noise_multiplier: float, clip_norm: float, sample_rate: float,
                 expected_clients: float, delta: float, accountant: str = "rdp",
                 target_epsilon: float | None = None, seed: int = 0,
                 adaptive: AdaptiveClipping | None = None,
                 noise_multiplier_pinned: bool = True) -> None:
        if not noise_multiplier >= 0:
            raise PrivacyError(f"noise multiplier = {noise_multiplier!r} must be >= 0")
        if not 0 < sample_rate <= 1:
            raise PrivacyError(f"sample rate = {sample_rate!r} must be in (0, 1]")
        if not expected_clients > 0:
            raise PrivacyError("central DP needs an expected cohort size > 0")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.expected_clients = float(expected_clients)
        self.seed = int(seed)
        self.adaptive = adaptive
        #: False when the multiplier was calibrated from target_epsilon (a resumed run then
        #: keeps the checkpoint's multiplier instead of recalibrating for new run.rounds)
        self._explicit_noise = noise_multiplier_pinned
        self.mechanism = GaussianMechanism(clip_norm=clip_norm,
                                           noise_multiplier=self._update_noise_multiplier())
        self._last_metrics: dict[str, float] = {}
        super().__init__(mode="central", accountant=accountant, delta=delta,
                         target_epsilon=target_epsilon, settings=self._settings())

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Config, *, num_clients: int) -> CentralDP:
        """Build from ``[privacy]``; calibrates ``z`` from ``target_epsilon`` when needed."""
        p = config.privacy
        expected, q = cohort_sampling(config, num_clients)
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ConfigError(f"privacy.mode = {p.mode!r} needs privacy.noise_multiplier or "
                              "privacy.target_epsilon (to calibrate the multiplier)")
        if p.noise_multiplier is not None and p.noise_multiplier == 0:
            raise ConfigError("privacy.noise_multiplier = 0 adds no noise (epsilon would be "
                              "infinite); give a multiplier > 0, or set privacy.mode = 'off'")
        if p.delta >= 1 / num_clients:
            log.warning("privacy.delta = %g is not below 1 / %d clients: a mechanism that "
                        "publishes one client's update outright meets such a delta", p.delta,
                        num_clients)
        if p.noise_multiplier is not None:
            z = p.noise_multiplier
        else:
            target = float(p.target_epsilon)  # type: ignore[arg-type]
            z = calibrate_noise_multiplier(target_epsilon=target, sample_rate=q,
                                           steps=config.run.rounds, delta=p.delta,
                                           accountant=p.accountant)
            log.info("privacy: noise multiplier %.4f calibrated for epsilon %g over %d rounds "
                     "at q = %.4g (delta %g, %s)", z, target, config.run.rounds, q,
                     p.delta, p.accountant)
        if p.noise_multiplier is not None and p.target_epsilon is not None:
            eps_full = epsilon_of([(z, q, config.run.rounds)], delta=p.delta,
                                  accountant=p.accountant)
            if eps_full > p.target_epsilon:
                log.info("privacy: %d rounds at noise multiplier %g would spend epsilon "
                         "%.3f > privacy.target_epsilon = %g; the run will stop before "
                         "exceeding it", config.run.rounds, z, eps_full, p.target_epsilon)
        adaptive = None
        if p.adaptive_clipping and config.simulation.executor not in IN_PROCESS_EXECUTORS:
            raise ConfigError(
                "privacy.adaptive_clipping runs with the in-process executors ("
                + ", ".join(IN_PROCESS_EXECUTORS) + f") only, not {config.simulation.executor!r}: "
                "clients must receive each round's clip norm and return their clipped-count "
                "bit with the update; use fixed clipping there")
        if p.adaptive_clipping:
            adaptive = AdaptiveClipping(clip_norm=p.clip_norm, target_quantile=p.target_quantile,
                                        learning_rate=p.clip_learning_rate,
                                        expected_clients=expected)
        return cls(noise_multiplier=z, clip_norm=p.clip_norm, sample_rate=q,
                   expected_clients=expected, delta=p.delta, accountant=p.accountant,
                   target_epsilon=p.target_epsilon, seed=config.run.seed, adaptive=adaptive,
                   noise_multiplier_pinned=p.noise_multiplier is not None)

    def _update_noise_multiplier(self) -> float:
        if self.adaptive is None or self.noise_multiplier == 0:
            return self.noise_multiplier
        return split_noise_multiplier(self.noise_multiplier, float(self.adaptive.count_stddev
                                                                   or 0.0))

    def _settings(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "expected_clients": self.expected_clients,
                "clip_norm": self.mechanism.clip_norm,
                "adaptive_clipping": self.adaptive is not None,
                "update_noise_multiplier": self.mechanism.noise_multiplier,
                "count_stddev": None if self.adaptive is None else self.adaptive.count_stddev}

    @property
    def clip_norm(self) -> float:
        """The clip norm clients use this round."""
        return self.mechanism.clip_norm

    # ------------------------------------------------------------------ step 4 (client)
    def client_stages(self) -> list[UpdateStage]:  # noqa: D102
        return [_ClipStage(self)]

    def clip_update(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        """Clip to ``C``; with adaptive clipping append the centred indicator ``b_i - 1/2``."""
        clipped = self.mechanism.clip(update)
        if self.adaptive is None:
            return clipped
        norm = float(torch.linalg.vector_norm(update.detach().to(torch.float64)))
        report = torch.tensor([self.adaptive.indicator(norm)], dtype=clipped.dtype,
                              device=clipped.device)
        return torch.cat([clipped, report])

    def clip_batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]
                   ) -> torch.Tensor:
        """:meth:`clip_update` of a cohort ``[n, dim]`` as tensor operations on its device."""
        clipped = l2_clip_rows(updates, self.mechanism.clip_norm)
        if self.adaptive is None:
            return clipped
        norms = torch.linalg.vector_norm(updates.detach().to(torch.float64), dim=1)
        report = torch.where(norms <= self.adaptive.clip_norm, 0.5, -0.5)  # 1[norm<=C] - 1/2
        return torch.cat([clipped, report.to(clipped.dtype)[:, None]], dim=1)

    # ------------------------------------------------------------------ step 6 (server)
    def process_aggregate(self, aggregate: Aggregate, server_round: int) -> Aggregate:  # noqa: D102
        require_clipped_sum(aggregate, mechanism="client-level DP", advice=(
            "a strategy without them (fedavg, fedavgm, fedprox, fedadam, ...) with "
            "privacy.mode = 'central'"))
        total = aggregate.update_sum
        indicator_sum = 0.0
        if self.adaptive is not None:
            indicator_sum = float(total[-1])
            total = total[:-1]
        used_clip = self.mechanism.clip_norm
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "central-dp-noise",
                                                        server_round))
        aggregate.update_sum = self.mechanism.add_noise(total, generator=gen)
        # McMahan et al. 2018, Alg. 1: divide by the expected weight q*N, not the realised
        # count, so that the denominator reveals nothing about who took part.
        aggregate.denominator = self.expected_clients
        self._last_metrics = {"clip_norm": used_clip}
        if self.adaptive is not None:
            count_gen = torch.Generator().manual_seed(
                derive_seed(self.seed, "central-dp-count-noise", server_round))
            fraction = self.adaptive.update(indicator_sum, generator=count_gen)
            self.mechanism.clip_norm = self.adaptive.clip_norm
            self._last_metrics["unclipped_fraction"] = fraction
        self.stage_event(POPULATION, (self.noise_multiplier, self.sample_rate, 1))
        return aggregate

    # ------------------------------------------------------------------ step 8 and state
    def planned_events(self, server_round: int, num_sampled_expected: int  # noqa: D102
                       ) -> dict[str, PrivacyEvent]:
        return {POPULATION: (self.noise_multiplier, self.sample_rate, 1)}

    def round_metrics(self) -> dict[str, float]:  # noqa: D102
        return dict(self._last_metrics) if self.adaptive is not None else {}

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {**super().state_dict(), "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "clip_norm": self.mechanism.clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        saved_z = float(state.get("noise_multiplier", self.noise_multiplier))
        if self._explicit_noise and abs(saved_z - self.noise_multiplier) > 1e-12:
            raise PrivacyError(
                f"privacy.noise_multiplier = {self.noise_multiplier:g} differs from the "
                f"{saved_z:g} this run was accounted with; resume with the run's own config")
        # A calibrated multiplier stays the one the run started with: recalibrating for a
        # raised run.rounds would silently change the mechanism mid-run.
        self.noise_multiplier = saved_z
        saved_q = float(state.get("sample_rate", self.sample_rate))
        if abs(saved_q - self.sample_rate) > 1e-12:
            raise PrivacyError(f"the sample rate {self.sample_rate:g} differs from the "
                               f"{saved_q:g} this run was accounted with")
        clip = float(state.get("clip_norm", self.mechanism.clip_norm))
        if self.adaptive is not None:
            self.adaptive.clip_norm = clip
        self.mechanism = GaussianMechanism(clip_norm=clip,
                                           noise_multiplier=self._update_noise_multiplier())
        self.ledger.settings.update(self._settings())


class _ClipStage:
    """Central DP's client stage: clip (and the adaptive-clipping report), per client or batch."""

    def __init__(self, privacy: CentralDP) -> None:
        self.privacy = privacy

    def __call__(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        return self.privacy.clip_update(update, ctx)

    def batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]) -> torch.Tensor:
        return self.privacy.clip_batch(updates, contexts)

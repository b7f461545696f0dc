"""The mechanisms ``confide audit`` runs: each mode's own privacy class, sized for the audited
population (real clients plus included canaries), with ``z = 0`` allowed.

``z = 0`` audits clipping (and, for distributed DP, the discretisation and the modular sum)
without noise: no accountant applies, epsilon is infinite, and the ledger says so instead of
refusing the event. With ``z > 0`` every class below is the mode's own, unchanged: its client
stages, its server-side noise and its accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np

from confide.config import Config
from confide.exceptions import ConfigError
from confide.privacy.accounting import calibrate_noise_multiplier
from confide.privacy.audit import AuditResult, gaussian_fit_epsilon, guess_epsilon_lower_bound
from confide.privacy.base import RoundPrivacy
from confide.privacy.central import CentralDP
from confide.privacy.distributed import DistributedDP, rounded_l2_bound, scale_for_bits
from confide.privacy.dpsgd import DPSGDPrivacy
from confide.privacy.ftrl import DPFTRL
from confide.privacy.ftrl_noise import KEY_BYTES
from confide.privacy.mechanisms import AdaptiveClipping
from confide.round import ResultBatch
from confide.seeding import derive_rng, derive_seed

__all__ = ["AuditedMechanism", "build_client_level", "AuditedDPSGD", "MECHANISM_NAMES",
           "audit_result"]

#: what the audit result calls each mode's mechanism
MECHANISM_NAMES = {
    "central": "central DP-FedAvg (Gaussian noise on the clipped sum)",
    "distributed": "distributed discrete Gaussian under SecAgg+",
    "dp-ftrl": "DP-FTRL (correlated noise on prefix sums)",
    "dp-sgd": "DP-SGD (Opacus per-sample clipping and noise)",
}


class _NoiselessAccount:
    """``account`` for ``z = 0``: infinite epsilon, no event recorded."""

    noiseless: bool = False
    _pending: dict

    def account(self, server_round: int, run_dir: Path | None) -> float | None:  # noqa: D102
        if self.noiseless:
            self._pending.clear()
            return math.inf
        return super().account(server_round, run_dir)  # type: ignore[misc]


class _AuditedCentralDP(_NoiselessAccount, CentralDP):
    """Central DP-FedAvg; ``z = 0`` is clipping alone."""


class _AuditedDPFTRL(_NoiselessAccount, DPFTRL):
    """DP-FTRL; with ``z = 0`` the correlated noise has standard deviation 0."""


@dataclass(frozen=True)
class _NoShares:
    """The noise share of ``z = 0``: none (the discretisation and modular sum stay)."""

    s: int = 0
    t: int = 0
    sigma: float = 0.0

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:  # noqa: D102
        return np.zeros(size, dtype=np.int64)


class _AuditedDistributedDP(_NoiselessAccount, DistributedDP):
    """Distributed DP; with ``z = 0`` the clients add no discrete Gaussian share."""

    def __init__(self, *, noiseless: bool, **kwargs: object) -> None:
        self.noiseless = noiseless
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def _set_noise(self, sigma_local: float) -> None:
        if not self.noiseless:
            super()._set_noise(sigma_local)
            return
        self.sigma_local = 0.0
        self.gamma = scale_for_bits(bits=self.bits, clip_norm=self.clip_norm, sigma_local=0.0,
                                    clients=self.max_clients, dim=self.padded)
        self.noise = _NoShares()  # type: ignore[assignment]
        self.delta_2 = rounded_l2_bound(self.clip_norm / self.gamma, self.padded)

    def equivalent_multiplier(self, n: int) -> float:  # noqa: D102
        return 0.0 if self.noiseless else super().equivalent_multiplier(n)

    def mechanism_rdp(self, n: int) -> dict[int, float]:  # noqa: D102
        if self.noiseless:
            return dict.fromkeys(range(2, 257), math.inf)
        return super().mechanism_rdp(n)

    def mechanism_epsilon(self) -> float:  # noqa: D102
        return math.inf if self.noiseless else super().mechanism_epsilon()


class AuditedDPSGD(_NoiselessAccount, DPSGDPrivacy):
    """DP-SGD through Opacus; with ``z = 0`` per-sample clipping alone (no event charged)."""

    def __init__(self, *, noise_multiplier: float, clip_norm: float, delta: float,
                 accountant: str, planned_rounds: int) -> None:
        self.noiseless = noise_multiplier == 0
        super().__init__(noise_multiplier=noise_multiplier or 1.0, clip_norm=clip_norm,
                         delta=delta, accountant=accountant, planned_rounds=planned_rounds)
        self.noise_multiplier = float(noise_multiplier)

    def observe_results(self, batch: ResultBatch, server_round: int) -> None:  # noqa: D102
        if not self.noiseless:
            super().observe_results(batch, server_round)


@dataclass
class AuditedMechanism:
    """A client-level mechanism ready to audit, and how canaries take part in it."""

    mode: str
    privacy: RoundPrivacy
    noise_multiplier: float
    #: the rate the accountant amplifies by (1: no amplification, DP-FTRL)
    sample_rate: float
    #: the canaries (indices among the included ones' positions) taking part in a round
    schedule: Callable[[int, np.ndarray], np.ndarray]
    #: the accountant's epsilon for the whole run
    epsilon: Callable[[], float]


def _poisson(seed: int, q: float) -> Callable[[int, np.ndarray], np.ndarray]:
    def schedule(rnd: int, included: np.ndarray) -> np.ndarray:
        rng = derive_rng(seed, "audit-canaries", rnd)
        return included[rng.random(len(included)) < q]
    return schedule


def _noise_for(config: Config, q: float) -> float:
    p = config.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    return calibrate_noise_multiplier(target_epsilon=float(p.target_epsilon),  # type: ignore[arg-type]
                                      sample_rate=q, steps=config.run.rounds, delta=p.delta,
                                      accountant=p.accountant)


def build_client_level(config: Config, *, num_real: int, canaries: int, dim: int
                       ) -> AuditedMechanism:
    """The audited mechanism of ``config.privacy.mode`` (central, distributed or dp-ftrl)."""
    p, seed, rounds = config.privacy, config.run.seed, config.run.rounds
    q = config.cohort_size() / config.data.num_clients
    # A constant denominator (the expected cohort of the expected population), so that the
    # output depends on the inclusion bits only through the noised sum.
    expected = q * (num_real + canaries / 2)
    if p.mode == "central":
        z = _noise_for(config, q)
        adaptive = (AdaptiveClipping(clip_norm=p.clip_norm, target_quantile=p.target_quantile,
                                     learning_rate=p.clip_learning_rate,
                                     expected_clients=expected)
                    if p.adaptive_clipping else None)
        central = _AuditedCentralDP(noise_multiplier=z, clip_norm=p.clip_norm, sample_rate=q,
                                    expected_clients=expected, delta=p.delta,
                                    accountant=p.accountant,
                                    seed=derive_seed(seed, "audit-noise"), adaptive=adaptive)
        central.noiseless = z == 0
        return AuditedMechanism(p.mode, central, z, q, _poisson(seed, q),
                                lambda: central.ledger.epsilon if z else math.inf)
    if p.mode == "distributed":
        if p.noise_multiplier is None:
            raise ConfigError("confide audit of privacy.mode = 'distributed' needs "
                              "privacy.noise_multiplier (a target epsilon is calibrated for "
                              "the real population only)")
        if not config.secure_aggregation.enabled:
            raise ConfigError("privacy.mode = 'distributed' needs secure_aggregation.enabled "
                              "= true")
        if p.accountant != "rdp" or p.adaptive_clipping:
            raise ConfigError("privacy.mode = 'distributed' needs privacy.accountant = 'rdp' "
                              "and fixed clipping")
        z = float(p.noise_multiplier)
        # As DistributedDP.from_config sizes it, for the audited population: the noise
        # shares are calibrated for the expected contributors (3-sigma Poisson margin).
        margin = 1 - 3 / math.sqrt(max(expected * rounds, 1))
        n_cal = max(2, math.floor(expected * margin))
        max_clients = math.ceil(expected + 4 * math.sqrt(expected) + 1)
        ddp = _AuditedDistributedDP(
            noiseless=z == 0, clip_norm=p.clip_norm,
            sigma_local=(z or 1.0) * p.clip_norm / math.sqrt(n_cal),
            bits=config.secure_aggregation.bits, dim=dim, sample_rate=q,
            expected_clients=expected, max_clients=max_clients, delta=p.delta,
            seed=derive_seed(seed, "audit-noise"), planned_clients=n_cal)
        return AuditedMechanism(p.mode, ddp, z, q, _poisson(seed, q),
                                lambda: ddp.ledger.epsilon if z else math.inf)
    if p.mode == "dp-ftrl":
        # from_config refuses z = 0: build with z = 1, then silence the noise below.
        placeholder = replace(p, noise_multiplier=1.0) if p.noise_multiplier == 0 else p
        ftrl = cast(_AuditedDPFTRL, _AuditedDPFTRL.from_config(
            config.replace(privacy=placeholder), num_clients=num_real))
        z = 0.0 if p.noise_multiplier == 0 else ftrl.noise_multiplier
        ftrl.noiseless = z == 0
        ftrl.noise_multiplier = z
        ftrl.target_epsilon = None  # the audit runs every round; the bound is compared after
        # Reproducible noise: the key is derived from the run seed (an audit is a simulation;
        # a deployment draws it from the OS CSPRNG, confide.privacy.ftrl_noise).
        ftrl._noise_key = derive_rng(seed, "audit-ftrl-key").bytes(KEY_BYTES)
        sep = ftrl.min_separation
        period = rounds if sep is None else sep  # single: one round each; cyclic: every sep

        def pattern(rnd: int, included: np.ndarray) -> np.ndarray:
            # Each included canary takes part as often as the promised pattern allows
            # (single: once; cyclic: every min_separation rounds), so none is refused.
            return included[(included % period) == (rnd - 1) % period]

        ftrl.expected_clients = config.cohort_size() + canaries / 2 / period
        eps = ftrl.epsilon_after_rounds(rounds) if z else math.inf
        return AuditedMechanism(p.mode, ftrl, z, 1.0, pattern, lambda: eps)
    raise ConfigError(f"confide audit cannot audit privacy.mode = {p.mode!r}")


def audit_result(*, mechanism: str, canary_kind: str, scores: np.ndarray,
                 included: np.ndarray, rounds: int, noise_multiplier: float,
                 sample_rate: float, delta: float, confidence: float,
                 epsilon_accountant: float) -> AuditResult:
    """The one-run statistics of ``scores`` (Steinke et al. 2023, Theorem 5.2) beside the
    accountant's epsilon.
    """
    eps_lb, guesses, correct = guess_epsilon_lower_bound(scores, included, delta=delta,
                                                         confidence=confidence)
    return AuditResult(
        mechanism=mechanism, description=MECHANISM_NAMES[mechanism], canary_kind=canary_kind,
        canaries=len(scores), included=int(included.sum()), rounds=rounds,
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, delta=delta,
        confidence=confidence, epsilon_accountant=epsilon_accountant,
        epsilon_lower_bound=eps_lb, guesses=guesses, correct=correct,
        epsilon_estimate=gaussian_fit_epsilon(scores[included], scores[~included],
                                              delta=delta),
        mean_score_included=float(scores[included].mean()) if included.any() else 0.0,
        mean_score_excluded=float(scores[~included].mean()) if (~included).any() else 0.0)

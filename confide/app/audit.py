"""``confide audit``: the canary audit of client-level DP, run by the real round loop.

The federation is the job's own (:func:`confide.app.simulate.build_simulation`), and the
rounds are :class:`confide.server.coordinator.Coordinator`'s — the quorum check, the
rejection of non-finite updates and the privacy ledger apply as in any run. Canary clients
(Steinke et al. 2023, Sec. 3; Andrew et al. 2024, Sec. 3) join through a wrapping executor:
each round it adds the sampled, included canaries' rows to the real cohort's batch and runs
them through the same client pipeline (clipping). Statistics: :mod:`confide.privacy.audit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from confide.client.pipeline import ClientPipeline, StageContext
from confide.config import Config, PrivacyConfig
from confide.exceptions import ConfigError
from confide.privacy.accounting import calibrate_noise_multiplier, epsilon_of
from confide.privacy.audit import (
    AuditResult,
    canary_direction,
    gaussian_fit_epsilon,
    guess_epsilon_lower_bound,
)
from confide.privacy.central import CentralDP
from confide.privacy.mechanisms import AdaptiveClipping
from confide.round import ClientTask, CohortOutcome, Executor, ResultBatch, column
from confide.seeding import derive_rng, derive_seed

__all__ = ["CanaryExecutor", "run_canary_audit"]

#: a canary's update is this many clip norms long, so clipping always binds
CANARY_SCALE = 1e3


class CanaryExecutor(Executor):
    """The real executor, plus the round's sampled canaries (Poisson, rate ``q``)."""

    name = "canary-audit"

    def __init__(self, inner: Executor, *, included: np.ndarray, num_real: int, dim: int,
                 sample_rate: float, clip_norm: float, pipeline: ClientPipeline,
                 seed: int) -> None:
        self.inner = inner
        self.included = np.flatnonzero(included)
        self.num_real, self.dim = num_real, dim
        self.sample_rate, self.clip_norm = sample_rate, clip_norm
        self.pipeline, self.seed = pipeline, seed

    @property
    def device(self) -> torch.device | None:
        """Where the real cohort trains."""
        return getattr(self.inner, "device", None)

    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        outcome = self.inner.run_cohort(tasks)
        rnd = tasks[0].server_round if tasks else 0
        rng = derive_rng(self.seed, "audit-canaries", rnd)
        sampled = self.included[rng.random(len(self.included)) < self.sample_rate]
        if not len(sampled):
            return outcome
        dev = outcome.batch.device
        dtype = outcome.batch.updates.dtype if len(outcome.batch) else torch.get_default_dtype()
        rows = torch.stack([canary_direction(self.seed, int(j), self.dim) for j in sampled])
        rows = (rows * (CANARY_SCALE * self.clip_norm)).to(device=dev, dtype=dtype)
        ids = [self.num_real + int(j) for j in sampled]
        contexts = [StageContext(server_round=rnd, client_id=c, seed=self.seed) for c in ids]
        rows = self.pipeline.apply_batch(rows, contexts)
        ones = column([1.0] * len(ids), dev)
        canaries = ResultBatch(client_ids=ids, updates=rows, num_examples=ones,
                               num_steps=ones.clone())
        real = outcome.batch
        if len(real) and real.metrics:  # canaries report no metrics: keep the layout
            canaries.metrics = {k: torch.full_like(ones, math.nan) for k in real.metrics}
        return CohortOutcome(ResultBatch.concat([real, canaries]), outcome.failures,
                             outcome.reduced)

    def close(self) -> None:  # noqa: D102
        self.inner.close()


class _AuditedCentralDP(CentralDP):
    """The audited mechanism. With ``z = 0`` (auditing clipping alone) no accountant applies:
    epsilon is infinite, and the ledger says so instead of refusing the event.
    """

    def account(self, server_round: int, run_dir: object) -> float | None:  # noqa: D102
        if self.noise_multiplier == 0:
            self._pending.clear()
            return math.inf
        return super().account(server_round, run_dir)  # type: ignore[arg-type]


def run_canary_audit(config: Config, *, canaries: int = 1000, confidence: float = 0.95
                     ) -> AuditResult:
    """Train ``config``'s federation with ``canaries`` canary clients and audit it."""
    from confide.app.simulate import build_simulation
    from confide.privacy import _refuse_robust_strategy

    p = config.privacy
    if p.mode != "central":
        raise ConfigError("confide audit checks client-level DP: set privacy.mode = 'central' "
                          "(privacy.noise_multiplier = 0 audits clipping without noise)")
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError("confide audit needs privacy.noise_multiplier or "
                          "privacy.target_epsilon")
    if canaries < 20:
        raise ConfigError(f"--canaries = {canaries} is too few for a meaningful bound; use "
                          "at least 20 (1000 is typical)")
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence = {confidence} must be in (0, 1)")
    _refuse_robust_strategy(config)
    seed, rounds = config.run.seed, config.run.rounds

    # The real federation; its privacy layer is replaced by the audited mechanism below,
    # sized for the population of real clients and included canaries.
    sim = build_simulation(config.replace(privacy=PrivacyConfig()))
    coord = sim.coordinator
    num_real = len(sim.partitions)
    q = config.cohort_size() / config.data.num_clients
    if p.noise_multiplier is not None:
        z = p.noise_multiplier
    else:
        z = calibrate_noise_multiplier(target_epsilon=float(p.target_epsilon),  # type: ignore[arg-type]
                                       sample_rate=q, steps=rounds, delta=p.delta,
                                       accountant=p.accountant)
    included = derive_rng(seed, "audit-membership").random(canaries) < 0.5
    # A constant denominator (the expected cohort of the expected population), so that the
    # output depends on the inclusion bits only through the noised sum.
    expected = q * (num_real + canaries / 2)
    adaptive = (AdaptiveClipping(clip_norm=p.clip_norm, target_quantile=p.target_quantile,
                                 learning_rate=p.clip_learning_rate, expected_clients=expected)
                if p.adaptive_clipping else None)
    dp = _AuditedCentralDP(noise_multiplier=z, clip_norm=p.clip_norm, sample_rate=q,
                   expected_clients=expected, delta=p.delta, accountant=p.accountant,
                   seed=derive_seed(seed, "audit-noise"), adaptive=adaptive)
    pipeline = ClientPipeline(dp.client_stages())
    inner = coord.executor
    context = getattr(inner, "context", None)
    if context is not None:
        context.pipeline = pipeline  # real clients clip in their own pipeline
    params0 = coord.params.detach().clone()
    coord.privacy = dp
    coord.executor = CanaryExecutor(inner, included=included, num_real=num_real,
                                    dim=int(params0.numel()), sample_rate=q,
                                    clip_norm=p.clip_norm, pipeline=pipeline, seed=seed)
    coord.num_clients = num_real  # the coordinator samples real clients; canaries join above
    coord.evaluator = None
    coord.run()

    delta_w = (coord.params - params0.to(coord.params)).to(torch.float64).cpu()
    norm = float(torch.linalg.vector_norm(delta_w))
    scores = np.zeros(canaries)
    if norm > 0:
        for start in range(0, canaries, 128):
            block = torch.stack([canary_direction(seed, j, delta_w.numel())
                                 for j in range(start, min(canaries, start + 128))])
            scores[start:start + len(block)] = (block @ delta_w).numpy() / norm
    eps_lb, guesses, correct = guess_epsilon_lower_bound(scores, included, delta=p.delta,
                                                         confidence=confidence)
    eps_acct = (math.inf if z == 0 else
                epsilon_of([(z, q, rounds)], delta=p.delta, accountant=p.accountant))
    return AuditResult(
        canaries=canaries, included=int(included.sum()), rounds=rounds, noise_multiplier=z,
        sample_rate=q, delta=p.delta, confidence=confidence, epsilon_accountant=eps_acct,
        epsilon_lower_bound=eps_lb, guesses=guesses, correct=correct,
        epsilon_estimate=gaussian_fit_epsilon(scores[included], scores[~included],
                                              delta=p.delta),
        mean_score_included=float(scores[included].mean()) if included.any() else 0.0,
        mean_score_excluded=float(scores[~included].mean()) if (~included).any() else 0.0)

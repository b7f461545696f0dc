"""``confide audit``: the one-run canary audit of a DP mechanism, run by the real round loop.

The federation is the job's own (:func:`confide.app.simulate.build_simulation`), and the
rounds are :class:`confide.server.coordinator.Coordinator`'s — the quorum check, the
rejection of non-finite updates and the privacy ledger apply as in any run. Each audited
mechanism is the mode's own class (:mod:`confide.app.audit_mechanisms`):

* client-level modes (``central``, ``distributed``, ``dp-ftrl``): canary clients (Steinke et
  al. 2023, Sec. 3; Andrew et al. 2024, Sec. 3) join through a wrapping executor. Each round
  it adds the scheduled, included canaries' rows to the real cohort's batch and runs them
  through the mechanism's client pipeline (clipping; for distributed DP also the rotation,
  rounding, discrete Gaussian share and modular wrap); the coordinator's aggregator (SecAgg+
  for distributed DP) sums them with the real clients' and the mechanism's server step adds
  its noise (central, DP-FTRL's correlated noise) or decodes the sum (distributed).
  Canaries are Poisson-sampled with the clients' rate ``q`` (central, distributed) or follow
  DP-FTRL's participation pattern (no sampling is claimed there);
* ``dp-sgd``: canary examples in the clients' data (:mod:`confide.app.audit_dpsgd`).

Statistics: :mod:`confide.privacy.audit`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from confide.app.audit_dpsgd import run_example_audit
from confide.app.audit_mechanisms import (
    MECHANISM_NAMES,
    audit_result,
    build_client_level,
)
from confide.client.pipeline import ClientPipeline, StageContext
from confide.config import Config, PrivacyConfig
from confide.exceptions import ConfigError
from confide.privacy.audit import AuditResult, canary_direction
from confide.round import ClientTask, CohortOutcome, Executor, ResultBatch, column
from confide.seeding import derive_rng, derive_seeds
from confide.strategies.registry import get_strategy

__all__ = ["CanaryExecutor", "run_canary_audit"]

#: a canary's update is this many clip norms long, so clipping always binds
CANARY_SCALE = 1e3


class CanaryExecutor(Executor):
    """The real executor, plus the round's canaries (``schedule``: Poisson with rate ``q``, or
    DP-FTRL's participation pattern), each through the mechanism's own client pipeline.
    """

    name = "canary-audit"

    def __init__(self, inner: Executor, *, included: np.ndarray, num_real: int, dim: int,
                 schedule: Callable[[int, np.ndarray], np.ndarray], clip_norm: float,
                 pipeline: ClientPipeline, seed: int) -> None:
        self.inner = inner
        self.included = np.flatnonzero(included)
        self.num_real, self.dim = num_real, dim
        self.schedule, self.clip_norm = schedule, clip_norm
        self.pipeline, self.seed = pipeline, seed

    @property
    def device(self) -> torch.device | None:
        """Where the real cohort trains."""
        return getattr(self.inner, "device", None)

    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        outcome = self.inner.run_cohort(tasks)
        rnd = tasks[0].server_round if tasks else 0
        sampled = self.schedule(rnd, self.included)
        if not len(sampled):
            return outcome
        real = outcome.batch
        dev = real.device
        rows = torch.stack([canary_direction(self.seed, int(j), self.dim) for j in sampled])
        rows = (rows * (CANARY_SCALE * self.clip_norm)).to(torch.get_default_dtype())
        ids = [self.num_real + int(j) for j in sampled]
        # Each canary's stages get their own seed, as a real client's task does (distributed
        # DP draws its rounding and noise share from it).
        seeds = derive_seeds(self.seed, "audit-canary-task", rnd, keys=np.asarray(ids))
        contexts = [StageContext(server_round=rnd, client_id=c, seed=int(s))
                    for c, s in zip(ids, seeds.tolist(), strict=True)]
        rows = self.pipeline.apply_batch(rows, contexts)
        rows = rows.to(device=dev, dtype=real.updates.dtype if len(real) else rows.dtype)
        ones = column([1.0] * len(ids), dev)
        canaries = ResultBatch(client_ids=ids, updates=rows, num_examples=ones,
                               num_steps=ones.clone(), info=[dict(c.info) for c in contexts])
        if len(real) and real.metrics:  # canaries report no metrics: keep the layout
            canaries.metrics = {k: torch.full_like(ones, math.nan) for k in real.metrics}
        return CohortOutcome(ResultBatch.concat([real, canaries]), outcome.failures,
                             outcome.reduced)

    def close(self) -> None:  # noqa: D102
        self.inner.close()


def _check(config: Config, canaries: int, confidence: float) -> None:
    p = config.privacy
    if p.mode not in MECHANISM_NAMES:
        raise ConfigError("confide audit checks a DP mechanism: set privacy.mode = 'central', "
                          "'distributed', 'dp-ftrl' or 'dp-sgd' (privacy.noise_multiplier = 0 "
                          "audits clipping without noise)")
    if p.noise_multiplier is None and p.target_epsilon is None:
        raise ConfigError("confide audit needs privacy.noise_multiplier or "
                          "privacy.target_epsilon")
    if canaries < 20:
        raise ConfigError(f"--canaries = {canaries} is too few for a meaningful bound; use "
                          "at least 20 (1000 is typical)")
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence = {confidence} must be in (0, 1)")
    if config.compression.method != "none":
        raise ConfigError("confide audit does not audit compressed updates yet (canary "
                          "clients keep no error-feedback state); set compression.method = "
                          "'none'")
    if getattr(get_strategy(config.strategy.name), "asynchronous", False):
        raise ConfigError(f"confide audit runs synchronous rounds; strategy "
                          f"{config.strategy.name!r} is asynchronous")


def run_canary_audit(config: Config, *, canaries: int = 1000, confidence: float = 0.95
                     ) -> AuditResult:
    """Train ``config``'s federation with ``canaries`` canaries and audit its DP mechanism.

    Client-level modes (central, distributed, dp-ftrl) get canary clients; ``dp-sgd`` gets
    canary examples with Dirac gradients (:mod:`confide.app.audit_dpsgd`).
    """
    from confide.app.simulate import build_aggregator, build_simulation
    from confide.privacy import _refuse_robust_strategy

    _check(config, canaries, confidence)
    p = config.privacy
    if p.mode == "dp-sgd":
        return run_example_audit(config, canaries=canaries, confidence=confidence)
    _refuse_robust_strategy(config)
    seed = config.run.seed

    # The real federation; its privacy layer is replaced by the audited mechanism, sized for
    # the population of real clients and included canaries (confide.app.audit_mechanisms).
    sim = build_simulation(config.replace(privacy=PrivacyConfig()))
    coord = sim.coordinator
    num_real = len(sim.partitions)
    params0 = coord.params.detach().clone()
    dim = int(params0.numel())
    included = derive_rng(seed, "audit-membership").random(canaries) < 0.5
    audited = build_client_level(config, num_real=num_real, canaries=canaries, dim=dim)
    pipeline = ClientPipeline(audited.privacy.client_stages())
    inner = coord.executor
    context = getattr(inner, "context", None)
    if context is not None:
        context.pipeline = pipeline  # real clients run the mechanism's stages too
        context.privacy = audited.privacy
    coord.privacy = audited.privacy
    # Distributed DP: the secure aggregator in its integer mode sums the encoded words.
    coord.aggregator = build_aggregator(config)
    coord.executor = CanaryExecutor(inner, included=included, num_real=num_real, dim=dim,
                                    schedule=audited.schedule, clip_norm=p.clip_norm,
                                    pipeline=pipeline, seed=seed)
    coord.num_clients = num_real  # the coordinator samples real clients; canaries join above
    coord.evaluator = None
    coord.run()

    # The score is computed on the final model only (Andrew et al. 2024, Sec. 3): for
    # DP-FTRL that is w_T - w_0, in which the correlated noise of every round has added up.
    delta_w = (coord.params - params0.to(coord.params)).to(torch.float64).cpu()
    norm = float(torch.linalg.vector_norm(delta_w))
    scores = np.zeros(canaries)
    if norm > 0:
        for start in range(0, canaries, 128):
            block = torch.stack([canary_direction(seed, j, delta_w.numel())
                                 for j in range(start, min(canaries, start + 128))])
            scores[start:start + len(block)] = (block @ delta_w).numpy() / norm
    return audit_result(mechanism=p.mode, canary_kind="client", scores=scores,
                        included=included, rounds=config.run.rounds,
                        noise_multiplier=audited.noise_multiplier,
                        sample_rate=audited.sample_rate, delta=p.delta, confidence=confidence,
                        epsilon_accountant=audited.epsilon())

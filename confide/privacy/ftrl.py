"""DP-FTRL: client-level DP without sampling (``privacy.mode = "dp-ftrl"``).

DP-FedAvg's guarantee rests on Poisson sampling, which a deployment cannot promise: clients
come when they are plugged in. DP-FTRL (Kairouz et al., ICML 2021, Alg. 1) instead privatises
the *prefix sums* of the per-round sums of clipped updates with correlated noise, so the data
order may be fixed (no amplification by sampling is claimed):

1. [4] each client clips its update to L2 norm ``C`` (client stage, as DP-FedAvg);
2. [5] the coordinator (or secure aggregation) sums them with weight 1 each;
3. [6] the sum ``x_t`` becomes the increment of the noisy prefix sum, ``x_t + N_t - N_{t-1}``,
   where ``N_t`` is tree aggregation's (:mod:`confide.privacy.ftrl_tree`) or a banded matrix
   factorisation's (:mod:`confide.privacy.ftrl_matrix`) noise on ``S_t = x_1 + ... + x_t``;
   the mean divides by the expected cohort size (fixed denominator, as DP-FedAvg);
4. [7] the strategy's server optimizer runs on those increments. With FedAvg (``w + η Δ``)
   this is exactly DP-FTRL's update ``w_t = w_0 + η S̃_t / m`` (Kairouz et al. 2021, Alg. 1
   with the ``λ/2 ||w - w_0||²`` regulariser); with FedAvgM it is DP-FTRLM, heavy-ball
   momentum on the noisy increments (Kairouz et al. 2021, Sec. 5 and App. C). Any other
   sum-based strategy is post-processing too.
5. [8] the ledger records the round's share of one Gaussian mechanism: after ``t`` rounds the
   release is a Gaussian mechanism with multiplier ``z / sens_t`` (``sens_t``: the encoder's
   sensitivity under the participation pattern enforced), recorded as per-round Gaussian
   events whose composition is exactly that (:func:`confide.privacy.accounting.fold_gaussians`).

Participation. ``privacy.participation = "single"``: a client takes part once in the whole
run; ``"cyclic"``: any number of times, at least ``privacy.min_separation`` rounds apart
(default ``num_clients // cohort``, what ``cohort.sampling = "cyclic"`` gives by construction).
The coordinator refuses (and logs) a client that would break the pattern before its update is
summed (:meth:`DPFTRL.observe_results`), so the ledger's epsilon is that of the pattern actually
enforced.

The noise key: see :mod:`confide.privacy.ftrl_noise` (CSPRNG key, wrapped in the checkpoint,
the key-encryption key in its own file, state replayed on resume).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from confide.client.pipeline import StageContext, UpdateStage
from confide.exceptions import ConfigError, PrivacyError
from confide.privacy.accounting import PrivacyEvent, calibrate_noise_multiplier, epsilon_of
from confide.privacy.ftrl_matrix import BandedToeplitz, CorrelatedNoise, sensitivities
from confide.privacy.ftrl_noise import (
    NoiseSource,
    load_or_create_kek,
    unwrap_key,
    wrap_key,
)
from confide.privacy.ftrl_tree import TreeAggregation
from confide.privacy.ledger import POPULATION, LedgeredPrivacy
from confide.privacy.mechanisms import l2_clip, require_clipped_sum

if TYPE_CHECKING:
    from confide.config import Config
    from confide.round import Aggregate, ClientResult, ResultBatch

__all__ = ["DPFTRL", "build_mechanism", "KEK_NAME"]

log = logging.getLogger("confide")

#: where the key-encryption key lives by default, relative to the run folder
KEK_NAME = Path("secrets") / "dp_ftrl_noise.kek"
#: below this, a round adds no sensitivity (and so no privacy event)
_NO_INCREMENT = 1e-12


def build_mechanism(*, kind: str, rounds: int, participation: str,
                    min_separation: int | None, band: int | None = None,
                    tree_restart: int | None = None, honaker: bool = True) -> CorrelatedNoise:
    """The correlated-noise mechanism ``privacy.ftrl_mechanism`` names, checked for ``rounds``."""
    cyclic = participation == "cyclic"
    if kind == "tree":
        restart = tree_restart if tree_restart is not None else (min_separation if cyclic
                                                                 else None)
        if cyclic and restart is not None and min_separation is not None and \
                restart > min_separation:
            raise ConfigError(
                f"privacy.tree_restart = {restart} exceeds privacy.min_separation = "
                f"{min_separation}: a client could then fall twice in one tree, whose "
                "sensitivity is not computed exactly; restart at least every "
                f"{min_separation} rounds (Kairouz et al. 2021, Sec. 4)")
        return TreeAggregation(restart_every=restart, honaker=honaker)
    if kind == "banded":
        b = band if band is not None else (min_separation if cyclic else min(rounds, 32))
        b = int(b)  # type: ignore[arg-type]
        if b > rounds:
            raise ConfigError(f"privacy.band = {b} is larger than run.rounds = {rounds}; a band "
                              "can be at most the number of rounds")
        if cyclic and min_separation is not None and b > min_separation:
            raise ConfigError(
                f"privacy.band = {b} exceeds privacy.min_separation = {min_separation}: a "
                "banded factorisation's sensitivity is exact only when participations are at "
                "least a band apart (Choquette-Choo et al. 2023, Sec. 4); lower the band")
        return BandedToeplitz(band=b)
    raise ConfigError(f"privacy.ftrl_mechanism = {kind!r} must be 'tree' or 'banded'")


class DPFTRL(LedgeredPrivacy):
    """DP-FTRL with tree aggregation or a banded matrix factorisation."""

    weighting = "uniform"

    def __init__(self, *, mechanism: CorrelatedNoise, noise_multiplier: float, clip_norm: float,
                 rounds: int, participation: str, min_separation: int | None,
                 expected_clients: float, delta: float, accountant: str = "rdp",
                 target_epsilon: float | None = None, kek_path: Path | None = None,
                 noise_multiplier_pinned: bool = True, noise_key: bytes | None = None) -> None:
        if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise PrivacyError(f"noise multiplier = {noise_multiplier!r} must be > 0")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise PrivacyError(f"clip norm = {clip_norm!r} must be > 0")
        if participation not in ("single", "cyclic"):
            raise PrivacyError(f"participation = {participation!r} must be 'single' or "
                               "'cyclic'")
        self.mechanism = mechanism
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.participation = participation
        self.min_separation = None if participation == "single" else int(min_separation or 1)
        self.expected_clients = float(expected_clients)
        self.kek_path = kek_path
        self._explicit_noise = noise_multiplier_pinned
        self._sens = self._sensitivities(int(rounds))
        self.last_round: dict[int, int] = {}
        self.participations: dict[int, int] = {}
        self._refused = 0
        self._source: NoiseSource | None = None
        #: None: a fresh key from the OS CSPRNG at the first round (tests may pin one)
        self._noise_key = noise_key
        self._wrapped_key: str | None = None
        self._kek: bytes | None = None
        self._replay_to = 0
        self._dim: int | None = None
        super().__init__(mode="dp-ftrl", accountant=accountant, delta=delta,
                         target_epsilon=target_epsilon, settings=self._settings(int(rounds)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: Config, *, num_clients: int) -> DPFTRL:
        """Build from ``[privacy]``: mechanism, participation and (calibrated) multiplier."""
        p = config.privacy
        rounds = config.run.rounds
        expected = config.cohort_size()
        groups = max(1, num_clients // expected)
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ConfigError("privacy.mode = 'dp-ftrl' needs privacy.noise_multiplier or "
                              "privacy.target_epsilon (to calibrate the multiplier)")
        if p.noise_multiplier is not None and p.noise_multiplier == 0:
            raise ConfigError("privacy.noise_multiplier = 0 adds no noise (epsilon would be "
                              "infinite); give a multiplier > 0, or set privacy.mode = 'off'")
        if p.adaptive_clipping:
            raise ConfigError("privacy.adaptive_clipping is not available with privacy.mode = "
                              "'dp-ftrl' (its noised count would need its own correlated "
                              "mechanism); use a fixed privacy.clip_norm")
        if config.cohort.sampling != "cyclic":
            log.info("privacy: DP-FTRL with cohort.sampling = %r: the participation pattern is "
                     "enforced by refusing clients that break it; cohort.sampling = 'cyclic' "
                     "keeps it by construction", config.cohort.sampling)
        separation = None
        if p.participation == "cyclic":
            separation = p.min_separation if p.min_separation is not None else groups
            if config.cohort.sampling == "cyclic" and separation > groups:
                raise ConfigError(
                    f"privacy.min_separation = {separation} exceeds the {groups} rounds between "
                    f"a client's turns in cohort.sampling = 'cyclic' ({num_clients} clients, "
                    f"{expected} per round); every client would be refused")
        elif config.cohort.sampling == "cyclic" and rounds > groups:
            raise ConfigError(
                f"privacy.participation = 'single' with cohort.sampling = 'cyclic' lasts "
                f"{groups} rounds ({num_clients} clients, {expected} per round), not "
                f"run.rounds = {rounds}; use participation = 'cyclic' or fewer rounds")
        mechanism = build_mechanism(kind=p.ftrl_mechanism, rounds=rounds,
                                    participation=p.participation, min_separation=separation,
                                    band=p.band, tree_restart=p.tree_restart,
                                    honaker=p.tree_estimator == "honaker")
        if p.noise_multiplier is not None:
            z = float(p.noise_multiplier)
        else:
            probe = cls(mechanism=mechanism, noise_multiplier=1.0, clip_norm=p.clip_norm,
                        rounds=rounds, participation=p.participation,
                        min_separation=separation, expected_clients=expected, delta=p.delta,
                        accountant=p.accountant)
            # One Gaussian mechanism over the whole run: calibrate its multiplier z / sens_T.
            effective = calibrate_noise_multiplier(
                target_epsilon=float(p.target_epsilon),  # type: ignore[arg-type]
                sample_rate=1.0, steps=1, delta=p.delta, accountant=p.accountant)
            z = effective * probe.sensitivity(rounds)
            log.info("privacy: DP-FTRL noise multiplier %.4f (effective %.4f, sensitivity "
                     "%.4f) calibrated for epsilon %g over %d rounds (delta %g, %s)", z,
                     effective, probe.sensitivity(rounds), p.target_epsilon, rounds, p.delta,
                     p.accountant)
        kek = Path(p.noise_key_file) if p.noise_key_file else None
        return cls(mechanism=mechanism, noise_multiplier=z, clip_norm=p.clip_norm,
                   rounds=rounds, participation=p.participation, min_separation=separation,
                   expected_clients=expected, delta=p.delta, accountant=p.accountant,
                   target_epsilon=p.target_epsilon, kek_path=kek,
                   noise_multiplier_pinned=p.noise_multiplier is not None)

    def _sensitivities(self, rounds: int) -> np.ndarray:
        encoder, released = self.mechanism.encoder(rounds)
        return sensitivities(encoder, released, participation=self.participation,
                             min_separation=self.min_separation)

    def sensitivity(self, rounds: int) -> float:
        """``sens_t`` for the first ``rounds`` rounds (in units of the clip norm)."""
        if rounds < 1:
            return 0.0
        if rounds > len(self._sens):
            self._sens = self._sensitivities(max(rounds, 2 * len(self._sens)))
        return float(self._sens[rounds - 1])

    def epsilon_after_rounds(self, rounds: int) -> float:
        """Epsilon of the first ``rounds`` rounds: the Gaussian mechanism ``z / sens_t``."""
        sens = self.sensitivity(rounds)
        return epsilon_of([(self.noise_multiplier / sens, 1.0, 1)], delta=self.ledger.delta,
                          accountant=self.ledger.accountant)

    def _settings(self, rounds: int) -> dict[str, Any]:
        sens = self.sensitivity(rounds)
        return {**self.mechanism.describe(), "noise_multiplier": self.noise_multiplier,
                "clip_norm": self.clip_norm, "participation": self.participation,
                "min_separation": self.min_separation, "planned_rounds": rounds,
                "sensitivity": sens, "effective_noise_multiplier": self.noise_multiplier / sens,
                "max_participations": (1 if self.min_separation is None
                                       else math.ceil(rounds / self.min_separation)),
                "expected_clients": self.expected_clients, "amplification": "none"}

    # ------------------------------------------------------------------ step 4 (client)
    def client_stages(self) -> list[UpdateStage]:  # noqa: D102
        return [_ClipStage(self)]

    def clip_update(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        """Clip to ``C`` (the sensitivity is in units of ``C``)."""
        return l2_clip(update, self.clip_norm)

    def clip_batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]
                   ) -> torch.Tensor:
        """:meth:`clip_update` of a cohort ``[n, dim]``: one factor per row, and any row the
        rounding leaves above ``C`` clipped again by :func:`l2_clip` (which guarantees it).
        """
        norms = torch.linalg.vector_norm(updates.detach().to(torch.float64), dim=1)
        factor = torch.clamp(self.clip_norm / torch.clamp(norms, min=1e-300), max=1.0)
        clipped = (updates.to(torch.float64) * factor[:, None]).to(updates.dtype)
        over = torch.linalg.vector_norm(clipped.to(torch.float64), dim=1) > self.clip_norm
        for row in torch.nonzero(over).flatten().tolist():
            clipped[row] = l2_clip(updates[row], self.clip_norm)
        return clipped

    # ------------------------------------------------------------------ participation
    def admit(self, client_ids: Sequence[int], server_round: int) -> list[int]:
        """The clients of ``client_ids`` that may take part in ``server_round`` without
        breaking the participation pattern; the others are logged as refused. Admitted
        clients are recorded as having taken part (even if they drop out later: counting a
        participation that did not happen is conservative).
        """
        admitted = []
        for cid in client_ids:
            cid = int(cid)
            last = self.last_round.get(cid)
            if last is not None and (self.min_separation is None
                                     or server_round - last < self.min_separation):
                why = ("it already took part (privacy.participation = 'single')"
                       if self.min_separation is None else
                       f"it took part {server_round - last} round(s) ago, fewer than "
                       f"privacy.min_separation = {self.min_separation}")
                log.warning("round %d: DP-FTRL refuses client %d: %s (round %d)",
                            server_round, cid, why, last)
                self._refused += 1
                continue
            admitted.append(cid)
        for cid in admitted:
            self.last_round[cid] = server_round
            self.participations[cid] = self.participations.get(cid, 0) + 1
        return admitted

    def admit_cohort(self, cohort: np.ndarray, server_round: int) -> np.ndarray:
        """Step 1: refuse, before they are sent work, the sampled clients that would break
        the participation pattern the accountant was promised (logged, counted).
        """
        self._refused = 0
        return np.asarray(self.admit([int(c) for c in cohort], server_round), dtype=np.int64)

    def observe_results(self, results: ResultBatch | Sequence[ClientResult],
                        server_round: int) -> None:
        """Refuse, before aggregation, the results of clients that would break the pattern.

        The coordinator passes the list it then aggregates, so refused results are removed
        from it in place.
        """
        # a list of ClientResult, or a ResultBatch (confide.round) with host-side client_ids
        if isinstance(results, Sequence):
            ids = [int(r.client_id) for r in results]
        else:
            ids = [int(c) for c in results.client_ids]
        # clients admitted when the cohort was sampled (admit_cohort) pass; others are checked
        fresh = [c for c in ids if self.last_round.get(c) != server_round]
        admitted = set(ids) - set(fresh) | set(self.admit(fresh, server_round))
        if len(admitted) == len(ids):
            return
        if isinstance(results, list):
            results[:] = [r for r in results if int(r.client_id) in admitted]
            return
        select = getattr(results, "select", None)
        if select is None or not dataclasses.is_dataclass(results):
            raise PrivacyError("DP-FTRL cannot refuse clients here: the results are read-only")
        # Keep the admitted rows in place, so the batch the coordinator aggregates next is
        # the filtered one.
        kept = select([i for i, cid in enumerate(ids) if cid in admitted])
        for f in dataclasses.fields(kept):
            setattr(results, f.name, getattr(kept, f.name))

    # ------------------------------------------------------------------ step 6 (server)
    def _ensure_noise(self, dim: int) -> None:
        if self._source is not None:
            if dim != self._dim:
                raise PrivacyError(f"the update has {dim} coordinates; DP-FTRL's noise was "
                                   f"started for {self._dim}")
            return
        if self._wrapped_key is None:
            self._source = NoiseSource(self._noise_key)
        else:
            self._source = NoiseSource(unwrap_key(self._require_kek(create=False),
                                                  self._wrapped_key))
        if self._dim is not None and dim != self._dim:
            raise PrivacyError(f"the update has {dim} coordinates; the checkpoint's DP-FTRL "
                               f"noise has {self._dim}")
        self._dim = dim
        self.mechanism.start(source=self._source, dim=dim,
                             std=self.noise_multiplier * self.clip_norm)
        # Resume: regenerate the state from round 1 (nothing but the wrapped key is stored).
        for _ in range(self._replay_to):
            self.mechanism.step()

    def process_aggregate(self, aggregate: Aggregate, server_round: int) -> Aggregate:  # noqa: D102
        require_clipped_sum(aggregate, mechanism="DP-FTRL", advice=(
            "a sum-based strategy without them (fedavg, fedavgm, fedprox, fedadam, ...)"))
        stray = [c for c in aggregate.client_ids if self.last_round.get(int(c)) != server_round]
        if stray:
            raise PrivacyError(f"round {server_round}'s sum holds clients DP-FTRL did not "
                               f"admit ({stray[:5]}); it cannot be released")
        total = aggregate.update_sum
        self._ensure_noise(int(total.numel()))
        if self.mechanism.rounds_done != server_round - 1:
            raise PrivacyError(f"DP-FTRL's noise is at round {self.mechanism.rounds_done}, "
                               f"not {server_round - 1}; resume from the run's own checkpoint")
        noise = torch.from_numpy(self.mechanism.step()).reshape(total.shape)
        aggregate.update_sum = (total.to(torch.float64) + noise.to(total.device)).to(total.dtype)
        # Fixed denominator (McMahan et al. 2018, Alg. 1): the expected cohort, not the count.
        aggregate.denominator = self.expected_clients
        event = self._round_event(server_round)
        if event is not None:
            self.stage_event(POPULATION, event)
        return aggregate

    # ------------------------------------------------------------------ step 8 and state
    def _round_event(self, server_round: int) -> PrivacyEvent | None:
        """Round ``t``'s Gaussian share: ``sens_t^2 - sens_{t-1}^2 = z^2 / z_t^2``."""
        added = self.sensitivity(server_round) ** 2 - self.sensitivity(server_round - 1) ** 2
        if added <= _NO_INCREMENT:
            return None
        return (self.noise_multiplier / math.sqrt(added), 1.0, 1)

    def planned_events(self, server_round: int, num_sampled_expected: int  # noqa: D102
                       ) -> dict[str, PrivacyEvent]:
        event = self._round_event(server_round)
        return {} if event is None else {POPULATION: event}

    def round_metrics(self) -> dict[str, float]:  # noqa: D102
        return {"refused_clients": float(self._refused)}

    def attach_run_dir(self, run_dir: Path) -> None:  # noqa: D102
        super().attach_run_dir(run_dir)
        if self.kek_path is None:
            self.kek_path = Path(run_dir) / KEK_NAME

    def _require_kek(self, *, create: bool) -> bytes:
        if self._kek is None:
            if self.kek_path is None:
                if not create:
                    raise PrivacyError("this checkpoint's DP-FTRL noise key is wrapped, but no "
                                       "key-encryption key file is known (privacy."
                                       "noise_key_file, or the run folder)")
                self._kek = NoiseSource().key  # no persistent home: kept in memory only
            else:
                self._kek = load_or_create_kek(self.kek_path, create=create)
        return self._kek

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        state: dict[str, Any] = {**super().state_dict(), "noise_multiplier": self.noise_multiplier,
                                 "mechanism": self.mechanism.describe(),
                                 "participation": {"last_round": dict(self.last_round),
                                                   "count": dict(self.participations)}}
        if self._source is not None and self._wrapped_key is None:
            self._wrapped_key = wrap_key(self._require_kek(create=True), self._source.key)
        if self._wrapped_key is not None:
            rounds = self.mechanism.rounds_done if self._source is not None else self._replay_to
            state["noise"] = {"wrapped_key": self._wrapped_key, "dim": self._dim,
                              "rounds": rounds}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        super().load_state_dict(state)
        saved_z = float(state.get("noise_multiplier", self.noise_multiplier))
        if self._explicit_noise and abs(saved_z - self.noise_multiplier) > 1e-12:
            raise PrivacyError(
                f"privacy.noise_multiplier = {self.noise_multiplier:g} differs from the "
                f"{saved_z:g} this run was accounted with; resume with the run's own config")
        if dict(state.get("mechanism", {})) != self.mechanism.describe():
            raise PrivacyError(f"the checkpoint's DP-FTRL mechanism {state.get('mechanism')} "
                               f"differs from this run's {self.mechanism.describe()}")
        self.noise_multiplier = saved_z
        part = state.get("participation", {})
        self.last_round = {int(k): int(v) for k, v in dict(part.get("last_round", {})).items()}
        self.participations = {int(k): int(v) for k, v in dict(part.get("count", {})).items()}
        noise = state.get("noise")
        self._source = None
        if noise is not None:
            self._wrapped_key = str(noise["wrapped_key"])
            self._dim = int(noise["dim"])
            self._replay_to = int(noise["rounds"])
        self.ledger.settings.update(self._settings(int(self.ledger.settings.get(
            "planned_rounds", len(self._sens)))))


class _ClipStage:
    """DP-FTRL's client stage: clip to ``C``, per client or for a whole cohort (``batch``)."""

    def __init__(self, privacy: DPFTRL) -> None:
        self.privacy = privacy

    def __call__(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        return self.privacy.clip_update(update, ctx)

    def batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]) -> torch.Tensor:
        return self.privacy.clip_batch(updates, contexts)

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
from confide.privacy.discrete_gaussian import (  # re-exported: the mechanism's building blocks
    BETA,
    MAX_SIGMA_INT,
    DiscreteGaussianShares,
    _conversion_floor,
    _interpolate,
    conditional_stochastic_round,
    ddg_rdp,
    fwht,
    padded_length,
    poisson_subsampled_rdp,
    rotate,
    rotation_signs,
    rounded_l2_bound,
    sample_discrete_gaussian,
    unrotate,
)
from confide.privacy.ledger import POPULATION, LedgeredPrivacy, cohort_sampling
from confide.privacy.mechanisms import l2_clip
from confide.privacy.secagg.aggregator import ENCODED_INFO_KEY, PROTOCOL_DROPOUT_STAGES
from confide.seeding import derive_seed
from confide.strategies.registry import get_strategy

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
]

log = logging.getLogger("confide")

#: standard deviations of the noisy sum that must fit in Z_{2^b} (Kairouz et al. 2021, §4.4)
K_STDDEVS = 4.0
#: Opacus's RDP orders, at which the ledger converts RDP to epsilon
LEDGER_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
#: integer orders for the mechanism's own epsilon
INTEGER_ORDERS: tuple[int, ...] = tuple(range(2, 257))


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
        expected_f, q = cohort_sampling(config, num_clients)  # FedBuff: K clients, q = 1
        expected = int(expected_f)
        strategy = get_strategy(config.strategy.name)
        asynchronous = bool(getattr(strategy, "asynchronous", False))
        staleness = config.strategy.options.get(
            "staleness", getattr(strategy.Params(), "staleness", "constant"))
        if asynchronous and staleness != "constant":
            # Each client's update is clipped and encoded into Z_2^b by its own pipeline
            # (Kairouz et al. 2021, Alg. 1) before its staleness is known; the coordinator
            # cannot scale one input inside the secure sum, so s(τ) cannot be applied.
            raise ConfigError("privacy.mode = 'distributed' under FedBuff needs "
                              "strategy.staleness = 'constant': an update encoded for the "
                              "secure sum cannot be weighted by its staleness afterwards")
        # Noise shares are sized for the clients expected to reach the sum: fewer than
        # the expected cohort when the simulation drops clients before their input is sent.
        sim = config.simulation
        lost = sim.dropout_rate if sim.dropout_stage in ("training",
                                                         *PROTOCOL_DROPOUT_STAGES[:-1]) else 0.0
        rounds = config.run.rounds
        # Poisson sampling: the realised count wanders around its mean; a 3-sigma margin on
        # the average over the run keeps the budget from running out before the last round.
        margin = 1.0 if asynchronous else 1 - 3 / math.sqrt(max(expected * rounds, 1))
        n_cal = max(2, math.floor(expected * (1 - lost) * margin))
        max_clients = expected if asynchronous else min(
            num_clients, math.ceil(expected + 4 * math.sqrt(expected) + 1))
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

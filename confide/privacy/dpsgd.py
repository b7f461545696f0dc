"""Sample-level DP-SGD inside every client, through Opacus (Abadi et al., CCS 2016).

Each client trains with :meth:`opacus.PrivacyEngine.make_private`: per-sample gradients clipped
to ``privacy.clip_norm``, Gaussian noise ``privacy.noise_multiplier * clip_norm`` per step, and
Poisson-sampled batches (Opacus ``DPDataLoader``, rate ``q = 1 / batches``) — the sampling the
accountant assumes. What a round spends is what Opacus's own accountant recorded for that
``fit`` (``(z, q, epochs * batches)``); the client's account in the ledger composes its rounds.

Each client's epsilon is its own guarantee to its own records (a hospital's patients). It
counts every round the client trained in, with no amplification from cohort sampling
(the client knows it took part). ``history.json``'s ``epsilon`` is the largest over clients;
``privacy_ledger.json`` holds every client's account.

With ``privacy.target_epsilon`` and no ``noise_multiplier``, each client calibrates its own
multiplier for its data size so that ``run.rounds`` rounds (taking part in all of them, the
worst case) stay within the target — what ``PrivacyEngine.make_private_with_epsilon`` does
for one training run.

Models Opacus cannot train privately — BatchNorm above all, whose output for a sample depends
on the rest of its batch — are refused when the trainer is built, with the fix to apply.
The model is not rewritten silently (``ModuleValidator.fix``): the global model's layout
would no longer match the clients'.

Randomness: the batch sampler and the noise are seeded from the client's task seed in
simulation; a deployment must use Opacus ``secure_mode`` (a CSPRNG) instead.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModule
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from confide.client.pipeline import StageContext, UpdateStage
from confide.client.trainer import FitOutput, LocalTrainer, TrainSettings
from confide.exceptions import ClientDropped, ConfigError, PrivacyBudgetExceeded, PrivacyError
from confide.parameters import get_flat_params, set_flat_params
from confide.privacy.accounting import PrivacyEvent, calibrate_noise_multiplier, epsilon_of
from confide.privacy.base import SampleLevelDP
from confide.privacy.ledger import LedgeredPrivacy
from confide.seeding import derive_seed
from confide.strategies.base import ClientRule

if TYPE_CHECKING:
    from confide.config import Config
    from confide.round import ResultBatch

__all__ = ["DPSGDTrainer", "DPSGDPrivacy", "check_model_for_dp_sgd", "client_key"]

log = logging.getLogger("confide")

#: ``ClientResult.info`` keys of a client's DP-SGD event (scalars: they travel over Flower)
INFO_NOISE, INFO_RATE, INFO_STEPS = "dp_noise_multiplier", "dp_sample_rate", "dp_steps"


def client_key(client_id: int) -> str:
    """The ledger account of one client."""
    return f"client:{int(client_id)}"


def check_model_for_dp_sgd(model: nn.Module) -> None:
    """Refuse, in one line, a model Opacus cannot train with per-sample gradients."""
    errors = ModuleValidator.validate(model, strict=False)
    if not errors:
        try:
            errors = list(GradSampleModule.validate(model, strict=False))
        except Exception as exc:  # any failure of the check is a model Opacus cannot use
            errors = [exc]
    if not errors:
        return
    names = sorted({type(m).__name__ for m in model.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm)})
    if names:
        raise PrivacyError(
            f"privacy.mode = 'dp-sgd' cannot train this model: it has {', '.join(names)} "
            "layers, which mix samples of a batch (Opacus ModuleValidator); replace them with "
            "GroupNorm in the model factory (opacus.validators.ModuleValidator.fix does it)")
    first = str(errors[0]).strip().splitlines()[0] if str(errors[0]).strip() else type(
        errors[0]).__name__
    raise PrivacyError(f"privacy.mode = 'dp-sgd' cannot train this model (Opacus: {first})")


class DPSGDTrainer(LocalTrainer):
    """A :class:`LocalTrainer` whose every step is an Opacus DP-SGD step."""

    def __init__(self, model: nn.Module, device: torch.device, *,
                 noise_multiplier: float | None, max_grad_norm: float, delta: float,
                 accountant: str = "rdp", target_epsilon: float | None = None,
                 planned_rounds: int = 1,
                 on_fit: Callable[[PrivacyEvent], None] | None = None) -> None:
        check_model_for_dp_sgd(model)
        super().__init__(model, device)
        if noise_multiplier is None and target_epsilon is None:
            raise ConfigError("privacy.mode = 'dp-sgd' needs privacy.noise_multiplier or "
                              "privacy.target_epsilon")
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = float(max_grad_norm)
        self.delta = float(delta)
        self.accountant = accountant
        self.target_epsilon = target_epsilon
        self.planned_rounds = int(planned_rounds)
        self.on_fit = on_fit
        self._calibrated: dict[tuple[float, int], float] = {}
        self._one_round_eps: dict[PrivacyEvent, float] = {}
        #: the audit's hook (``confide audit``, :mod:`confide.app.audit_dpsgd`): called with a
        #: step's inputs and the model after ``backward`` and before Opacus clips and noises
        #: the per-sample gradients (``pre_step``); it may rewrite the ``grad_sample`` rows of
        #: canary examples (gradient canaries: Nasr et al. 2023, "Tight Auditing of
        #: Differentially Private Machine Learning", Sec. 3.2). None outside the audit.
        self.grad_sample_hook: Callable[[torch.Tensor, nn.Module], None] | None = None

    def _noise_for(self, sample_rate: float, steps_per_round: int) -> float:
        if self.noise_multiplier is not None:
            return self.noise_multiplier
        key = (sample_rate, steps_per_round)
        if key not in self._calibrated:
            self._calibrated[key] = calibrate_noise_multiplier(
                target_epsilon=float(self.target_epsilon),  # type: ignore[arg-type]
                sample_rate=sample_rate, steps=steps_per_round * self.planned_rounds,
                delta=self.delta, accountant=self.accountant)
        return self._calibrated[key]

    def fit(self, x: torch.Tensor, y: torch.Tensor, global_params: torch.Tensor,
            settings: TrainSettings, *, rule: ClientRule | None = None, seed: int = 0,
            drop_after_steps: int | None = None) -> FitOutput:
        """DP-SGD from ``global_params``; reports Opacus's privacy event to ``on_fit``."""
        rule = rule or ClientRule()
        n = len(y)
        batches = max(1, math.ceil(n / settings.batch_size))
        sample_rate = 1.0 / batches
        z = self._noise_for(sample_rate, settings.epochs * batches)
        if self.target_epsilon is not None:
            # A client never trains a round that alone would overspend its budget; rounds
            # after the first are checked against its account by DPSGDPrivacy.check_budget.
            planned = (z, sample_rate, settings.epochs * batches)
            if planned not in self._one_round_eps:
                self._one_round_eps[planned] = epsilon_of([planned], delta=self.delta,
                                                          accountant=self.accountant)
            if self._one_round_eps[planned] > self.target_epsilon:
                raise PrivacyBudgetExceeded(
                    f"privacy budget: one round of DP-SGD on {n} samples spends epsilon "
                    f"{self._one_round_eps[planned]:.3f} > privacy.target_epsilon = "
                    f"{self.target_epsilon:g}; raise privacy.noise_multiplier or the target")

        global_params = global_params.to(self.device)
        set_flat_params(self.model, global_params)
        self.model.train()
        optimizer = self._optimizer(settings)
        sampler_gen = torch.Generator(device="cpu").manual_seed(derive_seed(seed, "dp-sgd-batches"))
        noise_gen = torch.Generator(device=self.device).manual_seed(
            derive_seed(seed, "dp-sgd-noise"))
        # Opacus DPDataLoader: Poisson sampling with rate 1 / len(loader) (Opacus README;
        # Mironov et al. 2019 analyse exactly this subsampling).
        loader = DPDataLoader.from_data_loader(
            DataLoader(TensorDataset(x, y), batch_size=settings.batch_size),
            generator=sampler_gen)
        with warnings.catch_warnings():
            # secure_mode is off in simulation on purpose (seeded noise, see module doc).
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.accountant)
        try:
            module, dp_opt, dp_loader = engine.make_private(
                module=self.model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=z, max_grad_norm=self.max_grad_norm,
                poisson_sampling=False,  # the loader above already samples Poisson, seeded
                noise_generator=noise_gen)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise PrivacyError(f"Opacus cannot make this model private: "
                               f"{str(exc).strip().splitlines()[0]}") from None
        steps = 0
        loss_sum, correct = 0.0, 0
        correction = (rule.gradient_correction.to(self.device)
                      if rule.gradient_correction is not None else None)
        try:
            with warnings.catch_warnings():
                # Opacus's per-sample hooks need full backward hooks on modules whose inputs
                # do not require grad; torch warns about that and it is harmless here.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for _epoch in range(settings.epochs):
                    for xb, yb in dp_loader:
                        if drop_after_steps is not None and steps >= drop_after_steps:
                            raise ClientDropped("client left mid-round (fault injection)")
                        dp_opt.zero_grad(set_to_none=True)
                        logits = module(xb)
                        loss = self.loss_fn(logits, yb) if len(yb) else logits.sum() * 0.0
                        loss.backward()
                        if self.grad_sample_hook is not None:
                            self.grad_sample_hook(xb, self.model)
                        # pre_step clips per-sample gradients, adds the noise and scales;
                        # the strategy's rule (FedProx, SCAFFOLD) then acts on the noised
                        # gradient, which is post-processing and costs no privacy.
                        if dp_opt.pre_step():
                            if rule.proximal_mu or correction is not None:
                                self._modify_gradients(rule.proximal_mu, global_params,
                                                       correction)
                            dp_opt.original_optimizer.step()
                        steps += 1
                        loss_sum += float(loss.detach()) * len(yb)
                        correct += int((logits.detach().argmax(1) == yb).sum())
        finally:
            module._close()  # remove Opacus's hooks: the replica is reused for other clients
        history = list(engine.accountant.history)
        if len(history) != 1 or int(history[0][2]) != steps:
            raise PrivacyError(f"DP-SGD accounting mismatch: Opacus recorded {history} for "
                               f"{steps} steps")
        event: PrivacyEvent = (float(history[0][0]), float(history[0][1]), int(history[0][2]))
        if self.on_fit is not None:
            self.on_fit(event)
        update = get_flat_params(self.model) - global_params
        seen = max(1, n * settings.epochs)
        return FitOutput(update=update, num_examples=n, num_steps=steps,
                         metrics={"train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                                  "dp_noise_multiplier": event[0], "dp_sample_rate": event[1],
                                  "dp_steps": float(event[2])})


class DPSGDPrivacy(LedgeredPrivacy):
    """Round hooks for ``privacy.mode = 'dp-sgd'``: the Opacus trainer and per-client accounts.

    Client side: the trainer reports the event Opacus accounted for its ``fit``; the client
    stage that runs right after it (same client, same process) puts that event into
    ``ClientResult.info`` as scalars (``dp_noise_multiplier``, ``dp_sample_rate``,
    ``dp_steps``), which travel with the result in simulation and deployment alike.
    Server side: :meth:`observe_results` charges each reported event to that client's account.
    """

    def __init__(self, *, noise_multiplier: float | None, clip_norm: float, delta: float,
                 accountant: str = "rdp", target_epsilon: float | None = None,
                 planned_rounds: int = 1) -> None:
        if noise_multiplier is not None and not noise_multiplier > 0:
            raise ConfigError("privacy.noise_multiplier = 0 adds no noise (epsilon would be "
                              "infinite); give a multiplier > 0, or set privacy.mode = 'off'")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = float(clip_norm)
        self.planned_rounds = int(planned_rounds)
        self._fit_event: PrivacyEvent | None = None
        super().__init__(mode="dp-sgd", accountant=accountant, delta=delta,
                         target_epsilon=target_epsilon,
                         settings={"noise_multiplier": noise_multiplier,
                                   "max_grad_norm": self.clip_norm,
                                   "planned_rounds": self.planned_rounds})

    @classmethod
    def from_config(cls, config: Config, *, num_clients: int) -> DPSGDPrivacy:
        """Build from ``[privacy]``."""
        p = config.privacy
        if p.noise_multiplier is None and p.target_epsilon is None:
            raise ConfigError("privacy.mode = 'dp-sgd' needs privacy.noise_multiplier or "
                              "privacy.target_epsilon (to calibrate each client's multiplier)")
        if p.adaptive_clipping:
            raise ConfigError("privacy.adaptive_clipping applies to client-level DP "
                              "(privacy.mode = 'central'), not to DP-SGD")
        return cls(noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm, delta=p.delta,
                   accountant=p.accountant, target_epsilon=p.target_epsilon,
                   planned_rounds=config.run.rounds)

    # ------------------------------------------------------------------ client side
    def make_trainer(self, model: nn.Module, device: torch.device) -> LocalTrainer:  # noqa: D102
        return DPSGDTrainer(model, device, noise_multiplier=self.noise_multiplier,
                            max_grad_norm=self.clip_norm, delta=self.ledger.delta,
                            accountant=self.ledger.accountant,
                            target_epsilon=self.target_epsilon,
                            planned_rounds=self.planned_rounds, on_fit=self._on_fit)

    def _on_fit(self, event: PrivacyEvent) -> None:
        self._fit_event = event

    def client_stages(self) -> list[UpdateStage]:  # noqa: D102
        return [_FitAttribution(self)]

    def sample_level_dp(self) -> SampleLevelDP | None:
        """The fixed multiplier clients train with (a target ε calibrates per client)."""
        if self.noise_multiplier is None or self.target_epsilon is not None:
            raise ConfigError("DP-SGD with privacy.target_epsilon (per-client calibration and "
                              "budget checks) is not vectorised; set privacy.noise_multiplier "
                              "alone")
        return SampleLevelDP(noise_multiplier=float(self.noise_multiplier),
                             max_grad_norm=self.clip_norm)

    def attribute_fit(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        """Report the event of the ``fit`` that just ran with this client's result."""
        event, self._fit_event = self._fit_event, None
        if event is None:
            raise PrivacyError(f"DP-SGD accounting: client {ctx.client_id} produced an update "
                               "without a DP-SGD training event")
        ctx.info.update({INFO_NOISE: float(event[0]), INFO_RATE: float(event[1]),
                         INFO_STEPS: int(event[2])})
        return update

    # ------------------------------------------------------------------ server side
    def observe_results(self, batch: ResultBatch, server_round: int) -> None:
        """Charge each client's reported DP-SGD event to its account (recorded at step 8)."""
        for client_id, info in zip(batch.client_ids, batch.info, strict=True):
            try:
                z = float(info[INFO_NOISE])
                q = float(info[INFO_RATE])
                steps = float(info[INFO_STEPS])
            except (KeyError, TypeError, ValueError):
                raise PrivacyError(f"round {server_round}: client {client_id} reported no "
                                   "DP-SGD privacy event; its update cannot be accounted"
                                   ) from None
            if not (math.isfinite(z) and z > 0 and 0 < q <= 1 and steps >= 1
                    and steps.is_integer()):
                raise PrivacyError(f"round {server_round}: client {client_id} reported an "
                                   f"invalid DP-SGD event (z={z}, q={q}, steps={steps})")
            self.stage_event(client_key(client_id), (z, q, int(steps)))

    def planned_events(self, server_round: int, num_sampled_expected: int
                       ) -> dict[str, PrivacyEvent]:
        """Each client that trained before is assumed to repeat its last round's event."""
        self._fit_event = None
        return {key: acc.events()[-1] for key, acc in self.ledger.accounts.items()
                if acc.entries}

    def client_epsilons(self) -> dict[int, float]:
        """Epsilon spent by each client that has trained."""
        return {int(k.split(":", 1)[1]): acc.epsilon for k, acc in self.ledger.accounts.items()
                if k.startswith("client:")}

    def round_metrics(self) -> dict[str, float]:  # noqa: D102
        eps = self.client_epsilons()
        return {"epsilon_min_client": min(eps.values())} if eps else {}


class _FitAttribution:
    """The DP-SGD pipeline stage: every update carries the privacy event of its training."""

    def __init__(self, privacy: DPSGDPrivacy) -> None:
        self.privacy = privacy

    def __call__(self, update: torch.Tensor, ctx: StageContext) -> torch.Tensor:
        return self.privacy.attribute_fit(update, ctx)

    def batch(self, updates: torch.Tensor, contexts: Sequence[StageContext]) -> torch.Tensor:
        """A cohort trained at once reports each client's event in its context already."""
        for ctx in contexts:
            if INFO_STEPS not in ctx.info:
                raise PrivacyError(f"DP-SGD accounting: client {ctx.client_id} produced an "
                                   "update without a DP-SGD training event")
        return updates

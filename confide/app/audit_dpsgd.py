"""The DP-SGD audit: canary examples with Dirac gradients, in one training run.

Canaries (Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run",
Sec. 3, with the white-box gradient canaries of their Sec. 7; the Dirac canary of Nasr et al.
2023, "Tight Auditing of Differentially Private Machine Learning", Sec. 3.2): ``m`` canary
examples are placed in the clients' data (canary ``j`` at client ``j mod N``), each included
independently with probability 1/2. A canary is a real row of its client's dataset: Opacus's
``DPDataLoader`` Poisson-samples it like every other example. In a step that samples it, the
audit hook (:attr:`confide.privacy.dpsgd.DPSGDTrainer.grad_sample_hook`) rewrites its
per-sample gradient *before* Opacus clips and noises them: ``B e_{k_j}`` — all of it on the
canary's own coordinate ``k_j``, ``B`` far above the clip norm so clipping binds — when
canary ``j`` is included, and zero when it is not. Opacus's noise and its denominator (the
expected batch size) do not depend on who was sampled, so a zero-gradient example gives
exactly the output distribution of an absent one: the excluded canary is the add/remove
neighbour the sampled Gaussian accountant covers (Abadi et al. 2016, Sec. 3.1; Mironov et al.
2019), and every client's data size, hence its sample rate, is the same whatever the
inclusion bits.

Score: canary ``j``'s coordinate of the final model delta, negated (a descent step moves
against the gradient): ``s_j = -(w_T - w_0)[k_j]`` (the final-model threat model).

Accountant: a canary's guarantee is its host client's sample-level epsilon (that client's
account in the ledger); the audit compares with the largest over the hosts.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from confide.app.audit_mechanisms import AuditedDPSGD, audit_result
from confide.client.pipeline import ClientPipeline
from confide.config import Config, PrivacyConfig
from confide.exceptions import ConfigError
from confide.parameters import FlatEntry, flat_layout, set_flat_params
from confide.privacy.audit import AuditResult
from confide.seeding import derive_rng

__all__ = ["DiracCanaries", "run_example_audit", "CANARY_MARK"]

#: a canary example's first input feature (no real example has it); the second holds its index
CANARY_MARK = -12345.0
#: the index is stored as ``j / INDEX_SCALE`` (exact in float32 up to 2^24 canaries)
INDEX_SCALE = 1024.0
#: a canary's gradient is this many clip norms long, so clipping always binds
GRADIENT_SCALE = 1e3


class DiracCanaries:
    """The audit hook: included canaries' per-sample gradients become ``B e_{k_j}``, excluded
    ones' zero (module docstring); real examples' gradients are left as they are.
    """

    def __init__(self, *, included: np.ndarray, coords: np.ndarray, scale: float,
                 layout: list[FlatEntry]) -> None:
        self.included = np.asarray(included, dtype=bool)
        self.coords = np.asarray(coords, dtype=np.int64)
        self.scale = float(scale)
        self.layout = [e for e in layout if e.requires_grad]
        self._starts = np.array([e.start for e in self.layout])

    def __call__(self, xb: torch.Tensor, model: nn.Module) -> None:  # noqa: D102
        flat = xb.reshape(len(xb), -1)
        rows = torch.nonzero(flat[:, 0] == CANARY_MARK).flatten().tolist()
        if not rows:
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for e in self.layout:
                getattr(params[e.name], "grad_sample")[rows] = 0  # noqa: B009 - Opacus's
            for r in rows:
                j = int(round(float(flat[r, 1]) * INDEX_SCALE))
                if not self.included[j]:
                    continue
                k = int(self.coords[j])
                e = self.layout[int(np.searchsorted(self._starts, k, side="right")) - 1]
                row = getattr(params[e.name], "grad_sample")[r]  # noqa: B009
                row.view(-1)[k - e.start] = self.scale


def quiet_coordinates(model: nn.Module, params: torch.Tensor, x: torch.Tensor,
                      y: torch.Tensor, trainable: np.ndarray, m: int, *, seed: int
                      ) -> np.ndarray:
    """``m`` trainable coordinates where the real data's gradient at the initial model is
    smallest (ties in seeded random order): the Dirac canaries' coordinates, chosen as Nasr
    et al. 2023 (Sec. 3.2) choose theirs, so that real training disturbs their scores least.
    The choice depends on the real data and the initial model only, never on the inclusion
    bits, so the bound stays valid whatever it picks.
    """
    set_flat_params(model, params.to(next(model.parameters()).device))
    named = dict(model.named_parameters())
    layout = [e for e in flat_layout(model) if e.requires_grad]
    total = torch.zeros(int(params.numel()), dtype=torch.float64)
    for start in range(0, len(y), 256):
        xb, yb = x[start:start + 256], y[start:start + 256]
        loss = nn.functional.cross_entropy(model(xb), yb.long(), reduction="sum")
        grads = torch.autograd.grad(loss, [named[e.name] for e in layout])
        for e, g in zip(layout, grads, strict=True):
            total[e.start:e.stop] += g.detach().abs().reshape(-1).to(torch.float64).cpu()
    magnitude = total.numpy()[trainable]
    tiebreak = derive_rng(seed, "audit-dirac-coordinates").random(len(trainable))
    return trainable[np.lexsort((tiebreak, magnitude))[:m]]


def run_example_audit(config: Config, *, canaries: int, confidence: float) -> AuditResult:
    """Train ``config``'s DP-SGD federation with ``canaries`` canary examples and audit it."""
    from confide.app.simulate import build_simulation

    p, seed = config.privacy, config.run.seed
    if config.simulation.executor != "sequential":
        raise ConfigError("confide audit of privacy.mode = 'dp-sgd' runs Opacus's own trainer: "
                          "set simulation.executor = 'sequential'")
    if p.noise_multiplier is None or p.target_epsilon is not None:
        raise ConfigError("confide audit of privacy.mode = 'dp-sgd' needs "
                          "privacy.noise_multiplier alone (a target epsilon calibrates each "
                          "client's multiplier separately)")
    if p.accountant == "pld" or p.adaptive_clipping:
        raise ConfigError("privacy.mode = 'dp-sgd' needs privacy.accountant = 'rdp' or 'prv' "
                          "and no adaptive clipping")
    sim = build_simulation(config.replace(privacy=PrivacyConfig()))
    coord, inner = sim.coordinator, sim.coordinator.executor
    context = inner.context  # type: ignore[attr-defined]
    num_real = len(sim.partitions)
    x, y = context.x_train, context.y_train
    if not x.is_floating_point() or x[0].numel() < 2:
        raise ConfigError("confide audit of DP-SGD needs float inputs of at least two "
                          "features (its canary examples are marked in the first two)")
    layout = flat_layout(context.model_factory())
    trainable = np.concatenate([np.arange(e.start, e.stop) for e in layout if e.requires_grad])
    if canaries > len(trainable):
        raise ConfigError(f"--canaries = {canaries} exceeds the model's {len(trainable)} "
                          "trainable parameters (each Dirac canary needs its own)")
    if bool((x.reshape(len(x), -1)[:, 0] == CANARY_MARK).any()):
        raise ConfigError(f"the training data holds the canary mark {CANARY_MARK}; it "
                          "cannot be audited this way")
    params0 = coord.params.detach().clone()
    coords = quiet_coordinates(context.model_factory(), params0, x[torch.as_tensor(
        np.concatenate([np.asarray(part) for part in sim.partitions]), device=x.device)],
        y, trainable, canaries, seed=seed)
    included = derive_rng(seed, "audit-membership").random(canaries) < 0.5

    # The canary examples join the clients' data (included or not: module docstring).
    cx = torch.zeros((canaries, *x.shape[1:]), dtype=x.dtype, device=x.device)
    cflat = cx.view(canaries, -1)
    cflat[:, 0] = CANARY_MARK
    cflat[:, 1] = torch.arange(canaries, dtype=x.dtype, device=x.device) / INDEX_SCALE
    base = len(x)
    context.x_train = torch.cat([x, cx])
    context.y_train = torch.cat([y, torch.zeros(canaries, dtype=y.dtype, device=y.device)])
    hosts = np.arange(canaries) % num_real
    for c in range(num_real):
        mine = base + np.flatnonzero(hosts == c)
        context.partitions[c] = np.concatenate([np.asarray(context.partitions[c]), mine])

    z = float(p.noise_multiplier)
    dp = AuditedDPSGD(noise_multiplier=z, clip_norm=p.clip_norm, delta=p.delta,
                      accountant=p.accountant, planned_rounds=config.run.rounds)
    context.pipeline = ClientPipeline(dp.client_stages())
    context.privacy = dp
    context.trainer_factory = dp.make_trainer
    trainer = dp.make_trainer(context.model_factory(), context.device)
    trainer.grad_sample_hook = DiracCanaries(  # type: ignore[attr-defined]
        included=included, coords=coords, scale=GRADIENT_SCALE * p.clip_norm, layout=layout)
    inner.trainer = trainer  # type: ignore[attr-defined]
    coord.privacy = dp
    coord.evaluator = None
    coord.run()

    delta_w = (coord.params - params0.to(coord.params)).to(torch.float64).cpu().numpy()
    scores = -delta_w[coords]
    accounts = {c: dp.ledger.accounts.get(f"client:{c}") for c in set(hosts.tolist())}
    eps = (math.inf if z == 0 else
           max((acc.epsilon for acc in accounts.values() if acc is not None), default=0.0))
    # Opacus's rate, 1 / batches, of the host with the fewest batches (as DPSGDTrainer.fit)
    batch = config.client.batch_size
    rate = max(1 / max(1, math.ceil(len(context.partitions[c]) / batch)) for c in set(
        hosts.tolist()))
    return audit_result(mechanism="dp-sgd", canary_kind="gradient", scores=scores,
                        included=included, rounds=config.run.rounds, noise_multiplier=z,
                        sample_rate=rate, delta=p.delta, confidence=confidence,
                        epsilon_accountant=eps)

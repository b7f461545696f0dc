"""DP-SGD through Opacus inside a client: the trainer, per-client accounts, refused models."""

from __future__ import annotations

import pytest
import torch
from dp_test_models import batchnorm_mlp
from torch import nn

from confide.client.pipeline import ClientPipeline, StageContext
from confide.client.round import ClientResult
from confide.client.trainer import TrainSettings
from confide.config import load_config
from confide.exceptions import ConfigError, PrivacyBudgetExceeded, PrivacyError
from confide.parameters import get_flat_params
from confide.privacy import build_round_privacy
from confide.privacy.accounting import compute_epsilon
from confide.privacy.dpsgd import DPSGDPrivacy, DPSGDTrainer, check_model_for_dp_sgd
from confide.round import ResultBatch
from confide.strategies.base import ClientRule

SETTINGS = TrainSettings(epochs=2, batch_size=8, lr=0.1, momentum=0.9)


def _data(n=40, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x, (x[:, 0] > 0).long()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 2))


def _trainer(z=1.0, **kw):
    events = []
    trainer = DPSGDTrainer(_model(), torch.device("cpu"), noise_multiplier=z, max_grad_norm=1.0,
                           delta=1e-5, on_fit=events.append, **kw)
    return trainer, events


def test_fit_records_what_opacus_accounted():
    trainer, events = _trainer()
    x, y = _data()
    w0 = get_flat_params(trainer.model)
    out = trainer.fit(x, y, w0, SETTINGS, seed=1)
    assert events == [(1.0, 1 / 5, 10)]  # 40 samples / batch 8 = 5 batches, 2 epochs
    assert out.num_steps == 10 and out.metrics["dp_steps"] == 10.0
    assert torch.isfinite(out.update).all() and float(out.update.norm()) > 0
    # the replica is clean again: no Opacus hooks or per-sample gradients left behind
    assert not any(hasattr(p, "grad_sample") for p in trainer.model.parameters())


def test_same_seed_same_update_and_noise_matters():
    x, y = _data()
    a, _ = _trainer()
    b, _ = _trainer()
    w0 = get_flat_params(a.model)
    ua = a.fit(x, y, w0, SETTINGS, seed=5).update
    ub = b.fit(x, y, w0, SETTINGS, seed=5).update
    assert torch.equal(ua, ub)
    assert not torch.equal(ua, a.fit(x, y, w0, SETTINGS, seed=6).update)
    loud, _ = _trainer(z=50.0)
    assert float(loud.fit(x, y, w0, SETTINGS, seed=5).update.norm()) > 5 * float(ua.norm())


def test_empty_poisson_batches_are_steps_too():
    trainer, events = _trainer()
    x, y = _data(n=3)
    out = trainer.fit(x, y, get_flat_params(trainer.model),
                      TrainSettings(epochs=20, batch_size=1, lr=0.1), seed=0)
    assert events == [(1.0, 1 / 3, 60)]
    assert torch.isfinite(out.update).all()


def test_proximal_rule_acts_on_the_noised_gradient():
    x, y = _data()
    a, _ = _trainer()
    w0 = get_flat_params(a.model)
    plain = a.fit(x, y, w0, SETTINGS, seed=2).update
    prox = a.fit(x, y, w0, SETTINGS, seed=2, rule=ClientRule(proximal_mu=5.0)).update
    assert float(prox.norm()) < float(plain.norm())


def test_batchnorm_is_refused_in_one_line():
    model = batchnorm_mlp(input_shape=(5,), num_classes=2)
    with pytest.raises(PrivacyError) as info:
        check_model_for_dp_sgd(model)
    msg = str(info.value)
    assert "BatchNorm1d" in msg and "GroupNorm" in msg and "\n" not in msg
    with pytest.raises(PrivacyError):
        DPSGDTrainer(model, torch.device("cpu"), noise_multiplier=1.0, max_grad_norm=1.0,
                     delta=1e-5)


def test_a_round_that_alone_overspends_is_refused():
    trainer, _ = _trainer(z=0.3, target_epsilon=0.1)
    x, y = _data()
    with pytest.raises(PrivacyBudgetExceeded, match="one round of DP-SGD"):
        trainer.fit(x, y, get_flat_params(trainer.model), SETTINGS, seed=0)


def test_target_epsilon_calibrates_each_client():
    trainer, events = _trainer(z=None, target_epsilon=2.0, planned_rounds=3)
    x, y = _data()
    trainer.fit(x, y, get_flat_params(trainer.model), SETTINGS, seed=0)
    (z, q, steps), = events
    assert compute_epsilon(noise_multiplier=z, sample_rate=q, steps=3 * steps,
                           delta=1e-5) <= 2.0


def test_per_client_accounts_through_the_pipeline():
    cfg = load_config(None, ["privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0"])
    privacy = build_round_privacy(cfg, num_clients=20, dataset_size=100)
    assert isinstance(privacy, DPSGDPrivacy)
    trainer = privacy.make_trainer(_model(), torch.device("cpu"))
    pipeline = ClientPipeline(privacy.client_stages())
    w0 = get_flat_params(trainer.model)
    for rnd in (1, 2):
        privacy.check_budget(rnd, 2)
        results = []
        for cid, n in ((0, 40), (1, 16)):
            x, y = _data(n=n, seed=cid)
            out = trainer.fit(x, y, w0, SETTINGS, seed=rnd)
            ctx = StageContext(server_round=rnd, client_id=cid, seed=rnd)
            update = pipeline(out.update, ctx)
            assert ctx.info["dp_steps"] == out.num_steps
            # info holds scalars only: it is what travels back over Flower
            assert all(isinstance(v, int | float) for v in ctx.info.values())
            results.append(ClientResult(client_id=cid, update=update, num_examples=n,
                                        num_steps=out.num_steps, info=ctx.info))
        privacy.observe_results(ResultBatch.from_results(results), rnd)
        privacy.account(rnd, None)
    eps = privacy.client_epsilons()
    assert eps[0] == pytest.approx(compute_epsilon(noise_multiplier=1.0, sample_rate=1 / 5,
                                                   steps=20, delta=1e-5))
    assert eps[1] == pytest.approx(compute_epsilon(noise_multiplier=1.0, sample_rate=1 / 2,
                                                   steps=8, delta=1e-5))
    assert privacy.ledger.epsilon == max(eps.values())
    # an update without a DP-SGD fit before it cannot be attributed
    with pytest.raises(PrivacyError, match="without a DP-SGD training event"):
        pipeline(torch.zeros(3), StageContext(server_round=3, client_id=0, seed=0))
    # a result that reports no event (or a bogus one) is refused, not counted as free
    bare = ClientResult(client_id=5, update=torch.zeros(3), num_examples=1, num_steps=1)
    with pytest.raises(PrivacyError, match="reported no DP-SGD privacy event"):
        privacy.observe_results(ResultBatch.from_results([bare]), 3)
    bare.info = {"dp_noise_multiplier": 1.0, "dp_sample_rate": 2.0, "dp_steps": 3}
    with pytest.raises(PrivacyError, match="invalid DP-SGD event"):
        privacy.observe_results(ResultBatch.from_results([bare]), 3)


def test_dp_sgd_needs_noise_or_target():
    with pytest.raises(ConfigError, match="needs privacy.noise_multiplier or"):
        build_round_privacy(load_config(None, ["privacy.mode='dp-sgd'"]), num_clients=20,
                            dataset_size=100)

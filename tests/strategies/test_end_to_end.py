"""Every built-in strategy in a real simulation; server and client state survive a resume."""

import math

import pytest
import torch
from confide_testing import FAST

from confide.app.simulate import build_simulation, run_simulation
from confide.client.pipeline import ClientPipeline
from confide.client.round import ClientTask, run_client_task
from confide.client.trainer import LocalTrainer, TrainSettings
from confide.config import load_config
from confide.strategies import get_strategy

BUILT_INS = ["fedavg", "fedavgm", "fedprox", "fedadagrad", "fedadam", "fedyogi", "scaffold",
             "fedmedian", "trimmedmean", "krum"]


@pytest.mark.parametrize("name", BUILT_INS)
def test_each_strategy_learns_on_iid_digits(name):
    sim = build_simulation(load_config(None, [*FAST, f"strategy.name='{name}'",
                                              "data.partition='iid'", "client.lr=0.1"]))
    history = sim.coordinator.run()
    assert bool(torch.isfinite(sim.coordinator.params).all())
    accuracy = [r["test_accuracy"] for r in history]
    assert accuracy[-1] > 0.3, accuracy  # chance is 0.1


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "scaffold"])
def test_resume_equals_uninterrupted_with_strategy_state(tmp_path, name):
    sets = [*FAST, "run.rounds=4", f"strategy.name='{name}'", "cohort.size=5"]
    full, _ = run_simulation(None, overrides=sets, output=tmp_path / "full")
    part, _ = run_simulation(None, overrides=sets, output=tmp_path / "part", stop_after=2)
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert state["strategy"], "the server state is in the checkpoint"
    if name == "scaffold":
        assert state["client_states"] and all("c_i" in s for s in state["client_states"].values())
    run_simulation(resume=part)
    a = torch.load(full / "model.pt", weights_only=True)
    b = torch.load(part / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (full / "history.json").read_text() == (part / "history.json").read_text()


def _one_client_update(strategy_name, options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    from confide.parameters import get_flat_params

    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    strategy = get_strategy(strategy_name).from_options(options)
    task = ClientTask(client_id=0, server_round=1, global_params=get_flat_params(model),
                      instructions=strategy.configure_round(1),
                      settings=TrainSettings(epochs=5, batch_size=8, lr=0.5), seed=1)
    return run_client_task(task, LocalTrainer(model, torch.device("cpu")), x, y, strategy,
                           ClientPipeline())


def test_fedprox_proximal_term_reaches_the_trainer():
    free = _one_client_update("fedprox", {"mu": 0.0}).update.norm()
    held = _one_client_update("fedprox", {"mu": 1.0}).update.norm()
    assert held < 0.8 * free
    assert math.isfinite(float(held))

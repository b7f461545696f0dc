import json

import pytest
import torch
from confide_testing import FAST

from confide.app.simulate import build_simulation, run_simulation
from confide.config import load_config
from confide.exceptions import RoundFailedError


def _run(tmp_path, name, extra=()):
    run_dir, history = run_simulation(None, overrides=[*FAST, *extra], output=tmp_path / name)
    return run_dir, history


def test_same_seed_same_history_and_weights(tmp_path):
    a, _ = _run(tmp_path, "a")
    b, _ = _run(tmp_path, "b")
    assert (a / "history.json").read_text() == (b / "history.json").read_text()
    wa = torch.load(a / "model.pt", weights_only=True)
    wb = torch.load(b / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_different_seed_different_partition():
    s0 = build_simulation(load_config(None, [*FAST, "run.seed=0"]))
    s1 = build_simulation(load_config(None, [*FAST, "run.seed=1"]))
    assert any(len(p) != len(q) or (p != q).any()
               for p, q in zip(s0.partitions, s1.partitions, strict=True))


def test_run_folder_contents(tmp_path):
    run_dir, history = _run(tmp_path, "r")
    for name in ("config.toml", "history.json", "history.csv", "timings.csv", "model.pt",
                 "checkpoint.pt", "plots/accuracy.png"):
        assert (run_dir / name).is_file(), name
    rows = json.loads((run_dir / "history.json").read_text())
    assert [r["round"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert {"round", "test_accuracy", "test_loss", "num_clients", "epsilon"} <= set(r)
        assert r["epsilon"] is None
    assert (run_dir / "history.csv").read_text().splitlines()[0].startswith("round,")


def test_resume_equals_uninterrupted(tmp_path):
    full, _ = _run(tmp_path, "full", ["run.rounds=4", "strategy.name='fedavg'"])
    part, hist = run_simulation(None, overrides=[*FAST, "run.rounds=4"],
                                output=tmp_path / "part", stop_after=2)
    assert len(hist) == 2 and not (part / "model.pt").exists()
    _, hist2 = run_simulation(resume=part)
    assert [r["round"] for r in hist2] == [1, 2, 3, 4]
    wa = torch.load(full / "model.pt", weights_only=True)
    wb = torch.load(part / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (full / "history.json").read_text() == (part / "history.json").read_text()


def test_dropouts_reduce_reporting_clients(tmp_path):
    _, history = _run(tmp_path, "d", ["simulation.dropout_rate=0.3", "cohort.min_clients=2"])
    assert all(r["num_sampled"] == 10 and r["num_clients"] == 7 for r in history)
    assert all(r["num_dropped"] == 3 for r in history)


def test_round_below_min_clients_fails_and_keeps_checkpoint(tmp_path):
    with pytest.raises(RoundFailedError, match="fewer than cohort.min_clients = 9"):
        _run(tmp_path, "m", ["simulation.dropout_rate=0.3", "cohort.min_clients=9"])


def test_non_finite_update_is_excluded(tmp_path):
    sim = build_simulation(load_config(None, [*FAST, "run.rounds=1"]))
    executor = sim.coordinator.executor
    original = executor.run_cohort

    def poisoned(tasks):
        outcome = original(tasks)
        outcome.batch.updates[0] = float("nan")
        return outcome

    executor.run_cohort = poisoned
    history = sim.coordinator.run()
    assert history[0]["num_clients"] == 9
    assert torch.isfinite(sim.coordinator.params).all()


def test_poisson_cohort_sampling():
    from confide.server.sampling import sample_cohort

    sizes = [len(sample_cohort(num_clients=100, size=10, method="poisson", seed=0,
                               server_round=r)) for r in range(1, 401)]
    assert len(set(sizes)) > 3  # the cohort size itself is random
    assert abs(sum(sizes) / len(sizes) - 10) < 1.0  # E|cohort| = q * n
    fixed = [sample_cohort(num_clients=100, size=10, method="fixed", seed=0, server_round=r)
             for r in (1, 2)]
    assert all(len(c) == 10 and len(set(c.tolist())) == 10 for c in fixed)
    assert not (fixed[0] == fixed[1]).all()


def _first_failing_round(num_clients, size, need, seed=0, rounds=20):
    """A round whose first Poisson cohort is below ``need`` and whose first retry is not."""
    from confide.server.sampling import sample_cohort

    for rnd in range(1, rounds + 1):
        first = sample_cohort(num_clients=num_clients, size=size, method="poisson", seed=seed,
                              server_round=rnd)
        retry = sample_cohort(num_clients=num_clients, size=size, method="poisson", seed=seed,
                              server_round=rnd, attempt=1)
        if len(first) < need <= len(retry):
            return rnd
    raise AssertionError("no such round in range")


def test_failed_round_is_retried_with_a_fresh_cohort(tmp_path):
    job = ["data.num_clients=10", "cohort.size=3", "cohort.sampling='poisson'",
           "cohort.min_clients=2"]
    rnd = _first_failing_round(10, 3, 2)
    run_dir, history = _run(tmp_path, "retry", [*job, f"run.rounds={rnd}"])
    assert [r["round"] for r in history] == list(range(1, rnd + 1))
    row = history[rnd - 1]
    assert row["retries"] >= 1
    assert "fewer than cohort.min_clients = 2" in row["retry_reasons"]
    saved = json.loads((run_dir / "history.json").read_text())
    assert saved[rnd - 1]["retries"] == row["retries"]
    # without retries the same round ends the job, with the checkpoint of the round before
    with pytest.raises(RoundFailedError, match=f"round {rnd} failed"):
        _run(tmp_path, "no-retry", [*job, f"run.rounds={rnd}", "cohort.max_retries=0"])


def test_finite_check_brings_the_kept_rows_loss_sums_in_its_one_copy():
    """accept_finite_with_sums: the sums cover kept rows only (a rejected row's NaN loss too)."""
    from confide.round import ResultBatch, accept_finite_with_sums

    updates = torch.ones(4, 3, dtype=torch.float64)
    updates[1, 2] = float("inf")
    batch = ResultBatch(client_ids=[10, 11, 12, 13], updates=updates,
                        num_examples=torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64),
                        num_steps=torch.ones(4, dtype=torch.float64),
                        metrics={"train_loss": torch.tensor([0.5, float("nan"), 1.0, 2.0],
                                                            dtype=torch.float64)})
    w = batch.num_examples
    kept, rejected, sums = accept_finite_with_sums(batch, (w * batch.metrics["train_loss"], w))
    assert rejected == [11] and kept.client_ids == [10, 12, 13]
    assert sums == pytest.approx([0.5 + 3.0 + 8.0, 1.0 + 3.0 + 4.0])


def test_train_loss_from_the_finite_check_equals_the_kept_rows_mean(tmp_path):
    """The history's train loss is the example-weighted mean over the summed clients, also
    when one client's update is rejected (then the sums of the finite check are used)."""
    sim = build_simulation(load_config(None, [*FAST, "run.rounds=1"]))
    executor = sim.coordinator.executor
    original = executor.run_cohort
    seen = {}

    def poisoned(tasks):
        outcome = original(tasks)
        outcome.batch.updates[0] = float("nan")
        b = outcome.batch
        w, loss = b.num_examples[1:], b.metrics["train_loss"][1:]
        seen["mean"] = float((w * loss).sum() / w.sum())
        return outcome

    executor.run_cohort = poisoned
    history = sim.coordinator.run()
    assert history[0]["num_clients"] == 9
    assert history[0]["train_loss"] == pytest.approx(seen["mean"], rel=1e-12)

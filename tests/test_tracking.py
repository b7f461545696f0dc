"""Experiment trackers, read back by each library's own reader."""

import importlib.util

import pytest

from confide.app.simulate import run_simulation
from confide.exceptions import ConfigError
from confide.tracking import check_trackers

JOB = ["run.rounds=2", "data.num_clients=4", "client.epochs=1", "client.device='cpu'"]


def test_missing_tracker_package_is_one_line_before_anything_is_written(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'mlflow' package is not installed; install it "
                                          r"with: pip install 'confide\[tracking\]'"):
        run_simulation(None, overrides=[*JOB, 'run.trackers=["mlflow"]'],
                       output=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_unknown_tracker_is_refused_by_the_config():
    from confide.config import load_config

    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ['run.trackers=["wandb"]'])
    with pytest.raises(ConfigError, match="unknown tracker"):
        check_trackers(["wandb"])


@pytest.mark.slow
def test_tensorboard_and_mlflow_runs_read_back(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir, history = run_simulation(
        None, overrides=[*JOB, 'run.trackers=["tensorboard", "mlflow"]'], output=tmp_path / "r")
    accuracy = [r["test_accuracy"] for r in history]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("test_accuracy")
    assert [e.step for e in scalars] == [1, 2]
    assert [e.value for e in scalars] == pytest.approx(accuracy, abs=1e-6)
    assert "train_loss" in events.Tags()["scalars"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    exp = client.get_experiment_by_name("confide")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["data.num_clients"] == "4"
    got = client.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, m.value) for m in got] == [(1, pytest.approx(accuracy[0])),
                                                (2, pytest.approx(accuracy[1]))]


@pytest.mark.slow
def test_a_resumed_run_continues_its_tracker_runs(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = ["run.rounds=2", "data.num_clients=4", "client.epochs=1", "client.device='cpu'",
            'run.trackers=["tensorboard", "mlflow"]']
    run_dir, _ = run_simulation(None, overrides=over, output=tmp_path / "r", stop_after=1)
    _, history = run_simulation(resume=run_dir)

    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("confide").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")]
    assert steps == [1, 2]
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("test_accuracy")] == [1, 2]

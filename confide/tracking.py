"""Experiment tracking: ``run.trackers = ["tensorboard", "mlflow"]``, fed every round.

Both trackers write inside the run folder, through the libraries themselves:

* ``tensorboard`` — event files in ``RUN/tensorboard/`` (``torch.utils.tensorboard``'s
  ``SummaryWriter``; needs the ``tensorboard`` package). View with
  ``tensorboard --logdir RUN/tensorboard``.
* ``mlflow`` — an MLflow run (the config as parameters, every history column as a metric
  per round) in a local file store ``RUN/mlruns/`` (experiment ``confide``); view with
  ``mlflow ui --backend-store-uri RUN/mlruns``. ``MLFLOW_TRACKING_URI``, when set, is used
  instead (a tracking server or a database).

Install both with ``pip install 'confide[tracking]'``; a tracker whose package is missing is a
one-line error before the run starts. A resumed run continues the same MLflow run and drops
TensorBoard events past the checkpoint's round.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from confide.exceptions import ConfigError

__all__ = ["Tracker", "TensorBoardTracker", "MlflowTracker", "check_trackers", "open_trackers",
           "TRACKER_PACKAGES"]

log = logging.getLogger("confide")

#: tracker name -> the import package it needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """The finite numeric columns of a history row (``round`` is the step, not a metric)."""
    out = {}
    for key, value in record.items():
        if key == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


def _flatten(config: Mapping[str, Any]) -> dict[str, str]:
    return {f"{section}.{key}": str(value) for section, values in config.items()
            for key, value in values.items()}


class Tracker(ABC):
    """Receives the run's config once and every round's history row."""

    name = "base"

    @abstractmethod
    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one round's metrics at step ``record["round"]``."""

    @abstractmethod
    def close(self, *, finished: bool) -> None:
        """Flush and close (``finished``: the run reached ``run.rounds``)."""


class TensorBoardTracker(Tracker):
    """Scalars per round in TensorBoard event files under ``RUN/tensorboard``."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any], config_text: str,
                 start_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events a previous process wrote after the checkpoint it resumes.
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"),
                                    purge_step=start_round + 1 if start_round else None)
        if start_round == 0:
            self.writer.add_text("config", "```toml\n" + config_text + "\n```", 0)

    def log_round(self, record: Mapping[str, Any]) -> None:  # noqa: D102
        step = int(record["round"])
        for key, value in _metrics(record).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, *, finished: bool) -> None:  # noqa: D102
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run: the config as parameters, the history columns as metrics per round."""

    name = "mlflow"
    experiment = "confide"

    def __init__(self, run_dir: Path, *, config: Mapping[str, Any], config_text: str,
                 start_round: int) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this switch; a run
            # folder must stay self-contained, so Confide opts in for its own folder.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
            self.experiment)
        run_name = run_dir.resolve().name
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`confide.run_dir` = '{run_dir.resolve()}'",
            max_results=1) if start_round else []
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=run_name,
                                         tags={"confide.run_dir": str(run_dir.resolve())})
            self.run_id = run.info.run_id
            for key, value in _flatten(config).items():
                self.client.log_param(self.run_id, key, value[:6000])
            self.client.log_text(self.run_id, config_text, "config.toml")

    def log_round(self, record: Mapping[str, Any]) -> None:  # noqa: D102
        step = int(record["round"])
        for key, value in _metrics(record).items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self, *, finished: bool) -> None:  # noqa: D102
        self.client.set_terminated(self.run_id, status="FINISHED" if finished else "KILLED")


_TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker}


def check_trackers(names: Sequence[str]) -> None:
    """Raise a one-line ConfigError if a named tracker is unknown or its package is missing."""
    for name in names:
        if name not in _TRACKERS:
            raise ConfigError(f"run.trackers: unknown tracker {name!r}; choose from "
                              + ", ".join(sorted(_TRACKERS)))
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"run.trackers includes {name!r} but the {package!r} package is "
                              f"not installed; install it with: pip install 'confide[tracking]'")


class Trackers:
    """The run's trackers, called together; a tracker that fails is logged and dropped."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def log_round(self, record: Mapping[str, Any]) -> None:
        """Log one round in every tracker."""
        for t in list(self.trackers):
            try:
                t.log_round(record)
            except Exception as exc:  # a tracker's outage must not stop the training run
                log.warning("tracker %s failed (%s); it is switched off for this run",
                            t.name, exc)
                self.trackers.remove(t)

    def close(self, *, finished: bool) -> None:
        """Close every tracker."""
        for t in self.trackers:
            try:
                t.close(finished=finished)
            except Exception as exc:  # closing must not hide the run's own outcome
                log.warning("tracker %s did not close cleanly (%s)", t.name, exc)


def open_trackers(names: Sequence[str], *, run_dir: Path, config: Mapping[str, Any],
                  config_text: str, start_round: int = 0) -> Trackers:
    """Start the named trackers for ``run_dir`` (``start_round`` > 0: a resumed run)."""
    check_trackers(names)
    opened = [_TRACKERS[n](run_dir, config=config, config_text=config_text,
                           start_round=start_round) for n in names]
    if opened:
        log.info("tracking with %s in %s", ", ".join(t.name for t in opened), run_dir)
    return Trackers(opened)

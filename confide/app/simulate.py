"""Simulation mode: build a whole federation in one process from a config and run it.

``run_simulation`` is what ``confide simulate`` calls. A run folder holds ``config.toml``,
``history.json``/``.csv``, ``timings.csv``, ``plots/accuracy.png``, ``checkpoint.pt`` (after
every round) and ``model.pt`` (final weights). ``resume=True`` continues a run folder.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from confide.app.job import build_job
from confide.client.trainer import evaluate_model
from confide.config import Config, dump_config, load_config
from confide.devices import resolve_device
from confide.exceptions import CheckpointError, ConfigError, DataError
from confide.files import atomic_write_text
from confide.parameters import set_flat_params
from confide.round import Aggregator, PlainAggregator
from confide.server.checkpoint import check_resumable, load_checkpoint, resume_config
from confide.server.coordinator import Coordinator, RoundRecord
from confide.simulations.datasets import FederatedDataset, load_dataset
from confide.simulations.executors import SimulationContext, build_executor
from confide.simulations.partition import partition, partition_report

__all__ = ["Simulation", "build_simulation", "run_simulation", "new_run_dir", "build_aggregator"]

log = logging.getLogger("confide")


@dataclass
class Simulation:
    """A built federation, ready to run."""

    config: Config
    dataset: FederatedDataset
    partitions: list
    coordinator: Coordinator
    model: torch.nn.Module
    device: torch.device
    notes: list[str] = field(default_factory=list)

    def final_model(self) -> torch.nn.Module:
        """The model loaded with the current global weights."""
        set_flat_params(self.model, self.coordinator.params.to(self.device))
        return self.model


def new_run_dir(config: Config, base: Path = Path("runs")) -> Path:
    """A fresh folder under ``runs/`` named by time, dataset and strategy."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{stamp}-{config.data.dataset}-{config.strategy.name}".replace(":", "_")
    path = base / name
    i = 1
    while path.exists():
        i += 1
        path = base / f"{name}-{i}"
    return path


def build_aggregator(config: Config) -> Aggregator:
    """The aggregator for ``config`` (plain sum, or secure aggregation when enabled)."""
    if config.secure_aggregation.enabled:
        try:
            from confide.privacy.secagg.aggregator import SecureAggregator
        except ImportError:
            raise ConfigError("secure_aggregation.enabled = true is not available in this "
                              "build") from None
        return SecureAggregator(config)
    return PlainAggregator()


def build_simulation(config: Config, *, run_dir: Path | None = None,
                     on_round_end: Callable[[RoundRecord], None] | None = None) -> Simulation:
    """Load data, partition it, build model, strategy, executor and coordinator."""
    cfg = config
    device = resolve_device(cfg.client.device)
    data = load_dataset(cfg.data.dataset, seed=cfg.run.seed, test_fraction=cfg.data.test_fraction,
                        path=cfg.data.path, client_column=cfg.data.client_column,
                        label_column=cfg.data.label_column)
    if cfg.data.partition != "natural" and cfg.data.num_clients > len(data.y_train):
        raise DataError(
            f"data.num_clients = {cfg.data.num_clients} is larger than the dataset "
            f"({len(data.y_train)} training samples); lower it"
        )
    parts = partition(data.y_train, num_clients=cfg.data.num_clients, method=cfg.data.partition,
                      seed=cfg.run.seed, alpha=cfg.data.alpha,
                      classes_per_client=cfg.data.classes_per_client,
                      min_samples=cfg.data.min_samples_per_client,
                      natural=data.natural_clients)
    report = partition_report(parts, data.y_train, data.num_classes)

    dtype = torch.get_default_dtype()
    job = build_job(cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                    num_clients=cfg.data.num_clients, dataset_size=len(data.y_train))
    model_factory, strategy, privacy = job.model_factory, job.strategy, job.privacy
    model = model_factory().to(device)
    params = job.params
    pipeline = job.pipeline
    x_train = torch.as_tensor(data.x_train, dtype=dtype, device=device)
    y_train = torch.as_tensor(data.y_train, device=device)
    x_test = torch.as_tensor(data.x_test, dtype=dtype, device=device)
    y_test = torch.as_tensor(data.y_test, device=device)
    context = SimulationContext(x_train=x_train, y_train=y_train, partitions=parts,
                                model_factory=model_factory, strategy=strategy,
                                pipeline=pipeline, device=device,
                                trainer_factory=privacy.make_trainer, config=cfg,
                                privacy=privacy, dim=int(params.numel()))
    if cfg.simulation.executor == "flower":
        import confide.app.flower_sim  # noqa: F401 - registers the executor (top floor)
    executor = build_executor(cfg.simulation.executor, context)

    eval_model = model_factory().to(device)

    def evaluator(flat: torch.Tensor) -> dict[str, float]:
        set_flat_params(eval_model, flat.to(device))
        return evaluate_model(eval_model, x_test, y_test)

    coordinator = Coordinator(
        config=cfg, strategy=strategy, executor=executor, aggregator=build_aggregator(cfg),
        privacy=privacy, params=params, num_clients=len(parts),
        client_sizes=report.sizes, evaluator=evaluator, run_dir=run_dir,
        on_round_end=on_round_end,
    )
    notes = [f"dataset {data.name}: {len(data.y_train)} train / {len(data.y_test)} test, "
             f"{report.summary()}", f"strategy {strategy.describe()}, executor "
             f"{executor.name}, device {device}"]
    if cfg.client.device == "auto" and device.type == "cpu":
        notes.append("client.device = 'auto': no CUDA GPU found, training on the CPU")
    return Simulation(cfg, data, parts, coordinator, model, device, notes)


def _prepare_new_dir(run_dir: Path, config: Config) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(
            f"output folder {str(run_dir)!r} already holds files; choose another --output or "
            "continue that run with --resume"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dump_config(config))


def run_simulation(
    config_path: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    resume: str | Path | None = None,
    stop_after: int | None = None,
    on_start: Callable[[Simulation], None] | None = None,
    on_round_end: Callable[[RoundRecord], None] | None = None,
) -> tuple[Path, list[RoundRecord]]:
    """Run (or resume) a simulation; returns the run folder and the history."""
    overrides = list(overrides or [])
    if resume is not None:
        if config_path is not None or output is not None:
            raise ConfigError("--resume takes the run folder's own config; drop the config "
                              "file and --output")
        run_dir = Path(resume)
        config = resume_config(run_dir, overrides)
        state = load_checkpoint(run_dir)
    else:
        config = load_config(config_path, overrides)
        run_dir = Path(output) if output is not None else new_run_dir(config)
        state = None
    sim = build_simulation(config, run_dir=None, on_round_end=on_round_end)
    if state is not None:
        check_resumable(state, run_dir=run_dir, num_params=sim.coordinator.params.numel(),
                        rounds=config.run.rounds)
        sim.coordinator.restore(state)
        # A raised run.rounds is the only allowed change; record it.
        atomic_write_text(run_dir / "config.toml", dump_config(config))
    else:
        _prepare_new_dir(run_dir, config)
    sim.coordinator.run_dir = run_dir
    if on_start is not None:
        on_start(sim)
    history = sim.coordinator.run(stop_after=stop_after)
    if sim.coordinator.completed_rounds >= config.run.rounds:
        model = sim.final_model()
        tmp = run_dir / ".model.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(run_dir / "model.pt")
    return run_dir, history


def summarize(history: list[RoundRecord]) -> dict[str, Any]:
    """Final and best accuracy of a history."""
    acc = [r["test_accuracy"] for r in history if r.get("test_accuracy") is not None]
    return {"final_accuracy": acc[-1] if acc else None, "best_accuracy": max(acc) if acc else None,
            "rounds": len(history)}

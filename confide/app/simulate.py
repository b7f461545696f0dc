"""Simulation mode: build a whole federation in one process from a config and run it.

``run_simulation`` is what ``confide simulate`` calls. A run folder holds ``config.toml``,
``history.json``/``.csv``, ``timings.csv``, ``plots/accuracy.png``, ``checkpoint.pt`` (after
every round) and ``model.pt`` (final weights). ``resume=True`` continues a run folder.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from confide.app.job import build_job
from confide.client.trainer import evaluate_model
from confide.config import Config, config_to_dict, dump_config, load_config
from confide.devices import resolve_device
from confide.exceptions import CheckpointError, ConfigError, DataError
from confide.files import atomic_write_text
from confide.parameters import set_flat_params
from confide.progress import LogRoundProgress, RoundProgress
from confide.round import Aggregator, PlainAggregator
from confide.server.buffered import BufferedCoordinator
from confide.server.checkpoint import check_resumable, load_checkpoint, resume_config
from confide.server.coordinator import Coordinator, RoundRecord
from confide.server.history import diverged, plot_partition
from confide.simulations.datasets import FederatedDataset, load_dataset
from confide.simulations.executors import SimulationContext, build_executor
from confide.simulations.latency import LatencyModel
from confide.simulations.partition import partition, partition_report
from confide.threads import apply_thread_policy
from confide.tracking import check_trackers, open_trackers

__all__ = ["Simulation", "build_simulation", "run_simulation", "new_run_dir", "build_aggregator",
           "load_partitioned"]

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
                     on_round_end: Callable[[RoundRecord], None] | None = None,
                     progress: RoundProgress | None = None) -> Simulation:
    """Load data, partition it, build model, strategy, executor and coordinator."""
    cfg = config
    device = resolve_device(cfg.client.device)
    # Before any tensor work: one intra-op thread per concurrently trained client (logged
    # with the other notes once the job has started, so a job that cannot start says one line).
    threads = apply_thread_policy(cfg.simulation.cpu_threads, device_type=device.type,
                                  quiet=True)
    cfg, data, parts, inferred = load_partitioned(cfg)
    report = partition_report(parts, data.y_train, data.num_classes)

    dtype = torch.get_default_dtype()
    job = build_job(cfg, input_shape=data.input_shape, num_classes=data.num_classes,
                    num_clients=cfg.data.num_clients, dataset_size=len(data.y_train))
    model_factory, strategy, privacy = job.model_factory, job.strategy, job.privacy
    model = model_factory().to(device)
    params = job.params
    pipeline = job.pipeline
    # Integer inputs are token ids for an embedding: they stay integers.
    x_dtype = dtype if data.x_train.dtype.kind == "f" else torch.long
    x_train = torch.as_tensor(data.x_train, dtype=x_dtype, device=device)
    y_train = torch.as_tensor(data.y_train, device=device)
    x_test = torch.as_tensor(data.x_test, dtype=x_dtype, device=device)
    y_test = torch.as_tensor(data.y_test, device=device)
    context = SimulationContext(x_train=x_train, y_train=y_train, partitions=parts,
                                model_factory=model_factory, strategy=strategy,
                                pipeline=pipeline, device=device,
                                trainer_factory=privacy.make_trainer, config=cfg,
                                privacy=privacy, dim=int(params.numel()),
                                progress=progress)
    if cfg.simulation.executor == "flower":
        import confide.app.flower_sim  # noqa: F401 - registers the executor (top floor)
    executor = build_executor(cfg.simulation.executor, context)

    eval_model = model_factory().to(device)

    def evaluator(flat: torch.Tensor) -> dict[str, float]:
        set_flat_params(eval_model, flat.to(device))
        return evaluate_model(eval_model, x_test, y_test)

    # The virtual clock: simulated client durations, so that synchronous and asynchronous
    # runs compare in simulated wall-clock time (history column virtual_time_s).
    latency = LatencyModel.from_config(cfg)
    common: dict[str, Any] = dict(
        config=cfg, strategy=strategy, executor=executor, aggregator=build_aggregator(cfg),
        privacy=privacy, params=params, num_clients=len(parts),
        client_sizes=report.sizes, evaluator=evaluator, run_dir=run_dir,
        on_round_end=on_round_end, latency=latency)
    if getattr(strategy, "asynchronous", False):
        coordinator: Coordinator = BufferedCoordinator(
            **common, concurrency=cfg.simulation.concurrency or cfg.cohort_size())
    else:
        coordinator = Coordinator(**common)
    notes = [f"dataset {data.name}: {len(data.y_train)} train / {len(data.y_test)} test, "
             f"{report.summary()}", f"strategy {strategy.describe()}, executor "
             f"{executor.name}, device {device}"]
    if cfg.client.device == "auto" and device.type == "cpu":
        notes.append("client.device = 'auto': no CUDA GPU found, training on the CPU")
    notes.append(threads.describe())
    if inferred is not None:
        notes.append(f"natural partition: {inferred} clients (data.num_clients inferred)")
    return Simulation(cfg, data, parts, coordinator, model, device, notes)


def load_partitioned(config: Config) -> tuple[Config, FederatedDataset, list, int | None]:
    """``config``'s dataset and its seeded partition, as every simulated client sees it.

    Returns the config (with a natural partition's inferred client count), the data, the
    per-client index arrays, and the inferred count (None when ``data.num_clients`` stood).
    The Flower App (:mod:`confide.app.flower_project`) calls it on each SuperNode too, so a
    node's partition is the one ``confide simulate`` gives that client.
    """
    cfg = config
    data = load_dataset(cfg.data.dataset, seed=cfg.run.seed, test_fraction=cfg.data.test_fraction,
                        path=cfg.data.path, client_column=cfg.data.client_column,
                        label_column=cfg.data.label_column,
                        standardize=cfg.data.standardize)
    inferred = _natural_client_count(cfg, data)
    if inferred is not None:
        cfg = cfg.replace(data=dataclasses.replace(cfg.data, num_clients=inferred))
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
    return cfg, data, parts, inferred


def _natural_client_count(cfg: Config, data: FederatedDataset) -> int | None:
    """The client count of a natural partition when it differs from data.num_clients."""
    if cfg.data.partition != "natural" or data.natural_clients is None:
        return None
    count = len(set(data.natural_clients.tolist()))
    return count if count != cfg.data.num_clients else None


#: what a run writes before its first checkpoint; a folder holding only these never ran
_START_FILES = {"config.toml", "label_map.json", "plots", "tensorboard", "mlruns"}


def _never_ran(run_dir: Path) -> bool:
    """True if ``run_dir`` holds only what a run writes before its first checkpoint."""
    names = {p.name for p in run_dir.iterdir() if not p.name.startswith(".")}
    plots = run_dir / "plots"
    return (names <= _START_FILES and (run_dir / "config.toml").is_file()
            and (not plots.exists() or {p.name for p in plots.iterdir()
                                        if not p.name.startswith(".")} <= {"partition.png"}))


def _clear_start_files(run_dir: Path) -> None:
    """Remove what an interrupted start left (no round of it ever finished)."""
    for name in ("tensorboard", "mlruns", "plots"):
        if (run_dir / name).is_dir():
            shutil.rmtree(run_dir / name)


def _prepare_new_dir(run_dir: Path, config: Config) -> None:
    if run_dir.is_dir() and any(run_dir.iterdir()) and _never_ran(run_dir):
        # Stopped before its first checkpoint: nothing to lose, so the folder is reused.
        log.info("reusing %s: the run started there never finished a round", run_dir)
        _clear_start_files(run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
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
    progress: RoundProgress | None = None,
) -> tuple[Path, list[RoundRecord]]:
    """Run (or resume) a simulation; returns the run folder and the history.

    ``progress`` receives in-round progress (default: plain log lines every few seconds,
    :class:`~confide.progress.LogRoundProgress`). Ctrl-C or SIGTERM stops after logging how
    to resume.
    """
    overrides = list(overrides or [])
    if resume is not None:
        if config_path is not None or output is not None:
            raise ConfigError("--resume takes the run folder's own config; drop the config "
                              "file and --output")
        run_dir = Path(resume)
        config = resume_config(run_dir, overrides)
        # Stopped before its first checkpoint: resuming starts from round 0.
        state = None if _never_ran(run_dir) else load_checkpoint(run_dir)
    else:
        config = load_config(config_path, overrides)
        run_dir = Path(output) if output is not None else new_run_dir(config)
        state = None
    check_trackers(config.run.trackers)  # a missing package fails before anything is written
    if progress is None:
        progress = LogRoundProgress(rounds=config.run.rounds)
    sim = build_simulation(config, run_dir=None, on_round_end=on_round_end, progress=progress)
    config = sim.config  # with what the data decided (a natural partition's client count)
    if state is not None:
        check_resumable(state, run_dir=run_dir, num_params=sim.coordinator.params.numel(),
                        rounds=config.run.rounds)
        sim.coordinator.restore(state)
        # A raised run.rounds is the only allowed change; record it.
        atomic_write_text(run_dir / "config.toml", dump_config(config))
    else:
        _prepare_new_dir(run_dir, config)
        _write_start_files(sim, run_dir)
    sim.coordinator.run_dir = run_dir
    trackers = open_trackers(config.run.trackers, run_dir=run_dir,
                             config=config_to_dict(config), config_text=dump_config(config),
                             start_round=sim.coordinator.completed_rounds)
    sim.coordinator.on_round_end = _round_end_hook(sim, progress, trackers, on_round_end)
    if on_start is not None:
        on_start(sim)
    finished = False
    try:
        with _sigterm_unwinds():
            history = sim.coordinator.run(stop_after=stop_after)
        finished = sim.coordinator.completed_rounds >= config.run.rounds
    except KeyboardInterrupt:
        done = sim.coordinator.completed_rounds
        log.warning("stopped after round %d of %d; continue with: confide simulate --resume %s",
                    done, config.run.rounds, run_dir)
        raise
    finally:
        trackers.close(finished=finished)
    if sim.coordinator.completed_rounds >= config.run.rounds:
        model = sim.final_model()
        tmp = run_dir / ".model.pt.tmp"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        tmp.replace(run_dir / "model.pt")
    return run_dir, history


def _write_start_files(sim: Simulation, run_dir: Path) -> None:
    """The label map (user data) and the partition plot, written when a run starts."""
    data = sim.dataset
    if data.label_names is not None:
        mapping = {"class_index_to_label": dict(enumerate(data.label_names)),
                   "label_column": sim.config.data.label_column}
        atomic_write_text(run_dir / "label_map.json", json.dumps(mapping, indent=2) + "\n")
    plot_partition(run_dir, sim.partitions, data.y_train, data.num_classes,
                   client_names=data.client_names, label_names=data.label_names)


def _round_end_hook(sim: Simulation, progress: RoundProgress, trackers: Any,
                    user_hook: Callable[[RoundRecord], None] | None
                    ) -> Callable[[RoundRecord], None]:
    """After every round: flag divergence, report progress, feed the trackers, then the user's."""
    warned = False

    def hook(record: RoundRecord) -> None:
        nonlocal warned
        history = sim.coordinator.history
        why = diverged(record, history[0] if history else None)
        if why and not warned:
            warned = True
            log.warning("round %d: training diverges (%s); lower client.lr%s", record["round"],
                        why, "" if sim.config.data.standardize or sim.config.data.path is None
                        else " or set data.standardize = true")
        progress.end_round(record)
        trackers.log_round(record)
        if user_hook is not None:
            user_hook(record)

    return hook


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM stops a run like Ctrl-C (``finally`` blocks run, the resume hint is logged)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield  # someone else handles SIGTERM (a server, a test runner): leave it alone
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def summarize(history: list[RoundRecord]) -> dict[str, Any]:
    """Final and best accuracy of a history."""
    acc = [r["test_accuracy"] for r in history if r.get("test_accuracy") is not None]
    return {"final_accuracy": acc[-1] if acc else None, "best_accuracy": max(acc) if acc else None,
            "rounds": len(history)}

"""``confide server start``: the coordinator on Flower's deployment runtime.

One process owns the whole coordinator side:

1. a Flower SuperLink child process on a Unix socket in a folder only the coordinator's uid
   can enter (:mod:`confide.server.superlink`), with SuperNode authentication, ``--isolation
   process`` (no Flower-launched ServerApp subprocess) and runtime dependency installation off;
2. the enrolled clients' public keys registered as SuperNodes through the (socket-only)
   Control API, and one run started with a minimal app bundle that names Confide's apps;
3. the run's task acquired through the Runtime API (its AcquireTask call signed with a
   per-run SuperExec secret) and an ``HttpGrid`` on it;
4. the public :class:`~confide.server.gateway.Gateway` (mutual TLS, enrolment, Fleet routes
   only) on the advertised host and port;
5. Confide's ServerApp: the :class:`~confide.server.coordinator.Coordinator` with a
   :class:`~confide.server.flower_app.GridExecutor`, round after round, then a ``finish``
   message to the clients and the task's final status.

The first ``data.num_clients`` enrolled clients take part, as client ids ``0 .. n - 1`` in the
order of their names (so a client's id, seed and cohort do not depend on who enrolled first). The
coordinator re-reads the registry before every round: a revoked client is unregistered from
the SuperLink, refused by the gateway and left out of the round.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from confide.client.messages import JobSpec
from confide.compression import UpdateCodec
from confide.config import Config, dump_config
from confide.exceptions import (
    CheckpointError,
    ConfideError,
    ConfigError,
    DataError,
    RoundFailedError,
)
from confide.server.buffered import ArrivalCoordinator
from confide.server.ca import load_federation
from confide.server.checkpoint import check_resumable, resume_job
from confide.server.delivery import Delivery
from confide.server.enrolment import ClientRecord, EnrolmentAuthority
from confide.server.flower_app import GridExecutor, NodeDirectory, build_server_app
from confide.server.gateway import Gateway
from confide.server.superlink import SuperLinkClient, SuperLinkProcess

__all__ = ["DeployOptions", "run_deployment", "SuperLinkProcess", "free_port",
           "check_deployable"]

log = logging.getLogger("confide")

@dataclass(frozen=True)
class DeployOptions:
    """``confide server start`` options besides the federation and the job."""

    host: str = "127.0.0.1"
    port: int = 9092
    output: Path | None = None
    insecure: bool = False
    wait_for_clients_s: float = 300.0
    round_timeout_s: float = 600.0
    poll_interval_s: float = 0.01
    max_poll_interval_s: float = 0.1
    test_data: Path | None = None
    superlink_start_timeout_s: float = 60.0
    #: continue this run folder from its checkpoint and ledger (``server start --resume``)
    resume: Path | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _EnrolledClients(NodeDirectory):
    """Client ids are enrolment order; node ids come from registering the enrolled keys."""

    def __init__(self, *, authority: EnrolmentAuthority, runtime: SuperLinkClient,
                 size: int, delivery: Delivery | None = None) -> None:
        self.authority = authority
        #: the gateway's view of who is connected (a client whose process ended is gone)
        self.delivery = delivery
        self.runtime = runtime
        self.size = size
        self.records: list[ClientRecord] = []
        self.node_ids: dict[str, int] = {}
        self.revoked: set[str] = set()
        self.online: set[int] = set()
        self._lock = threading.Lock()

    def admit(self) -> None:
        """Register enrolled clients as SuperNodes until the job's population is full."""
        with self._lock:
            for record in self.authority.registry.active_clients():
                if len(self.records) >= self.size:
                    return
                if record.name not in self.node_ids:
                    self.node_ids[record.name] = self.runtime.register(record)
                    self.records.append(record)

    def freeze(self) -> None:
        """Fix the population for the job: client ids follow the clients' names, sorted.

        Names, not enrolment times: clients that enrol at the same moment would otherwise get
        ids (and so seeds and cohorts) that depend on a race.
        """
        with self._lock:
            self.records.sort(key=lambda r: r.name)
            self.size = len(self.records)

    def refresh(self) -> None:  # noqa: D102
        current = {c.name: c for c in self.authority.registry.clients()}
        for record in self.records:
            now = current.get(record.name)
            if (now is None or not now.active) and record.name not in self.revoked:
                self.revoked.add(record.name)
                log.warning("client %r is revoked; it is excluded from now on", record.name)
                node = self.node_ids.get(record.name)
                if node is not None:
                    with contextlib.suppress(httpx.HTTPError):
                        self.runtime.unregister(node)
        self.online = set(self.runtime.grid.get_node_ids())

    def node_of(self, client_id: int) -> int | str:  # noqa: D102
        if client_id >= len(self.records):
            return f"client {client_id} never enrolled"
        record = self.records[client_id]
        if record.name in self.revoked:
            return f"client {record.name!r} is revoked"
        node = self.node_ids.get(record.name)
        if node is None or node not in self.online:
            return f"client {record.name!r} is not connected"
        why = self.gone(client_id)
        return node if why is None else why

    def gone(self, client_id: int) -> str | None:  # noqa: D102
        if self.delivery is None or client_id >= len(self.records):
            return None
        name = self.records[client_id].name
        seconds = self.delivery.gone_for(name)
        if seconds is None or seconds < self.delivery.gone_grace_s:
            return None
        return f"client {name!r} closed its connections {seconds:.1f} s ago (its process ended)"

    def all_nodes(self) -> list[int]:  # noqa: D102
        return sorted(self.node_ids[r.name] for r in self.records
                      if r.name in self.node_ids and r.name not in self.revoked)

    def connected(self) -> int:
        """How many admitted, non-revoked clients are online."""
        self.online = set(self.runtime.grid.get_node_ids())
        return sum(1 for r in self.records if self.node_ids.get(r.name) in self.online
                   and r.name not in self.revoked)


# --------------------------------------------------------------------------- the job


@dataclass
class _Evaluation:
    x: torch.Tensor
    y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    dataset_size: int


def check_deployable(config: Config) -> None:
    """Job settings that only make sense in simulation are refused, with one line."""
    if config.simulation.dropout_rate > 0:
        raise ConfigError("simulation.dropout_rate injects faults in simulation only; set it "
                          "to 0 for a deployed job")
    from confide.strategies.registry import get_strategy

    strategy = get_strategy(config.strategy.name)
    if getattr(strategy, "asynchronous", False):
        from confide.config import check_fedbuff

        check_fedbuff(buffer_size=config.strategy.options.get(
            "buffer_size", strategy.Params().buffer_size),  # type: ignore[attr-defined]
            concurrency=config.simulation.concurrency or config.data.num_clients)
        if config.secure_aggregation.enabled:
            raise ConfigError("FedBuff with secure aggregation runs in simulation only for now: "
                              "a deployed client's masked input would have to carry the "
                              "staleness weight its arrival decides; set "
                              "secure_aggregation.enabled = false or use a synchronous "
                              "strategy for a deployed job")
    if config.secure_aggregation.enabled:
        if strategy.aux_names:
            raise ConfigError(f"strategy {config.strategy.name!r} keeps per-client state "
                              "that would leave clients in the clear; under secure "
                              "aggregation in deployment use a strategy without it (fedavg, "
                              "fedavgm, fedprox, fedadam, ...)")
    if config.privacy.mode == "central" and config.privacy.adaptive_clipping:
        raise ConfigError("privacy.adaptive_clipping is not available in deployment yet (the "
                          "round's clip norm does not travel with the task); use a fixed "
                          "privacy.clip_norm")


def _evaluation_data(config: Config, test_data: Path | None) -> _Evaluation:
    """The coordinator's held-out test set (it holds no client training data)."""
    from confide.client.data import read_data_file
    from confide.simulations.datasets import load_dataset

    if test_data is not None:
        x, y = read_data_file(test_data, label_column=config.data.label_column)
        return _Evaluation(torch.as_tensor(x), torch.as_tensor(y), tuple(x.shape[1:]),
                           int(y.max()) + 1, 0)
    if config.data.path is not None:
        raise DataError("a deployed coordinator holds no training data: give its test set "
                        "with --test-data FILE.npz (arrays x, y) instead of data.path")
    data = load_dataset(config.data.dataset, seed=config.run.seed,
                        test_fraction=config.data.test_fraction)
    return _Evaluation(torch.as_tensor(data.x_test), torch.as_tensor(data.y_test),
                       data.input_shape, data.num_classes, len(data.y_train))


def _prepare_run_dir(options: DeployOptions, config: Config) -> Path:
    from confide.app.simulate import new_run_dir
    from confide.server.history import atomic_write_text

    if options.resume is not None:  # a raised run.rounds is the only change; record it
        atomic_write_text(options.resume / "config.toml", dump_config(config))
        return options.resume
    run_dir = options.output if options.output is not None else new_run_dir(config)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise CheckpointError(f"output folder {str(run_dir)!r} already holds files; choose "
                              "another --output")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.toml", dump_config(config))
    return run_dir


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the SuperLink and gateway are always stopped."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_deployment(*, ca_dir: str | Path, config_path: str | Path | None,
                   overrides: list[str] | None = None, options: DeployOptions = DeployOptions(),
                   on_start: Callable[[str], None] | None = None,
                   on_round_end: Callable[[dict[str, Any]], None] | None = None
                   ) -> tuple[Path, list[dict[str, Any]]]:
    """Run a job across enrolled clients; returns the run folder and the history."""
    from confide.app.job import build_job
    from confide.app.simulate import build_aggregator
    from confide.client.trainer import evaluate_model
    from confide.parameters import set_flat_params
    from confide.server.coordinator import Coordinator

    # Everything a user can get wrong is checked before anything starts or is written.
    federation = load_federation(ca_dir)
    config, state = resume_job(config_path, overrides or [], options.resume)
    check_deployable(config)
    evaluation = _evaluation_data(config, options.test_data)
    authority = EnrolmentAuthority(federation)
    n = config.data.num_clients
    built = build_job(config, input_shape=evaluation.input_shape,
                      num_classes=evaluation.num_classes, num_clients=n,
                      dataset_size=evaluation.dataset_size)
    model_factory, strategy, privacy = built.model_factory, built.strategy, built.privacy
    model = model_factory()
    params = built.params
    if state is not None and options.resume is not None:
        check_resumable(state, run_dir=options.resume, num_params=params.numel(),
                        rounds=config.run.rounds)
    if config.privacy.mode == "central":
        from confide.privacy.central import CentralDP

        if isinstance(privacy, CentralDP):
            # Central DP noise: in simulation it is seeded from run.seed so runs repeat; here
            # that would let anyone who knows the job file subtract the noise. The seed comes
            # from the OS CSPRNG and is never stored (confide.privacy.mechanisms, "Randomness").
            privacy.seed = secrets.randbits(63)
    if config.secure_aggregation.enabled:
        from confide.server.secagg_transport import DeployedSecureAggregator

        aggregator: Any = DeployedSecureAggregator(config)
    else:
        aggregator = build_aggregator(config)
    job = JobSpec(config_toml=dump_config(config), input_shape=evaluation.input_shape,
                  num_classes=evaluation.num_classes, num_params=built.dim,
                  num_clients=n, dataset_size=evaluation.dataset_size)
    if options.insecure:
        log.warning("--insecure: clients connect WITHOUT TLS; updates and tokens cross the "
                    "network in the clear")
    _check_population(authority, n)
    authority.refresh_crl()

    run_dir = _prepare_run_dir(options, config)  # on resume: the run folder, config updated
    link = SuperLinkProcess(federation=federation, log_path=run_dir / "superlink.log",
                            start_timeout=options.superlink_start_timeout_s)
    gateway: Gateway | None = None
    runtime: SuperLinkClient | None = None
    ok, details = False, "stopped"
    history: list[dict[str, Any]] = []
    with _terminate_on_sigterm():
        try:
            link.start()
            runtime = SuperLinkClient(link)
            grid = runtime.start_run(job.digest)
            delivery = Delivery()
            directory = _EnrolledClients(authority=authority, runtime=runtime, size=n,
                                         delivery=delivery)
            directory.admit()

            def on_enrolled(record: ClientRecord) -> None:
                directory.admit()

            gateway = Gateway(federation=federation, host=options.host, port=options.port,
                              upstream=link.address, insecure=options.insecure,
                              authority=authority, on_enrolled=on_enrolled,
                              delivery=delivery)
            gateway.start()
            address = f"{options.host}:{gateway.bound_port}"
            if on_start is not None:
                on_start(address)
            log.info("coordinator listening on %s (run folder %s)", address, run_dir)
            _wait_for_clients(directory, n, config.cohort.min_clients,
                              options.wait_for_clients_s)

            x_test, y_test = evaluation.x.to(params.dtype), evaluation.y
            eval_model = model_factory()

            def evaluator(flat: torch.Tensor) -> dict[str, float]:
                set_flat_params(eval_model, flat)
                return evaluate_model(eval_model, x_test, y_test)

            executor = GridExecutor(grid=grid, nodes=directory, job=job,
                                    aux_names=strategy.aux_names,
                                    round_timeout=(config.cohort.train_timeout_s
                                                   or options.round_timeout_s),
                                    poll_interval=options.poll_interval_s,
                                    max_poll_interval=options.max_poll_interval_s,
                                    vectors_in_replies=not config.secure_aggregation.enabled,
                                    codec=UpdateCodec.from_config(config),
                                    delivery=delivery)
            if config.secure_aggregation.enabled:
                aggregator.executor = executor
                executor.task_setup = aggregator.setup_requests  # Round 0 with the tasks

            def main(grid_: Any, _context: Any) -> None:
                common: dict[str, Any] = dict(
                    config=config, strategy=strategy, executor=executor, aggregator=aggregator,
                    privacy=privacy, params=params, num_clients=n, client_sizes=[0] * n,
                    evaluator=evaluator, run_dir=run_dir, on_round_end=on_round_end)
                coordinator: Coordinator
                if getattr(strategy, "asynchronous", False):  # FedBuff: work as clients free up
                    coordinator = ArrivalCoordinator(
                        **common, concurrency=config.simulation.concurrency or n,
                        arrival_timeout_s=config.cohort.train_timeout_s
                        or options.round_timeout_s)
                else:
                    coordinator = Coordinator(**common)
                if state is not None:  # the ledger is reconciled with the file in run()
                    coordinator.restore(state)
                    log.info("resuming %s after round %d", run_dir, coordinator.completed_rounds)
                history.extend(coordinator.run())
                set_flat_params(model, coordinator.params)
                tmp = run_dir / ".model.pt.tmp"
                torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
                tmp.replace(run_dir / "model.pt")

            from flwr.app import Context, RecordDict

            build_server_app(main)(grid, Context(run_id=grid.run.run_id, node_id=0,
                                                 node_config={}, state=RecordDict(),
                                                 run_config={}))
            executor.finish()
            ok, details = True, ""
        except KeyboardInterrupt:
            details = "stopped by the operator"
            raise
        except ConfideError as exc:
            details = str(exc)
            raise
        except httpx.HTTPError as exc:
            details = f"the coordinator's Flower runtime failed: {exc}"
            raise ConfideError(f"{details}; see {run_dir / 'superlink.log'}") from None
        finally:
            if runtime is not None:
                runtime.finish_run(ok=ok, details=details)
            if gateway is not None:
                gateway.stop()
            link.stop()  # and removes its folder (confide.server.superlink)
    return run_dir, history


def _check_population(authority: EnrolmentAuthority, n: int) -> None:
    active = authority.registry.active_clients()
    if len(active) > n:
        raise ConfigError(f"{len(active)} clients are enrolled but the job expects "
                          f"data.num_clients = {n}; set data.num_clients = {len(active)} or "
                          "revoke the extra clients")


def _wait_for_clients(directory: _EnrolledClients, n: int, min_clients: int,
                      wait_s: float) -> None:
    """Until all ``n`` clients are enrolled and connected, or ``wait_s`` runs out."""
    deadline = time.monotonic() + wait_s
    connected = 0
    while time.monotonic() < deadline:
        directory.admit()
        connected = directory.connected()
        if connected >= n:
            directory.freeze()
            return
        time.sleep(0.1)
    directory.freeze()
    if connected < min_clients:
        raise RoundFailedError(f"only {connected} of {n} clients connected within {wait_s:g} s "
                               f"(cohort.min_clients = {min_clients}); enrol and start the "
                               "clients ('confide client start') and try again")
    log.warning("%d of %d clients connected; starting without the others", connected, n)

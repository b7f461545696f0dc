"""The coordinator's round loop (DESIGN.md, "Data flow of one round").

:meth:`Coordinator.run_round` is the whole FL round on one screen, in DESIGN.md's numbered
steps. Everything runtime-specific sits behind the executor (how client tasks reach clients:
in process, vectorised on a GPU, or over Flower's Grid) and the aggregator (in the clear or
by secure aggregation), so simulation and deployment share this code.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from confide.config import Config
from confide.exceptions import ConfigError, RoundFailedError
from confide.privacy.base import RoundPrivacy
from confide.round import (
    Aggregate,
    Aggregator,
    ClientTask,
    Executor,
    ResultBatch,
    TrainSettings,
    accept_finite_with_sums,
)
from confide.seeding import derive_rng, derive_seeds
from confide.server.checkpoint import save_checkpoint
from confide.server.history import plot_history, write_history, write_timings
from confide.server.sampling import sample_cohort
from confide.strategies.base import Strategy

__all__ = ["Coordinator", "RoundRecord"]

log = logging.getLogger("confide")

RoundRecord = dict[str, Any]
Evaluator = Callable[[torch.Tensor], dict[str, float]]


@dataclass
class Coordinator:
    """Runs FedAvg-style rounds: sample, configure, train, aggregate, update, account, record."""

    config: Config
    strategy: Strategy
    executor: Executor
    aggregator: Aggregator
    privacy: RoundPrivacy
    params: torch.Tensor
    num_clients: int
    client_sizes: list[int]
    evaluator: Evaluator | None = None
    run_dir: Path | None = None
    on_round_end: Callable[[RoundRecord], None] | None = None
    history: list[RoundRecord] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    client_states: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    completed_rounds: int = 0
    #: simulated client durations (confide.simulations.latency): the virtual clock
    latency: Any = None
    #: simulated wall-clock seconds since the run began (with ``latency``)
    virtual_time: float = 0.0
    #: why the current round's earlier attempts failed (recorded in its history row)
    _retry_reasons: list[str] = field(default_factory=list)
    #: extra columns of the next history row (set by a schedule, e.g. mean staleness)
    _row_extras: dict[str, Any] = field(default_factory=dict)
    #: the kept batch of the finite check and its train-loss sums (host floats), for _record
    _kept_loss: tuple[ResultBatch, float, float] | None = None

    def __post_init__(self) -> None:
        cfg = self.config
        # The global model lives where the cohort is trained, so the round's tensors never
        # leave that device (DESIGN.md, "The cohort is a batch").
        device = getattr(self.executor, "device", None)
        if device is not None:
            self.params = self.params.to(device)
        # Refuses strategies that need individual updates under secure aggregation.
        self.strategy.check_compatible(secure_aggregation=cfg.secure_aggregation.enabled)
        if cfg.simulation.dropout_stage not in self.aggregator.dropout_stages:
            raise ConfigError(
                f"simulation.dropout_stage = {cfg.simulation.dropout_stage!r} is not available "
                f"here; choose one of: {', '.join(self.aggregator.dropout_stages)}"
            )

    # ------------------------------------------------------------------ the round
    def run_round(self, rnd: int, *, attempt: int = 0) -> RoundRecord:
        """One round, DESIGN.md steps 1-9 (``attempt`` > 0: a retry with a fresh cohort)."""
        cfg, t0 = self.config, time.perf_counter()
        expected = cfg.cohort_size()
        self.privacy.check_budget(rnd, expected)

        # 1. Sample the cohort (Poisson when the accountant needs it) from the live clients,
        # seeded by round (and attempt).
        live = self.executor.live_clients()
        cohort = sample_cohort(num_clients=self.num_clients, size=expected,
                               method=self.privacy.sampling or cfg.cohort.sampling,
                               seed=cfg.run.seed, server_round=rnd, attempt=attempt,
                               available=None if live is None else np.asarray(live))
        cohort = self.privacy.admit_cohort(cohort, rnd)  # e.g. DP-FTRL's participation rule

        # 2. Configure: the instructions every sampled client gets.
        instructions = self.strategy.configure_round(rnd)
        tasks = self._tasks(cohort, rnd, instructions)
        self._inject_dropouts(tasks, rnd, attempt)

        # 3.+4. Local training and the client privacy pipeline, on each client's device;
        # the cohort's results come back as one batch on the training device.
        t_train = time.perf_counter()
        outcome = self.executor.run_cohort(tasks)
        t_train = time.perf_counter() - t_train
        reduced = outcome.reduced.count if outcome.reduced is not None else 0
        batch = self._accept(outcome.batch, outcome.failures, rnd, len(cohort), reduced)
        if self.latency is not None:  # a synchronous round waits for its slowest client
            self.virtual_time += self._cohort_seconds(cohort, rnd)
        return self.complete_round(rnd, len(cohort), batch, outcome.reduced, t0=t0,
                                   train_s=t_train)

    def complete_round(self, rnd: int, num_sampled: int, batch: ResultBatch,
                       reduced: Aggregate | None = None, *, t0: float, train_s: float
                       ) -> RoundRecord:
        """Steps 5-9 on the clients' result batch (the synchronous round above, or a
        buffer of asynchronous arrivals: :mod:`confide.server.buffered`).
        """
        self.privacy.observe_results(batch, rnd)  # e.g. each client's DP-SGD privacy event

        # 5. Aggregate: the coordinator learns only the sum (secure aggregation when enabled).
        aggregate: Aggregate = self.aggregator.aggregate(
            batch, server_round=rnd, weighting=self.privacy.weighting)
        if reduced is not None:  # rows summed on other ranks (plain sums only)
            aggregate = aggregate + reduced
        self._require_quorum(aggregate.count, rnd, num_sampled)
        if self.strategy.requires_individual_updates:  # robust aggregators (never with SecAgg)
            aggregate.robust_update = self.strategy.aggregate_individual(
                batch.updates, batch.weights(self.privacy.weighting))

        # 6. Server privacy: central Gaussian noise or distributed-DP decoding.
        aggregate = self.privacy.process_aggregate(aggregate, rnd)

        # 7. Server update: the strategy's optimizer on the mean update.
        self.params = self.strategy.apply(
            self.params, aggregate.mean_update(), aggregate.mean_aux(), rnd,
            num_clients=aggregate.count, total_clients=self.num_clients)
        self._keep_client_states(batch, aggregate)

        # 8. Account: the ledger records epsilon *before* the model is released or saved.
        epsilon = self.privacy.account(rnd, self.run_dir)

        # 9. Evaluate, record, checkpoint.
        record = self._record(rnd, num_sampled, batch, aggregate, epsilon)
        self.completed_rounds = rnd
        self.timings.append({"round": rnd, "train_s": round(train_s, 4),
                             "round_s": round(time.perf_counter() - t0, 4)})
        self._persist(final=rnd == self.config.run.rounds)
        return record

    # ------------------------------------------------------------------ the loop
    def run(self, *, stop_after: int | None = None) -> list[RoundRecord]:
        """Run rounds ``completed_rounds+1 .. run.rounds`` (or until ``stop_after``)."""
        if self.completed_rounds == 0:
            self.strategy.initialize(self.params)
        last = self.config.run.rounds if stop_after is None else min(stop_after,
                                                                      self.config.run.rounds)
        try:
            if self.run_dir is not None:
                self.privacy.attach_run_dir(self.run_dir)  # the ledger, reconciled on resume
            for rnd in range(self.completed_rounds + 1, last + 1):
                record = self._run_round_with_retries(rnd)
                if self.on_round_end is not None:
                    self.on_round_end(record)
        finally:
            self.executor.close()
        if self.run_dir is not None and self.history:
            plot_history(self.run_dir, self.history)
        return self.history

    def _run_round_with_retries(self, rnd: int) -> RoundRecord:
        """A round that fails (quorum lost, too few clients for secure aggregation) is run
        again with a fresh cohort, up to ``cohort.max_retries`` times; then the job stops.

        A failed attempt releases nothing (no aggregate leaves the coordinator, no model is
        updated or saved), so it spends no privacy; the ledger records the attempt that
        completes. Its reason is logged and kept in the round's history row.
        """
        self._retry_reasons = []
        attempt = 0
        while True:
            try:
                return self.run_round(rnd, attempt=attempt)
            except RoundFailedError as exc:
                self._retry_reasons.append(str(exc))
                live = self.executor.live_clients()
                alive = self.num_clients if live is None else len(live)
                if attempt >= self.config.cohort.max_retries or \
                        alive < self.config.cohort.min_clients:
                    extra = f" (after {attempt} retries)" if attempt else ""
                    raise RoundFailedError(f"{exc}{extra}") from None
                attempt += 1
                log.info("round %d failed (%s); retrying with a fresh cohort (%d of %d)",
                            rnd, exc, attempt, self.config.cohort.max_retries)

    # ------------------------------------------------------------------ helpers
    def _tasks(self, cohort: np.ndarray, rnd: int, instructions: Any) -> list[ClientTask]:
        """The cohort's tasks: one settings object, one seed per client (vectorised)."""
        c = self.config.client
        settings = TrainSettings(epochs=c.epochs, batch_size=c.batch_size, lr=c.lr,
                                 momentum=c.momentum, weight_decay=c.weight_decay,
                                 optimizer=c.optimizer)
        seeds = derive_seeds(self.config.run.seed, "client", rnd, keys=cohort).tolist()
        states = self.client_states
        return [ClientTask(client_id=int(cid), server_round=rnd, global_params=self.params,
                           instructions=instructions, settings=settings, seed=seed,
                           client_state=states.get(int(cid), {}))
                for cid, seed in zip(cohort.tolist(), seeds, strict=True)]

    def _task(self, cid: int, rnd: int, instructions: Any) -> ClientTask:
        """One client's task (as :meth:`_tasks` makes it)."""
        return self._tasks(np.array([cid]), rnd, instructions)[0]

    def _cohort_seconds(self, cohort: np.ndarray, rnd: int) -> float:
        """Virtual seconds until the slowest of ``cohort`` has sent its update."""
        if not len(cohort):
            return 0.0
        nbytes = 4 * int(self.params.numel())  # float32 weights down, update up
        epochs = self.config.client.epochs
        d = self.latency.durations(cohort, rnd, num_samples=[
            epochs * self.client_sizes[int(c)] for c in cohort], bytes_up=nbytes,
            bytes_down=nbytes)
        return float(d.total.max())

    def _inject_dropouts(self, tasks: list[ClientTask], rnd: int, attempt: int = 0) -> None:
        """Fault injection: ``dropout_rate`` of the sampled clients leave mid-training."""
        sim = self.config.simulation
        if sim.dropout_rate <= 0 or sim.dropout_stage != "training" or not tasks:
            return
        rng = (derive_rng(self.config.run.seed, "dropout", rnd) if attempt == 0
               else derive_rng(self.config.run.seed, "dropout", rnd, "retry", attempt))
        n_drop = int(round(sim.dropout_rate * len(tasks)))
        for i in rng.choice(len(tasks), size=n_drop, replace=False):
            t = tasks[int(i)]
            steps = self.config.client.epochs * math.ceil(
                self.client_sizes[t.client_id] / self.config.client.batch_size)
            t.drop_after_steps = steps // 2

    def _accept(self, batch: ResultBatch, failures: dict[int, str], rnd: int,
                sampled: int, reduced: int = 0) -> ResultBatch:
        """Keep results with finite updates; a NaN/inf update is rejected, not averaged."""
        for cid, why in failures.items():
            log.info("round %d: client %d dropped (%s)", rnd, cid, why)
        # the kept rows' example-weighted train-loss sums come back with the finite mask, so
        # the round's record needs no second host sync (_record)
        columns: tuple[torch.Tensor, ...] = ()
        if len(batch) and "train_loss" in batch.metrics:
            w = batch.num_examples
            columns = (w * batch.metrics["train_loss"], w)
        batch, rejected, sums = accept_finite_with_sums(batch, columns)
        self._kept_loss = (batch, sums[0], sums[1]) if columns else None
        for cid in rejected:
            log.warning("round %d: client %d sent a non-finite update or aux vector; it is "
                        "excluded", rnd, cid)
        self._require_quorum(len(batch) + reduced, rnd, sampled)
        return batch

    def _keep_client_states(self, batch: ResultBatch, aggregate: Aggregate) -> None:
        """Per-client state (SCAFFOLD's c_i) of the clients whose updates were summed."""
        if not batch.new_state:
            return
        summed = set(aggregate.client_ids)
        for row, cid in enumerate(batch.client_ids):
            if cid in summed:
                # Merged, so a stage's state (compression's residual) and a strategy's own
                # (c_i) both survive; cloned, so a row does not keep the whole batch alive.
                self.client_states[cid] = {**self.client_states.get(cid, {}),
                                           **{k: v[row].clone()
                                              for k, v in batch.new_state.items()}}

    def _require_quorum(self, reported: int, rnd: int, sampled: int) -> None:
        need = self.config.cohort.min_clients
        if reported < need:
            raise RoundFailedError(
                f"round {rnd} failed: {reported} of {sampled} sampled clients reported, fewer "
                f"than cohort.min_clients = {need}; the last checkpoint (round "
                f"{self.completed_rounds}) is intact"
            )

    def _record(self, rnd: int, num_sampled: int, batch: ResultBatch,
                aggregate: Aggregate, epsilon: float | None) -> RoundRecord:
        summed = set(aggregate.client_ids)
        used = [i for i, cid in enumerate(batch.client_ids) if cid in summed]
        # clients summed on other ranks report their example-weighted loss sums
        loss_sum = aggregate.metric_sums.get("train_loss")
        examples = aggregate.metric_sums.get("num_examples")
        kept, self._kept_loss = self._kept_loss, None
        if used and kept is not None and kept[0] is batch and len(used) == len(batch):
            # every kept row was summed: the sums the finite check brought to the host
            own_loss, own_examples = (torch.tensor(v, dtype=torch.float64) for v in kept[1:])
            loss_sum = own_loss if loss_sum is None else own_loss + loss_sum.cpu()
            examples = own_examples if examples is None else own_examples + examples.cpu()
        elif used and "train_loss" in batch.metrics:
            part = batch.select(used)
            w = part.num_examples
            own_loss, own_examples = (w * part.metrics["train_loss"]).sum(), w.sum()
            loss_sum = own_loss if loss_sum is None else own_loss + loss_sum.to(own_loss)
            examples = own_examples if examples is None else own_examples + examples.to(
                own_examples)
        train_loss = 0.0
        if loss_sum is not None and examples is not None:
            train_loss = float(loss_sum / examples.clamp_min(1.0))
        record: RoundRecord = {
            "round": rnd,
            "num_sampled": num_sampled,
            "num_clients": aggregate.count,
            "num_dropped": num_sampled - aggregate.count,
            "train_loss": train_loss,
            "test_accuracy": None,
            "test_loss": None,
            "epsilon": epsilon,
            "virtual_time_s": (None if self.latency is None
                               else round(self.virtual_time, 6)),
            **self._wire_bytes(rnd, num_sampled, batch),
            "retries": len(self._retry_reasons),
            "retry_reasons": " | ".join(self._retry_reasons),
        }
        record.update(self._row_extras)
        record.update(self.privacy.round_metrics())
        if self.evaluator is not None and (rnd % self.config.run.eval_every == 0
                                           or rnd == self.config.run.rounds):
            metrics = self.evaluator(self.params)
            record["test_accuracy"] = metrics["accuracy"]
            record["test_loss"] = metrics["loss"]
        self.history.append(record)
        return record

    def _wire_bytes(self, rnd: int, num_sampled: int, batch: ResultBatch) -> dict[str, int]:
        """``bytes_up`` / ``bytes_down`` of the round, summed over its clients.

        Down: the float32 global weights to every sampled client. Up: each reporting client's
        payload (``info["bytes_up"]``, set by the compression stage; else its float32 update
        and aux vectors); under secure aggregation the protocol's own messages both ways
        (``RoundReport.bytes_sent`` / ``bytes_received``), which carry the masked words.
        An executor that sends real messages (the deployment's Grid) counts them itself
        (``take_wire_bytes``: every message's records since the last record, so under
        FedBuff the tasks sent since the previous buffer).
        """
        take = getattr(self.executor, "take_wire_bytes", None)
        if callable(take):
            up_bytes, down_bytes = take()
            return {"bytes_up": int(up_bytes), "bytes_down": int(down_bytes)}
        down = 4 * int(self.params.numel()) * num_sampled
        report = getattr(self.aggregator, "last_report", None)
        if report is not None and getattr(report, "server_round", None) == rnd and \
                report.bytes_sent:
            return {"bytes_up": int(sum(report.bytes_sent.values())),
                    "bytes_down": down + int(sum(report.bytes_received.values()))}
        aux = 4 * sum(int(v.shape[1]) for v in batch.aux.values())
        plain = 4 * batch.dim  # float32 update of a client whose stages report no size
        up = len(batch.info) * aux + sum(int(info["bytes_up"]) if "bytes_up" in info else plain
                                         for info in batch.info)
        return {"bytes_up": up, "bytes_down": down}

    def checkpoint_state(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly."""
        return {
            "round": self.completed_rounds,
            "params": self.params.detach().cpu(),
            "strategy": self.strategy.state_dict(),
            "client_states": {int(k): {n: t.detach().cpu() for n, t in v.items()}
                              for k, v in self.client_states.items()},
            "history": self.history,
            "timings": self.timings,
            "virtual_time": self.virtual_time,
            "privacy": self.privacy.state_dict(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint written by :meth:`checkpoint_state`."""
        self.completed_rounds = int(state["round"])
        self.params = state["params"].to(dtype=self.params.dtype, device=self.params.device)
        self.strategy.load_state_dict(state["strategy"])
        self.client_states = {int(k): dict(v) for k, v in state["client_states"].items()}
        self.history = list(state["history"])
        self.timings = list(state.get("timings", []))
        self.virtual_time = float(state.get("virtual_time", 0.0))
        self.privacy.load_state_dict(state["privacy"])

    def _persist(self, *, final: bool) -> None:
        if self.run_dir is None:
            return
        write_history(self.run_dir, self.history)
        write_timings(self.run_dir, self.timings)
        save_checkpoint(self.run_dir, self.checkpoint_state())
        if final or self.completed_rounds % 10 == 0:
            plot_history(self.run_dir, self.history)

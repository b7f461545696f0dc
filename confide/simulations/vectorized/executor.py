"""The ``vectorized`` executor: plans a round, trains it with the cohort trainer, returns a batch.

The cohort's results come back as one :class:`~confide.round.ResultBatch` on the training
device (no per-client host work, no host synchronisation inside the round: the coordinator
makes the round's one sync in ``accept_finite``). Dropped clients (fault injection) are in
``failures`` with ``LocalTrainer``'s message; clients whose optimizer has no vectorised rule
train sequentially and join the batch.

Several ranks (``simulation.world_size > 1``, see :mod:`.ranks`) exchange sums when plain sums
are all the round needs, and rows otherwise:

* rows: a strategy that combines individual updates (``requires_individual_updates``),
  secure aggregation (the protocol runs over every client's input on the coordinator), a
  strategy with client-side finalisation (SCAFFOLD's per-client control variates must come
  back), DP-SGD (each client's privacy event is charged to its own account), or a client
  pipeline that cannot be pickled for the ranks;
* sums: everything else, central DP with adaptive clipping included (its report is a column
  of the update, so it is summed with it). Rank 0 returns its own rows as the batch and the
  other ranks' all-reduced sums as ``CohortOutcome.reduced``; reading their count is the
  round's one host read on rank 0 besides the coordinator's finite check.

``stats[-1]`` reports the round's clients, wall and device seconds, and with several ranks
``rank_bytes`` (weights, sums or rows, corrections), ``task_bytes`` (the task table) and
``rank_exchange_s``.
"""

from __future__ import annotations

import copy
import logging
import pickle  # noqa: S403 - to ship this run's own pipeline to its own ranks
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from confide.client.trainer import TrainSettings
from confide.exceptions import ConfigError, DeviceError
from confide.privacy.base import SampleLevelDP
from confide.round import Aggregate, ClientTask, CohortOutcome, ResultBatch
from confide.simulations.executors import (
    SequentialExecutor,
    SimulationContext,
    SimulationExecutor,
)
from confide.simulations.vectorized.conv import (
    conv_lowering_costs,
    lower_convolutions,
    lowerable,
)
from confide.simulations.vectorized.device import DeviceClock
from confide.simulations.vectorized.eligibility import probe_model, vectorization_blocker
from confide.simulations.vectorized.layout import ModelLayout, model_layout
from confide.simulations.vectorized.options import DROP_MESSAGE, OPTIMIZERS, VectorizedOptions
from confide.simulations.vectorized.ranks import ExchangeStats, FinishSpec, RankPool
from confide.simulations.vectorized.results import finish_rows
from confide.simulations.vectorized.schedule import (
    Job,
    dp_sgd_steps_per_epoch,
    num_local_steps,
    shard_jobs,
)
from confide.simulations.vectorized.trainer import CohortTrainer, TrainOutput
from confide.strategies.base import Strategy

__all__ = ["VectorizedExecutor"]

log = logging.getLogger("confide")


@dataclass
class _Plan:
    """Jobs of one round that share settings and global weights."""

    settings: TrainSettings
    global_params: torch.Tensor
    jobs: list[Job] = field(default_factory=list)
    corrections: dict[int, torch.Tensor] = field(default_factory=dict)


def _finalises_on_client(strategy: Strategy) -> bool:
    cls = type(strategy)
    return (cls.client_finalize is not Strategy.client_finalize
            or cls.client_finalize_batch is not Strategy.client_finalize_batch)


class VectorizedExecutor(SimulationExecutor):
    """The cohort trained at once with ``torch.func`` on one device, or several ranks."""

    name = "vectorized"

    def __init__(self, context: SimulationContext) -> None:
        super().__init__(context)
        self.options = VectorizedOptions.from_config(context.config)
        self._sequential = SequentialExecutor(context)
        self._pool: RankPool | None = None
        self._unsupported_logged: set[str] = set()
        self.fallback_reason: str | None = None
        self.trainer: CohortTrainer | None = None
        self._stats: list[dict[str, float]] = []
        self._unread: list[tuple[dict[str, float], list[DeviceClock], ExchangeStats]] = []
        model = context.model_factory().to(context.device)
        #: the clients' DP-SGD, as the privacy layer states it (None: plain training)
        self.dp_sgd: SampleLevelDP | None = None
        try:
            if context.privacy is not None:
                self.dp_sgd = context.privacy.sample_level_dp()
        except ConfigError as exc:
            self.fallback_reason = str(exc)
        if self.fallback_reason is None:
            self.fallback_reason = vectorization_blocker(model, self._sequential.trainer,
                                                         dp_sgd=self.dp_sgd is not None)
        if self.fallback_reason is None:
            self.fallback_reason = self._build_trainer(model)
        if self.fallback_reason is not None:
            log.warning("vectorized executor: falling back to sequential training because %s",
                        self.fallback_reason)
        #: with several ranks: why rows (not sums) travel between them, or None
        self.rows_reason: str | None = None
        if self.options.world_size > 1 and self.fallback_reason is None:
            if context.device.type == "cuda" and torch.cuda.device_count() < \
                    self.options.world_size + (context.device.index or 0):
                raise DeviceError(f"simulation.world_size = {self.options.world_size} needs "
                                  f"that many GPUs; {torch.cuda.device_count()} are visible")
            self.rows_reason = self._rows_reason()
            if self.rows_reason is not None:
                log.info("vectorized: the ranks send their clients' rows to rank 0 because %s",
                         self.rows_reason)

    def _rows_reason(self) -> str | None:
        """Why ranks must send rows rather than sums (module docstring), or None."""
        ctx = self.context
        strategy = ctx.strategy
        if strategy.requires_individual_updates:
            return f"strategy {strategy.name!r} combines individual updates"
        secagg = getattr(getattr(ctx.config, "secure_aggregation", None), "enabled", False)
        if secagg:
            return "secure aggregation runs its protocol over every client's input"
        if _finalises_on_client(strategy):
            return f"strategy {strategy.name!r} keeps per-client state"
        if self.dp_sgd is not None:
            return "DP-SGD charges each client's privacy event to its own account"
        try:
            pickle.dumps(ctx.pipeline)
        except Exception as exc:
            return f"the client pipeline cannot be sent to the ranks ({type(exc).__name__})"
        return None

    @property
    def stats(self) -> list[dict[str, float]]:
        """Per round: clients trained, executor wall seconds, device training seconds (rank
        0), and with several ranks the bytes and seconds of their exchange. Device times are
        read here, after the round (reading them waits for the device).
        """
        for entry, clocks, exchange in self._unread:
            entry["compute_s"] = sum(c.seconds() for c in clocks)
            if self.options.world_size > 1:
                entry["rank_exchange_s"] = exchange.seconds()
        self._unread.clear()
        return self._stats

    def _build_trainer(self, model: nn.Module) -> str | None:
        ctx = self.context
        sample = ctx.x_train[:2]
        unfolded = self._choose_lowering(model, sample)
        fmodel = lower_convolutions(model, unfolded) if unfolded else model
        unused, problem = probe_model(copy.deepcopy(model), fmodel, ctx.x_train, ctx.y_train)
        if problem is not None:
            return problem
        if self.dp_sgd is not None and unused:
            return (f"parameters {sorted(unused)} get no gradient, which Opacus's DP-SGD does "
                    "not accept")
        self.layout: ModelLayout = model_layout(model, sample, unused, unfolded)
        self.trainer = CohortTrainer(model=model, x_train=ctx.x_train, y_train=ctx.y_train,
                                     partitions=ctx.partitions, device=ctx.device,
                                     layout=self.layout, options=self.options,
                                     dp_sgd=self.dp_sgd)
        return None

    def _choose_lowering(self, model: nn.Module, sample: torch.Tensor) -> list[str]:
        names = [n for n, m in model.named_modules() if lowerable(m)]
        mode = self.options.conv_lowering
        if not names or mode == "grouped":
            return []
        if mode == "unfold":
            return names
        if self.context.device.type != "cuda":
            return []  # auto on the CPU: vmap's grouped convolution
        cfg = self.context.config
        batch = cfg.client.batch_size if cfg is not None else 32
        clients = max(1, min(64, cfg.cohort_size() if cfg is not None else 64))
        chosen = []
        try:
            for row in conv_lowering_costs(model, sample, clients=clients, batch=batch,
                                           mixed_precision=self.options.mixed_precision):
                faster = row["unfold_s"] < row["grouped_s"]
                log.info("vectorized: conv %s under vmap (%d clients x %d): grouped %.2f ms, "
                         "unfold+bmm %.2f ms -> %s", row["layer"], clients, batch,
                         1e3 * row["grouped_s"], 1e3 * row["unfold_s"],
                         "unfold" if faster else "grouped")
                if faster:
                    chosen.append(row["layer"])
        except Exception as exc:  # timing is advisory: keep vmap's own conv
            log.info("vectorized: conv lowering not timed (%s); using grouped convolution",
                     type(exc).__name__)
            return []
        return chosen

    # ------------------------------------------------------------------ a round
    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:
        """Train the cohort at once; its results stay on the device as one batch."""
        if self.fallback_reason is not None or self.trainer is None:
            return self._sequential.run_cohort(tasks)
        start = time.perf_counter()
        plans, failures, leftovers = self._plan(tasks)
        batches: list[ResultBatch] = []
        reduced: Aggregate | None = None
        clocks: list[DeviceClock] = []
        exchange = ExchangeStats()
        for plan in plans:
            batch, sums = self._run_plan(plan, tasks, exchange)
            batches.append(batch)
            if self.trainer.last_clock is not None:
                clocks.append(self.trainer.last_clock)
            if sums is not None:
                reduced = sums if reduced is None else reduced + sums
        if leftovers:
            seq = self._sequential.run_cohort([tasks[i] for i in leftovers])
            batches.append(seq.batch.to(self.context.device))
            failures.update(seq.failures)
        if batches:
            batch = ResultBatch.concat(batches)
        else:
            batch = ResultBatch.empty(self.context.dim, device=self.context.device,
                                      dtype=self.trainer.dtype)
        entry = {"clients": float(sum(len(p.jobs) for p in plans)),
                 "wall_s": time.perf_counter() - start, "compute_s": 0.0}
        if self.options.world_size > 1:
            entry.update({"rank_bytes": float(exchange.rank_bytes),
                          "task_bytes": float(exchange.task_bytes), "rank_exchange_s": 0.0})
        self._stats.append(entry)
        self._unread.append((entry, clocks, exchange))
        return CohortOutcome(batch, failures, reduced)

    def _plan(self, tasks: Sequence[ClientTask]
              ) -> tuple[list[_Plan], dict[int, str], list[int]]:
        """Group the tasks by settings and global weights; find dropouts and leftovers."""
        ctx = self.context
        plans: dict[tuple[int, int], _Plan] = {}
        failures: dict[int, str] = {}
        leftovers: list[int] = []
        # the cohort's tasks share a settings object: hash each distinct object once
        canon: dict[int, int] = {}  # id(settings) -> id of the first equal settings
        by_value: dict[TrainSettings, int] = {}
        for slot, task in enumerate(tasks):
            n = len(ctx.partitions[task.client_id])
            steps = num_local_steps(n, task.settings)
            expected_batch_size = 0
            if self.dp_sgd is not None:
                per_epoch = dp_sgd_steps_per_epoch(n, task.settings)
                steps = task.settings.epochs * per_epoch
                expected_batch_size = int(n * (1 / per_epoch))  # Opacus make_private
            if task.drop_after_steps is not None and task.drop_after_steps < steps:
                # LocalTrainer.fit raises ClientDropped before step ``drop_after_steps``
                failures[task.client_id] = DROP_MESSAGE
                continue
            if task.settings.optimizer not in OPTIMIZERS:
                self._log_once(f"optimizer {task.settings.optimizer!r} has no vectorised "
                               "update rule; those clients train sequentially")
                leftovers.append(slot)
                continue
            rule = ctx.strategy.client_rule(task.instructions, task.client_state)
            sid = canon.get(id(task.settings))
            if sid is None:
                sid = canon[id(task.settings)] = by_value.setdefault(task.settings,
                                                                     id(task.settings))
            key = (sid, id(task.global_params))
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = _Plan(task.settings, task.global_params)
            correction = rule.gradient_correction
            plan.jobs.append(Job(slot=slot, client_id=task.client_id, seed=task.seed,
                                 num_samples=n, num_steps=steps,
                                 proximal_mu=float(rule.proximal_mu),
                                 has_correction=correction is not None,
                                 expected_batch_size=expected_batch_size))
            if correction is not None:
                plan.corrections[slot] = correction
        return list(plans.values()), failures, leftovers

    def _log_once(self, message: str) -> None:
        if message not in self._unsupported_logged:
            self._unsupported_logged.add(message)
            log.warning("vectorized executor: %s", message)

    def _corrections(self, jobs: Sequence[Job], plan: _Plan) -> torch.Tensor | None:
        """SCAFFOLD's ``c - c_i`` rows of ``jobs``, stacked on the device (zeros for none)."""
        if not any(j.has_correction for j in jobs):
            return None
        dev, dtype = self.context.device, self.trainer.dtype  # type: ignore[union-attr]
        zeros = torch.zeros(self.layout.size, dtype=dtype, device=dev)
        return torch.stack([plan.corrections[j.slot].reshape(-1).to(dev, dtype)
                            if j.has_correction else zeros for j in jobs])

    def _finish(self, rows: Sequence[Job], out: TrainOutput, plan: _Plan,
                tasks: Sequence[ClientTask]) -> ResultBatch:
        return finish_rows([tasks[j.slot] for j in rows], rows, out.updates, out.loss_sum,
                           out.correct, settings=plan.settings, strategy=self.context.strategy,
                           pipeline=self.context.pipeline, dp_sgd=self.dp_sgd)

    def _run_plan(self, plan: _Plan, tasks: Sequence[ClientTask], exchange: ExchangeStats
                  ) -> tuple[ResultBatch, Aggregate | None]:
        """Train one plan: its batch, and with several ranks the other ranks' sums."""
        trainer = self.trainer
        if trainer is None:  # pragma: no cover - run_cohort checks first
            raise RuntimeError("vectorized executor has no trainer")
        world = self.options.world_size
        if world <= 1:
            out = trainer.train(plan.jobs, plan.settings, plan.global_params,
                                self._corrections(plan.jobs, plan))
            return self._finish([plan.jobs[j] for j in out.order], out, plan, tasks), None
        if self._pool is None:
            self._pool = RankPool(world_size=world, device=self.context.device,
                                  model=self.context.model_factory(),
                                  x_train=self.context.x_train, y_train=self.context.y_train,
                                  partitions=self.context.partitions, layout=self.layout,
                                  options=self.options, dp_sgd=self.dp_sgd)
        shards = shard_jobs(plan.jobs, world)
        server_round = tasks[shards[0][0].slot].server_round if shards[0] else 0
        finish = None
        if self.rows_reason is None:
            privacy = self.context.privacy
            finish = FinishSpec(server_round=server_round,
                                weighting=privacy.weighting if privacy is not None
                                else "examples",
                                pipeline=pickle.dumps(self.context.pipeline))
        self._pool.start_round(shards, plan.settings, plan.global_params,
                               [None, *(self._corrections(s, plan) for s in shards[1:])],
                               finish, exchange)
        try:
            own = trainer.train(shards[0], plan.settings, plan.global_params,
                                self._corrections(shards[0], plan))
            own_rows = [shards[0][j] for j in own.order]
            batch = self._finish(own_rows, own, plan, tasks) if finish is not None else None
        except Exception:
            self._pool.abandon_round(sums=finish is not None, shards=shards,
                                     size=self.layout.size, dtype=trainer.dtype)
            raise
        if batch is not None:  # sums: rank 0's rows stay its batch, the others' are summed
            return batch, self._pool.reduce_sums(batch.dim, batch.updates.dtype, exchange)
        others = self._pool.gather_rows(shards, self.layout.size, trainer.dtype, exchange)
        rows = own_rows + [s[j] for s, o in zip(shards[1:], others, strict=True)
                           for j in o.order]
        outs = [own, *others]
        merged = TrainOutput(torch.cat([o.updates for o in outs]), list(range(len(rows))),
                             torch.cat([o.loss_sum for o in outs]),
                             torch.cat([o.correct for o in outs]))
        return self._finish(rows, merged, plan, tasks), None

    def close(self) -> None:  # noqa: D102
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.trainer is not None:
            self.trainer._static = None  # a cached CUDA graph and its buffers
        self._sequential.close()

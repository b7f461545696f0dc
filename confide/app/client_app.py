"""Confide's Flower ClientApp: runs :func:`confide.client.run_client_task` on local data.

The same ClientApp serves deployment (in process, driven by :mod:`confide.client.node`) and
simulation on Flower's engine (in Ray actors). A ``train`` message carries the task and the
job (:mod:`confide.client.messages`); the client builds the job's strategy, privacy stages
and trainer once per job, trains on its own data and replies with its processed update.

Extra protocol stages (secure aggregation's key exchange, masked input, unmasking) register
a handler with :func:`register_client_stage`; a ``query.<stage>`` message calls it with the
message's records and the client's :class:`ClientSession`, which holds the last training
result, so a masked-input stage can mask an update that never left the client in the clear.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from confide.app.job import build_job
from confide.client.compression import RESIDUAL_KEY, CompressionStage
from confide.client.data import ClientDataSource
from confide.client.messages import JobSpec, decode_task, encode_result
from confide.client.pipeline import ClientPipeline
from confide.client.round import ClientResult, ClientTask, run_client_task
from confide.client.session import (
    _STAGES,
    ERROR_DROPPED,
    ERROR_REFUSED,
    ClientSession,
    StageHandler,
    client_stages,
    register_client_stage,
)
from confide.client.trainer import LocalTrainer
from confide.config import Config, validate_config
from confide.exceptions import ClientDropped, ConfideError, ConfigError, ModelError
from confide.models import available_models
from confide.privacy.secagg.flower_stage import STAGE, handle_secagg_stage

__all__ = [
    "ClientSession",
    "TaskRunner",
    "build_client_app",
    "register_client_stage",
    "client_stages",
    "ERROR_DROPPED",
    "ERROR_REFUSED",
]

log = logging.getLogger("confide")

#: privacy modes whose noise is drawn on the client from the task's seed
_CLIENT_NOISE_MODES = ("dp-sgd", "distributed")


@dataclass
class _BuiltJob:
    config: Config
    strategy: Any
    pipeline: ClientPipeline
    trainer: LocalTrainer
    device: torch.device
    weighting: str


class TaskRunner:
    """Builds the job's client side once and runs tasks on this client's data."""

    def __init__(self, source: ClientDataSource, *, device: str | None = None,
                 allowed_model_factories: tuple[str, ...] | None = (),
                 secret_noise_seeds: bool = True, local_secure_aggregation: bool = True,
                 local_client_state: bool = True) -> None:
        self.source = source
        self.device_spec = device
        #: DP-SGD noise from a seed only this client knows (deployment); simulation keeps
        #: the task's seed so runs repeat
        self.secret_noise_seeds = secret_noise_seeds
        #: with secure aggregation on, keep the update here and answer the SecAgg stages
        #: (deployment); simulation's in-process aggregator needs the update instead
        self.local_secure_aggregation = local_secure_aggregation
        #: keep compression's error-feedback residual here between rounds (deployment): the
        #: residual is what this client did not send, and sending it would undo compression
        #: (and show the coordinator the dense update); simulation keeps it with the
        #: coordinator, in its checkpoint
        self.local_client_state = local_client_state
        #: ``module:factory`` models this client agrees to import; None allows any (simulation)
        self.allowed_model_factories = allowed_model_factories
        self._built: dict[str, _BuiltJob] = {}
        self._data: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.sessions: dict[int, ClientSession] = {}

    def session(self, client_id: int) -> ClientSession:
        """The session of ``client_id`` (a deployed node has exactly one)."""
        return self.sessions.setdefault(client_id, ClientSession(client_id=client_id))

    def _build(self, job: JobSpec) -> _BuiltJob:
        built = self._built.get(job.digest)
        if built is not None:
            return built
        from confide.devices import resolve_device

        try:
            config = validate_config(tomllib.loads(job.config_toml))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"the coordinator sent an unreadable job config ({exc})") from None
        name = config.model.name
        if name not in available_models() and self.allowed_model_factories is not None \
                and name not in self.allowed_model_factories:
            raise ModelError(f"the job asks for model {name!r}, which this client does not "
                             "allow; start the client with --allow-model " + name)
        device = resolve_device(self.device_spec or config.client.device)
        spec = build_job(config, input_shape=job.input_shape, num_classes=job.num_classes,
                         num_clients=job.num_clients, dataset_size=job.dataset_size)
        if spec.dim != job.num_params:
            raise ModelError(f"the job's model has {job.num_params} parameters but this client "
                             f"builds {spec.dim}; versions differ?")
        strategy, privacy = spec.strategy, spec.privacy
        for stage in spec.pipeline.stages:
            if isinstance(stage, CompressionStage):  # the reply carries the payload itself
                stage.keep_payload = True
        trainer = privacy.make_trainer(spec.model_factory(), device)
        built = _BuiltJob(config=config, strategy=strategy,
                          pipeline=spec.pipeline, trainer=trainer,
                          device=device, weighting=privacy.weighting)
        self._built = {job.digest: built}  # one job at a time
        return built

    def _tensors(self, job: JobSpec, client_id: int, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        key = (job.digest, client_id)
        if key not in self._data:
            self.source.check(client_id=client_id, input_shape=job.input_shape,
                              num_classes=job.num_classes)
            x, y = self.source.arrays(client_id=client_id)
            self._data = {k: v for k, v in self._data.items() if k[0] == job.digest}
            self._data[key] = (torch.as_tensor(x, dtype=torch.get_default_dtype(),
                                               device=device),
                               torch.as_tensor(y, device=device))
        return self._data[key]

    def train(self, task: ClientTask, job: JobSpec) -> ClientResult:
        """Run one task (raises ClientDropped on injected dropouts)."""
        built = self._build(job)
        x, y = self._tensors(job, task.client_id, built.device)
        session = self.session(task.client_id)
        if self.secret_noise_seeds and built.config.privacy.mode in _CLIENT_NOISE_MODES:
            # The task seed comes from the coordinator; noise drawn from it (DP-SGD, or
            # distributed DP's discrete noise) could be subtracted by the coordinator
            # (confide.privacy.dpsgd, "Randomness"). Only this client knows this seed.
            task.seed = secrets.randbits(63)
        session.job, session.config, session.last_task = job, built.config, task
        session.last_result = None
        # A new task starts a new protocol run, even for a round number seen before (a
        # retried round, or a resumed coordinator sending its interrupted round again).
        session.scratch.pop(STAGE, None)
        session.scratch["weighting"] = built.weighting
        kept = session.scratch.get(RESIDUAL_KEY) if self.local_client_state else None
        if kept is not None and int(kept.numel()) == job.num_params:
            task.client_state = {**task.client_state, RESIDUAL_KEY: kept}
        result = run_client_task(task, built.trainer, x, y, built.strategy, built.pipeline)
        if self.local_client_state and RESIDUAL_KEY in result.new_state:
            session.scratch[RESIDUAL_KEY] = result.new_state.pop(RESIDUAL_KEY)
        session.last_result = result
        return result

    def keeps_update_local(self, job: JobSpec) -> bool:
        """Whether this client's update must not travel in the clear for ``job``."""
        return self.local_secure_aggregation and \
            self._build(job).config.secure_aggregation.enabled


#: Fault injection for end-to-end tests and the soak benchmark: with
#: ``CONFIDE_FAULT_KILL_AT="<round>:<stage>"`` in its environment a client process SIGKILLs
#: itself on receiving that round's ``training`` task or secure-aggregation request
#: (``advertise_keys``, ``share_keys``, ``masked_input``, ``unmask``): a real crash at an
#: exact point of the protocol, which no timing from outside can hit.
FAULT_ENV = "CONFIDE_FAULT_KILL_AT"
_REQUEST_STAGES = {"SETUP": "advertise_keys", "SHARE_KEYS_REQUEST": "share_keys",
                   "MASKED_INPUT_REQUEST": "masked_input", "UNMASK_REQUEST": "unmask"}


def _fault_point(server_round: object, stage: str) -> None:
    target = os.environ.get(FAULT_ENV)
    if target and target == f"{server_round}:{stage}":
        log.warning("%s=%s: this client kills itself now", FAULT_ENV, target)
        os.kill(os.getpid(), signal.SIGKILL)


def _secagg_stage_name(content: RecordDict) -> str:
    from confide.privacy.secagg.flower_stage import unpack
    from confide.privacy.secagg.wire import decode_header

    try:
        kind = decode_header(unpack(content, "request")).kind
    except ConfideError:
        return "?"
    return _REQUEST_STAGES.get(kind.name, "?")


def _error_reply(message: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason[:500]), reply_to=message)


def build_client_app(runner: TaskRunner | Callable[[Context], TaskRunner], *,
                     identity: Callable[[Context], dict[str, Any]]) -> ClientApp:
    """The Flower ClientApp around ``runner``; ``identity`` answers hello queries.

    ``runner`` may be a callable taking the message's Flower ``Context`` and returning the
    runner: Flower's Ray backend pickles the ClientApp with every message, so simulation
    passes a small handle that finds a runner cached in the actor process instead of
    shipping one; the Flower App (:mod:`confide.app.flower_project`) builds its runner from
    the context's run config and node config.
    """
    app = ClientApp()
    get_runner: Callable[[Context], TaskRunner] = (
        (lambda _context: runner) if isinstance(runner, TaskRunner) else runner)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        try:
            task, job = decode_task(message.content)
            _fault_point(task.server_round, "training")
            runner_ = get_runner(context)
            result = runner_.train(task, job)
            local = runner_.keeps_update_local(job)
        except ClientDropped as exc:
            return _error_reply(message, ERROR_DROPPED, str(exc))
        except ConfideError as exc:
            log.error("task refused: %s", exc)
            return _error_reply(message, ERROR_REFUSED, str(exc))
        reply = encode_result(result, include_vectors=not local)
        setup = message.content.config_records.get("confide.stage")
        if local and setup is not None:
            # Secure aggregation's SETUP came with the task: answer Round 0 (advertise
            # keys) with this reply (Bonawitz et al. 2017, Fig. 4; see
            # confide.server.secagg_transport). Without an answer the client has dropped
            # out at advertise_keys.
            _fault_point(task.server_round, "advertise_keys")
            try:
                keys = handle_secagg_stage(message.content, runner_.session(task.client_id))
                reply["confide.stage"] = keys["confide.stage"]
            except ConfideError as exc:
                log.error("secure aggregation's setup refused: %s", exc)
        return Message(reply, reply_to=message)

    @app.query("confide_hello")
    def hello(message: Message, context: Context) -> Message:
        return Message(RecordDict({"confide.hello": ConfigRecord(identity(context))}),
                       reply_to=message)

    @app.query("confide_finish")
    def finish(message: Message, context: Context) -> Message:
        return Message(RecordDict({"confide.finish": ConfigRecord({"ok": True})}),
                       reply_to=message)

    for name, handler in {STAGE: handle_secagg_stage, **_STAGES}.items():
        _register_stage(app, name, handler, get_runner)
    return app


def _register_stage(app: ClientApp, name: str, handler: StageHandler,
                    get_runner: Callable[[Context], TaskRunner]) -> None:
    @app.query(name)
    def stage(message: Message, context: Context) -> Message:
        try:
            client_id = message.content.config_records["confide.stage"]["client_id"]
            if not isinstance(client_id, int):
                raise TypeError("client_id must be an integer")
            if name == STAGE and os.environ.get(FAULT_ENV):
                _fault_point(message.content.config_records["confide.stage"]["server_round"],
                             _secagg_stage_name(message.content))
            reply = handler(message.content, get_runner(context).session(client_id))
        except (ConfideError, KeyError, TypeError, ValueError) as exc:
            return _error_reply(message, ERROR_REFUSED, f"stage {name}: {exc}")
        return Message(reply, reply_to=message)


"""Confide's Flower ServerApp side: the coordinator's round loop over a Flower ``Grid``.

:class:`GridExecutor` is an :class:`~confide.simulations.executors.Executor`: for each round
it sends every sampled client's :class:`~confide.client.ClientTask` as a ``train`` Message to
that client's node, pulls the replies from the Grid when the gateway says one is whole
(:mod:`confide.server.delivery`; otherwise it polls at ``poll_interval``, not Flower's fixed
3 s), and decodes them into :class:`~confide.client.ClientResult` objects. A client whose node is
unknown, offline, revoked or gone (its process ended), whose reply is an error or malformed, or
who does not answer within ``round_timeout`` becomes a dropped outcome; the coordinator's
quorum rule decides whether the round goes on. :meth:`GridExecutor.exchange` sends any extra
protocol stage (secure aggregation's rounds of messages) the same way.

The same executor runs on Flower's deployment runtime (``HttpGrid`` to a SuperLink, see
:mod:`confide.app.deploy`) and on its simulation engine (``InMemoryGrid`` with Ray, see
:mod:`confide.app.flower_sim`).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext, suppress

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from confide.client.messages import FINISH, HELLO, TRAIN, JobSpec, decode_result, encode_task
from confide.client.session import ERROR_DROPPED
from confide.compression import UpdateCodec, count_bytes
from confide.exceptions import ProtocolError
from confide.privacy.secagg.flower_stage import STAGE, pack, unpack
from confide.round import ClientResult, ClientTask, CohortOutcome, Executor, ResultBatch
from confide.server.delivery import Delivery

__all__ = ["NodeDirectory", "GridExecutor", "build_server_app", "discover_nodes",
           "message_bytes", "stage_request"]

log = logging.getLogger("confide")


def message_bytes(message: Message) -> int:
    """The bytes a message's records carry: each array's serialised data, and each config
    entry's key and value (:func:`confide.compression.count_bytes`). Not the transport's
    framing (HTTP, protobuf, TLS), which a socket-level count adds.
    """
    if message.has_error():
        return len((message.error.reason or "").encode())
    content = message.content
    n = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    n += sum(count_bytes(dict(rec)) for rec in content.config_records.values())
    return n


#: with a Delivery, fallback polls back off this much further (the gateway tells of replies)
_TOLD_SLOWER = 4.0


class NodeDirectory(ABC):
    """Maps Confide client ids to Flower node ids, and says who may take part."""

    def refresh(self) -> None:  # noqa: B027 - an optional hook, a no-op by default
        """Called before every round (re-read revocations, online nodes ...)."""

    @abstractmethod
    def node_of(self, client_id: int) -> int | str:
        """The node id serving ``client_id``, or why the client cannot take part."""

    @abstractmethod
    def all_nodes(self) -> list[int]:
        """Node ids of every client that may take part."""

    def gone(self, client_id: int) -> str | None:
        """Why ``client_id`` is known to be gone (its process ended), or None."""
        return None


class GridExecutor(Executor):
    """Runs client tasks as Flower Messages through a Grid."""

    name = "flower-grid"

    def __init__(self, *, grid: Grid, nodes: NodeDirectory, job: JobSpec,
                 aux_names: tuple[str, ...] = (), round_timeout: float = 600.0,
                 poll_interval: float = 0.01, max_poll_interval: float = 0.1,
                 vectors_in_replies: bool = True, codec: UpdateCodec | None = None,
                 delivery: Delivery | None = None) -> None:
        # No SimulationContext: a deployed coordinator holds no client data.
        self.grid = grid
        self.nodes = nodes
        self.job = job
        self.aux_names = aux_names
        self.round_timeout = round_timeout
        self.poll_interval = poll_interval
        self.max_poll_interval = max(poll_interval, max_poll_interval)
        #: False under secure aggregation: replies carry no vectors, they come masked later
        self.vectors_in_replies = vectors_in_replies
        #: the job's update codec: replies carry compressed arrays, decoded here
        self.codec = codec if codec is not None and codec.method != "none" else None
        #: message bytes pushed to / pulled from the clients since :meth:`take_wire_bytes`
        self._bytes_down = 0
        self._bytes_up = 0
        #: train tasks submitted without waiting (:meth:`submit`): message id -> (task,
        #: deadline)
        self._inflight: dict[str, tuple[ClientTask, float]] = {}
        self._early: list[tuple[int, ClientResult | None, str]] = []
        #: told by the gateway when replies arrive (None: poll only, e.g. in simulation)
        self.delivery = delivery
        #: ``(client ids, round) -> SecAgg SETUP per client`` sent with the training tasks
        #: (:meth:`DeployedSecureAggregator.setup_requests`); None: tasks carry none
        self.task_setup: Callable[[list[int], int], dict[int, bytes]] | None = None
        #: client id -> its ``advertise_keys`` reply that came with its training reply
        self.advertised: dict[int, bytes] = {}
        #: clients whose last training task carried a SETUP
        self._task_setups: set[int] = set()

    # ------------------------------------------------------------------ messaging
    def _collect(self, sent: Mapping[str, int], timeout: float
                 ) -> tuple[dict[int, Message], dict[int, str]]:
        """Replies to the messages ``sent`` (message id -> client id) until ``timeout``,
        and the clients known to be gone meanwhile (``NodeDirectory.gone``).

        Between pulls it waits for the gateway's word that a reply arrived (``delivery``),
        else polls every ``poll_interval`` at first and backs off by 1.5x per empty poll up
        to ``max_poll_interval``: each poll costs the SuperLink a few milliseconds of CPU,
        which on a small machine competes with training.
        """
        pending = set(sent)
        replies: dict[int, Message] = {}
        gone: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        interval = self.poll_interval
        while pending:
            generation = self.delivery.generation if self.delivery is not None else 0
            got = False
            for reply in self.grid.pull_messages(list(pending)):
                mid = reply.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    replies[sent[mid]] = reply
                    self._bytes_up += message_bytes(reply)
                    got = True
            for mid in list(pending):  # a client whose process ended will not answer
                why = self.nodes.gone(sent[mid])
                if why is not None:
                    pending.discard(mid)
                    gone[sent[mid]] = why
            if not pending or time.monotonic() >= deadline:
                break
            interval = self.poll_interval if got else min(interval * 1.5,
                                                          self.max_poll_interval)
            if self.delivery is not None:
                # Told when a reply is whole; the polls that remain catch what the gateway
                # does not see (the SuperLink's own error replies), so they can be rarer.
                self.delivery.wait(generation, interval * _TOLD_SLOWER)
            else:
                time.sleep(interval)
        return replies, gone

    def _push(self, messages: list[tuple[int, Message]]) -> tuple[dict[str, int], dict[int, str]]:
        """Push ``(client_id, message)`` pairs; returns sent ids and push failures."""
        if not messages:
            return {}, {}
        with self.delivery.pushing() if self.delivery is not None else nullcontext():
            ids = list(self.grid.push_messages([m for _, m in messages]))
        sent, failed = {}, {}
        for (cid, message), mid in zip(messages, ids, strict=False):
            if mid:
                sent[mid] = cid
                self._bytes_down += message_bytes(message)
            else:
                failed[cid] = "the runtime refused the message"
        for cid, _ in messages[len(ids):]:
            failed[cid] = "the runtime refused the message"
        return sent, failed

    def _train_messages(self, tasks: Sequence[ClientTask]
                        ) -> tuple[list[tuple[int, Message]], dict[int, str]]:
        """Each task as a ``train`` Message to its client's node; or why it cannot go."""
        self.nodes.refresh()
        failures: dict[int, str] = {}
        messages: list[tuple[int, Message]] = []
        nodes: dict[int, int] = {}
        for task in tasks:
            node = self.nodes.node_of(task.client_id)
            if isinstance(node, str):
                failures[task.client_id] = node
            else:
                nodes[task.client_id] = node
        server_round = tasks[0].server_round if tasks else 0
        setups = self.task_setup(sorted(nodes), server_round) if self.task_setup else {}
        self._task_setups = set(setups)
        self.advertised = {}
        for task in tasks:
            if task.client_id not in nodes:
                continue
            content = encode_task(task, self.job)
            if task.client_id in setups:
                content["confide.stage"] = stage_request(
                    pack(setups[task.client_id]), client_id=task.client_id, stage=STAGE,
                    server_round=task.server_round)["confide.stage"]
            messages.append((task.client_id, Message(
                content, dst_node_id=nodes[task.client_id], message_type=TRAIN,
                ttl=self.round_timeout,
                group_id=str(task.server_round))))
        return messages, failures

    def _read_reply(self, task: ClientTask, reply: Message | None
                    ) -> tuple[ClientResult | None, str]:
        """A train reply decoded, or ``(None, why not)``."""
        cid = task.client_id
        if reply is None:
            return None, f"no reply within {self.round_timeout:g} s"
        if reply.has_error():
            err = reply.error
            kind = "left the round" if err.code == ERROR_DROPPED else "failed"
            return None, f"{kind}: {err.reason}"
        try:
            return decode_result(reply.content, client_id=cid, num_params=self.job.num_params,
                                 aux_names=self.aux_names,
                                 with_vectors=self.vectors_in_replies, codec=self.codec,
                                 server_round=task.server_round), ""
        except ProtocolError as exc:
            log.warning("client %d sent a malformed reply: %s", cid, exc)
            return None, f"malformed reply ({exc})"

    def run_cohort(self, tasks: Sequence[ClientTask]) -> CohortOutcome:  # noqa: D102
        messages, failures = self._train_messages(tasks)
        results: dict[int, ClientResult] = {}
        sent, failed = self._push(messages)
        failures.update(failed)
        replies, gone = self._collect(sent, self.round_timeout)
        by_id = {t.client_id: t for t in tasks}
        setups = self._task_setups
        for cid in sent.values():
            reply = replies.get(cid)
            result, why = self._read_reply(by_id[cid], reply)
            if result is None or reply is None:
                failures[cid] = gone.get(cid, why)
            else:
                results[cid] = result
                if cid in setups:  # its advertise_keys reply, checked by the protocol later
                    with suppress(ProtocolError):
                        self.advertised[cid] = unpack(reply.content, f"client {cid}'s keys")
        # One message per client (a batch of one each), stacked in task order.
        ordered = [results[t.client_id] for t in tasks if t.client_id in results]
        dim = self.job.num_params if self.vectors_in_replies else 0
        return CohortOutcome(ResultBatch.from_results(ordered, dim=dim, device="cpu"), failures)

    # ------------------------------------------------------------------ asynchronous rounds
    def submit(self, tasks: Sequence[ClientTask]) -> None:
        """Send train tasks without waiting (FedBuff in deployment): their outcomes come
        back from :meth:`arrivals` as the replies arrive. A task that cannot be sent comes
        back at once as a failure.
        """
        messages, failures = self._train_messages(tasks)
        by_id = {t.client_id: t for t in tasks}
        sent, failed = self._push(messages)
        failures.update(failed)
        deadline = time.monotonic() + self.round_timeout
        for mid, cid in sent.items():
            self._inflight[mid] = (by_id[cid], deadline)
        self._early.extend((cid, None, why) for cid, why in failures.items())

    def arrivals(self, timeout: float) -> list[tuple[int, ClientResult | None, str]]:
        """Outcomes of submitted tasks in arrival order, ``(client id, result or None,
        why not)``; waits up to ``timeout`` for the first. A task past its deadline
        (``round_timeout`` after it was sent) is a failure.
        """
        out, self._early = self._early, []
        deadline = time.monotonic() + timeout
        interval = self.poll_interval
        while not out and self._inflight:
            for reply in self.grid.pull_messages(list(self._inflight)):
                entry = self._inflight.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                self._bytes_up += message_bytes(reply)
                result, why = self._read_reply(entry[0], reply)
                out.append((entry[0].client_id, result, why))
            now = time.monotonic()
            for mid, (task, task_deadline) in list(self._inflight.items()):
                if now >= task_deadline:
                    del self._inflight[mid]
                    out.append((task.client_id, None, f"no reply within "
                                                      f"{self.round_timeout:g} s"))
            if out or now >= deadline:
                break
            interval = min(interval * 1.5, self.max_poll_interval)
            time.sleep(interval)
        return out

    def take_wire_bytes(self) -> tuple[int, int]:
        """``(up, down)`` message bytes since the last call (the history's ``bytes_up`` /
        ``bytes_down`` in deployment): every record of every message this executor
        pushed or pulled (:func:`message_bytes`), training and protocol stages alike.
        """
        up, down = self._bytes_up, self._bytes_down
        self._bytes_up = self._bytes_down = 0
        return up, down

    def exchange(self, stage: str, requests: Mapping[int, RecordDict], *, server_round: int,
                 timeout: float | None = None) -> dict[int, RecordDict | str]:
        """Send one protocol stage: ``client id -> records`` out, replies (or why none) back.

        Each request gets a ``confide.stage`` record naming the client, so the client-side
        handler (:func:`confide.app.client_app.register_client_stage`) finds its session.
        """
        out: dict[int, RecordDict | str] = {}
        messages: list[tuple[int, Message]] = []
        for cid, content in requests.items():
            node = self.nodes.node_of(cid)
            if isinstance(node, str):
                out[cid] = node
                continue
            records = stage_request(content, client_id=cid, stage=stage,
                                    server_round=server_round)
            messages.append((cid, Message(records, dst_node_id=node,
                                          message_type=f"query.{stage}",
                                          ttl=timeout or self.round_timeout,
                                          group_id=str(server_round))))
        sent, failed = self._push(messages)
        out.update(failed)
        deadline = timeout or self.round_timeout
        replies, gone = self._collect(sent, deadline)
        for cid in sent.values():
            reply = replies.get(cid)
            if reply is None:  # gone, or the stage's deadline passed: dropped at this stage
                out[cid] = gone.get(cid, f"no reply within the {deadline:g} s deadline of "
                                         f"{stage}")
            elif reply.has_error():
                out[cid] = reply.error.reason or "error"
            else:
                out[cid] = reply.content
        return out

    def finish(self, timeout: float = 10.0) -> None:
        """Tell every node the job is over (clients then exit); best effort."""
        messages = [(i, Message(RecordDict({"confide.finish": ConfigRecord({"ok": True})}),
                                dst_node_id=node, message_type=FINISH, ttl=timeout))
                    for i, node in enumerate(self.nodes.all_nodes())]
        try:
            sent, _ = self._push(messages)
            self._collect(sent, timeout)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway
            log.info("could not tell every client the job is over: %s", exc)


def stage_request(content: RecordDict, *, client_id: int, stage: str,
                  server_round: int) -> RecordDict:
    """``content`` with the stage header (``confide.stage``: client id, stage, round).

    The header joins the stage's own ``confide.stage`` record if it has one: one record
    where there would be two, so one Flower object less to push and to pull per message
    (each is an HTTP request through the gateway and the SuperLink).
    """
    records = RecordDict(dict(content.items()))
    own = content.config_records.get("confide.stage")
    records["confide.stage"] = ConfigRecord({
        **(dict(own.items()) if own is not None else {}),
        "client_id": client_id, "stage": stage, "server_round": server_round})
    return records


def discover_nodes(grid: Grid, *, expected: int, timeout: float,
                   poll_interval: float = 0.05) -> dict[int, dict[str, object]]:
    """Ask every online node who it is (``query.confide_hello``); node id -> identity."""
    deadline = time.monotonic() + timeout
    node_ids: list[int] = []
    while time.monotonic() < deadline:
        node_ids = list(grid.get_node_ids())
        if len(node_ids) >= expected:
            break
        time.sleep(poll_interval)
    messages = [Message(RecordDict({"confide.hello": ConfigRecord({})}), dst_node_id=n,
                        message_type=HELLO, ttl=max(1.0, timeout)) for n in node_ids]
    ids = list(grid.push_messages(messages))
    pending = {mid: n for mid, n in zip(ids, node_ids, strict=False) if mid}
    found: dict[int, dict[str, object]] = {}
    while pending and time.monotonic() < deadline + timeout:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is None or reply.has_error():
                continue
            record = reply.content.config_records.get("confide.hello")
            if record is None:  # a peer's malformed reply: that node is not discovered
                log.warning("node %s answered hello without its record; ignored", node)
                continue
            found[node] = dict(record.items())
        if pending:
            time.sleep(poll_interval)
    return found


def build_server_app(main: Callable[[Grid, Context], None]) -> ServerApp:
    """A Flower ServerApp whose main function is ``main`` (the coordinator's job)."""
    app = ServerApp()
    app.main()(main)
    return app

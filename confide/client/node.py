"""``confide client start``: a Flower SuperNode loop with Confide's ClientApp in process.

The node speaks Flower's Fleet protocol (``FleetHttpClient`` with Flower's node-authentication
interceptor, Flower's object push/pull and heartbeats) to the coordinator's gateway, over
mutual TLS with the certificate from enrolment. Two things differ from ``flower-supernode``:

* the ClientApp runs in this process, built once: no ClientApp process per message
  (Flower's default isolation spends seconds importing torch for every message), and the
  node never installs or runs code from the run's app bundle, so the coordinator cannot make
  a client execute anything but the Confide version its operator installed;
* it polls for messages every ``poll_interval`` seconds after activity, backing off to
  ``max_poll_interval`` while idle (Flower's loop sleeps 3 s), or at once when the
  coordinator held its last pull until it had news (a long poll), and pulls message objects
  with a short back-off; it keeps its connections open, so the coordinator takes a client
  whose connections all closed for gone (:mod:`confide.server.delivery`).

It reads only its own data file and sends back only what the ClientApp returns.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx

from confide.client.enrol import ClientIdentity, parse_address
from confide.client.messages import FINISH
from confide.exceptions import ConfideError, SecurityError
from confide.files import atomic_write_text

__all__ = ["NodeOptions", "run_node"]

log = logging.getLogger("confide")


@dataclass(frozen=True)
class NodeOptions:
    """How the node connects and polls."""

    insecure: bool = False
    #: first poll interval after activity; empty polls back off 1.5x up to the maximum
    poll_interval: float = 0.01
    max_poll_interval: float = 0.1
    connect_timeout: float = 60.0
    #: how long a lost coordinator (restarted, resumed) is retried, backing off, before the
    #: node gives up
    reconnect_timeout: float = 300.0
    request_timeout: float = 120.0
    #: seconds between heartbeats; the SuperLink counts the node offline after two missed
    #: (Flower's minimum is 10 s), so a dead client leaves the cohort within ~20 s
    heartbeat_interval: float = 10.0
    #: back-off between reconnection attempts: doubles from the first to the last
    reconnect_backoff: tuple[float, float] = (0.5, 5.0)


#: the node id of the last activation, in the client's folder (to end a stale session)
NODE_ID_FILE = "node_id"
#: longer than any coordinator keeps an idle connection (its gateway: 30 s)
_KEEPALIVE_S = 3600.0


class _Refused(ConfideError):
    exit_code = SecurityError.exit_code


def _refusal(exc: httpx.HTTPStatusError) -> str:
    try:
        body = exc.response.json()
        reason = body.get("error") or body.get("message") or body.get("detail")
    except (ValueError, AttributeError):
        reason = None
    return str(reason or f"HTTP {exc.response.status_code}")


def _tls_failure(exc: BaseException) -> str | None:
    """A one-line reason if ``exc`` is a TLS failure, else None."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (f"the coordinator's certificate is not from this client's federation "
                    f"({seen.verify_message}); is this client folder for another federation?")
        if isinstance(seen, ssl.SSLError):
            reason = (seen.reason or str(seen)).lower()
            if "alert" in reason or "certificate" in reason:
                return (f"the coordinator refused this client's certificate ({seen.reason}); "
                        "revoked, or enrolled with another federation?")
            return f"TLS failed ({seen.reason or seen})"
        seen = seen.__cause__ or seen.__context__
    text = str(exc).lower()
    if "alert" in text or "certificate" in text:
        return f"the coordinator refused this client's certificate ({exc})"
    return None


class _Fleet:
    """Flower Fleet API calls for one node (mutual TLS + node authentication)."""

    def __init__(self, identity: ClientIdentity, options: NodeOptions) -> None:
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        host, port = parse_address(identity.coordinator)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        verify: ssl.SSLContext | bool = False if options.insecure else identity.tls_context()
        scheme = "http" if options.insecure else "https"
        self.client = FleetHttpClient(
            f"{scheme}://{netloc}", verify=verify, timeout=options.request_timeout,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                          NodeAuthHttpInterceptor(identity.key, identity.key.public_key())])
        # Connections are kept until the coordinator closes them (idle) or this process
        # ends: the coordinator takes a client whose connections all closed from its side
        # for gone (confide.server.delivery), so the node never expires one itself
        # (httpx's default closes those idle for 5 s, about a heartbeat's interval).
        old = self.client._client  # noqa: SLF001 - Flower builds it and takes no limits
        self.client._client = httpx.Client(  # noqa: SLF001
            verify=verify, timeout=old.timeout, follow_redirects=True,
            limits=httpx.Limits(keepalive_expiry=_KEEPALIVE_S))
        old.close()
        self.identity = identity
        self.node: Any = None
        self.heartbeat_interval = options.heartbeat_interval
        self.refused: str | None = None

    def call(self, method: str, request: Any) -> Any:
        """One Fleet call; refusals become SecurityError-coded errors."""
        try:
            return getattr(self.client, method)(request)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code in (401, 403):
                raise _Refused(f"the coordinator refused this client: {_refusal(exc)}"
                               ) from None
            raise

    def activate(self) -> int:
        from flwr.proto.fleet_pb2 import ActivateNodeRequest
        from flwr.proto.node_pb2 import Node
        from flwr.supercore.primitives.asymmetric import public_key_to_bytes

        res = self.call("ActivateNode", ActivateNodeRequest(
            public_key=public_key_to_bytes(self.identity.key.public_key()),
            heartbeat_interval=self.heartbeat_interval))
        self.node = Node(node_id=res.node_id)
        with contextlib.suppress(OSError):  # remembered for a restart (see _connect)
            atomic_write_text(self.identity.directory / NODE_ID_FILE, f"{res.node_id}\n")
        return int(res.node_id)

    def deactivate_previous(self) -> bool:
        """End the session of this client's previous process (killed, say) if the
        coordinator still counts it online; True if it did.

        Flower refuses to activate a node that is online (412) until its heartbeats expire
        (two missed: ~20 s); the request is signed with this client's own key, so only
        this client's node can be ended so.
        """
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest

        try:
            node_id = int((self.identity.directory / NODE_ID_FILE).read_text().strip())
            self.call("DeactivateNode", DeactivateNodeRequest(node_id=node_id))
        except (OSError, ValueError, httpx.HTTPError):
            return False
        return True

    def heartbeat(self) -> bool:
        from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest

        if self.node is None:
            return False
        try:
            res = self.call("SendNodeHeartbeat", SendNodeHeartbeatRequest(
                node=self.node, heartbeat_interval=self.heartbeat_interval))
        except _Refused as exc:
            self.refused = str(exc)  # the main loop stops at its next request
            return True
        except httpx.HTTPError:
            return False
        return bool(res.success)

    def deactivate(self) -> None:
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest

        if self.node is not None:
            try:
                self.client.DeactivateNode(DeactivateNodeRequest(node_id=self.node.node_id))
            except (httpx.HTTPError, RuntimeError):
                pass

    def pull(self) -> Any:
        """The next message for this node (inflated), or None."""
        from flwr.common.serde import message_from_proto
        from flwr.proto.fleet_pb2 import PullMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_confirm_message_received_fn_protobuf,
            make_pull_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import (
            inflate_object_from_contents,
            pull_objects,
        )

        res = self.call("PullMessages", PullMessagesRequest(node=self.node))
        if not res.messages_list:
            return None
        proto, tree = res.messages_list[0], res.message_object_trees[0]
        header = message_from_proto(proto)
        run_id = header.metadata.run_id
        mid = header.metadata.message_id
        contents = pull_objects(
            [t.object_id for t in iterate_object_tree(tree)],
            pull_object_fn=make_pull_object_fn_protobuf(
                lambda r: self.call("PullObject", r), self.node, run_id),
            initial_backoff=0.01, backoff_cap=0.5)
        make_confirm_message_received_fn_protobuf(
            lambda r: self.call("ConfirmMessageReceived", r), self.node, run_id)(mid)
        message: Any = inflate_object_from_contents(mid, contents)
        message.metadata.__dict__["_message_id"] = mid
        return message

    def push(self, reply: Any, runtime_s: float) -> None:
        """Send a reply and its objects."""
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.proto.fleet_pb2 import PushMessagesRequest
        from flwr.supercore.inflatable.inflatable_object import (
            get_all_nested_objects,
            get_object_tree,
            no_object_id_recompute,
        )
        from flwr.supercore.inflatable.inflatable_protobuf_utils import (
            make_push_object_fn_protobuf,
        )
        from flwr.supercore.inflatable.inflatable_utils import push_objects

        with no_object_id_recompute():
            reply.metadata.__dict__["_message_id"] = reply.object_id
            objects = get_all_nested_objects(reply)
            tree = get_object_tree(reply)
            header = remove_content_from_message(reply) if reply.has_content() else reply
            res = self.call("PushMessages", PushMessagesRequest(
                node=self.node, messages_list=[message_to_proto(header)],
                message_object_trees=[tree], clientapp_runtime_list=[runtime_s]))
            push_objects(objects, push_object_fn=make_push_object_fn_protobuf(
                lambda r: self.call("PushObject", r), self.node, reply.metadata.run_id,
                res.session_id), object_ids_to_push=set(res.objects_to_push))


def _connect(fleet: _Fleet, options: NodeOptions) -> int:
    """Activate the node, retrying while the coordinator is not up (yet)."""
    deadline = time.monotonic() + options.connect_timeout
    last = "no answer"
    ended_previous = False
    while True:
        try:
            return fleet.activate()
        except _Refused:
            raise
        except httpx.HTTPStatusError as exc:
            last = f"{_refusal(exc)}"
            if exc.response.status_code == 412 and not ended_previous:
                # Still online from this client's previous process: end that session.
                ended_previous = True
                if fleet.deactivate_previous():
                    log.info("ended the session of this client's previous process")
                    continue
        except (httpx.TransportError, OSError) as exc:
            tls = _tls_failure(exc)
            if tls is not None:
                raise SecurityError(tls) from None
            last = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            raise ConfideError(f"cannot reach the coordinator at {fleet.identity.coordinator} "
                               f"within {options.connect_timeout:g} s ({last}); check the "
                               "address and that 'confide server start' is running")
        time.sleep(0.5)


class _Heartbeat:
    """Heartbeats every half interval (Flower's ``HeartbeatSender`` always waits ~20 s,
    whatever interval the node announced, which would let a 10 s node expire).
    """

    def __init__(self, fleet: _Fleet) -> None:
        self.fleet = fleet
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="confide-heartbeat",
                                        daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.fleet.heartbeat_interval / 2):
            try:
                self.fleet.heartbeat()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.debug("heartbeat failed: %s", exc)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _rejoin(fleet: _Fleet, node_id: int) -> int:
    """Activate again after the coordinator was lost; returns the node id to use.

    A restarted coordinator (``server start --resume``) runs a new SuperLink: the old node id
    is unknown there, the enrolled key is registered again. The same SuperLink answers 412
    (the node is still online there: only the connection broke), and the old id stands.
    """
    try:
        return fleet.activate()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 412:
            return node_id
        raise


def run_node(*, identity: ClientIdentity, client_app: Any, options: NodeOptions = NodeOptions(),
             on_ready: Any = None) -> int:
    """Serve the coordinator's messages until it finishes the job; returns rounds served."""
    from flwr.app import Context, Error, Message, RecordDict

    if options.insecure:
        log.warning("--insecure: this client talks to the coordinator WITHOUT TLS")
    fleet = _Fleet(identity, options)
    node_id = _connect(fleet, options)
    log.info("client %r connected to %s as node %d", identity.name, identity.coordinator,
             node_id)
    if on_ready is not None:
        on_ready(node_id)
    heartbeat = _Heartbeat(fleet)
    heartbeat.start()
    contexts: dict[int, Any] = {}
    served = 0
    lost_since: float | None = None
    #: set when the coordinator was lost or refused the node's id: activate again first
    rejoin = False
    rejoined_after_refusal = False
    backoff = options.reconnect_backoff[0]
    interval = options.poll_interval
    try:
        while True:
            if fleet.refused is not None:
                if rejoined_after_refusal:  # refused again right after a fresh activation
                    raise _Refused(fleet.refused)
                rejoin, rejoined_after_refusal = True, True
                fleet.refused = None
            try:
                if rejoin:
                    node_id = _rejoin(fleet, node_id)
                    rejoin, lost_since = False, None
                    backoff = options.reconnect_backoff[0]
                    log.info("client %r reconnected to %s as node %d", identity.name,
                             identity.coordinator, node_id)
                pulled_at = time.monotonic()
                message = fleet.pull()
                lost_since = None
            except _Refused as exc:
                if rejoined_after_refusal:
                    raise
                fleet.refused = str(exc)  # perhaps a restarted coordinator: activate again
                continue
            except (httpx.HTTPError, OSError) as exc:
                tls = _tls_failure(exc)
                if tls is not None:
                    raise SecurityError(tls) from None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > options.reconnect_timeout:
                    raise ConfideError(f"lost the coordinator at {identity.coordinator} for "
                                       f"{options.reconnect_timeout:g} s ({exc})") from None
                if not rejoin:
                    log.warning("lost the coordinator (%s); retrying for up to %g s", exc,
                                options.reconnect_timeout)
                rejoin = True
                time.sleep(backoff)
                backoff = min(2 * backoff, options.reconnect_backoff[1])
                continue
            except ConfideError:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. Flower's ObjectPullError
                log.warning("could not receive a message (%s); waiting for the next", exc)
                continue
            rejoined_after_refusal = False
            if message is None:
                if time.monotonic() - pulled_at >= options.max_poll_interval:
                    # The coordinator held the pull until it had news (a long poll,
                    # confide.server.delivery): ask again at once, no back-off.
                    interval = options.poll_interval
                    continue
                time.sleep(interval)
                interval = min(interval * 1.5, max(options.poll_interval,
                                                   options.max_poll_interval))
                continue
            interval = options.poll_interval
            run_id = message.metadata.run_id
            context = contexts.setdefault(run_id, Context(
                run_id=run_id, node_id=node_id, node_config={}, state=RecordDict(),
                run_config={}))
            started = time.monotonic()
            try:
                reply = client_app(message, context)
            except Exception as exc:  # noqa: BLE001 - reported to the coordinator
                log.error("the ClientApp failed: %s", exc)
                reply = Message(Error(code=0, reason=str(exc)[:500]), reply_to=message)
            try:
                fleet.push(reply, time.monotonic() - started)
            except _Refused:
                raise
            except (httpx.HTTPError, OSError) as exc:
                tls = _tls_failure(exc)
                if tls is not None:
                    raise SecurityError(tls) from None
                log.warning("could not send a reply (%s); the coordinator will count this "
                            "client as dropped for it", exc)
            except Exception as exc:  # noqa: BLE001 - e.g. Flower's ObjectPushError
                log.warning("could not send a reply (%s)", exc)
            if message.metadata.message_type == "train":
                served += 1
                log.info("round %s done", message.metadata.group_id)
            if message.metadata.message_type == FINISH:
                log.info("the coordinator finished the job")
                break
    finally:
        heartbeat.stop()
        fleet.deactivate()
        fleet.client.close()
    return served


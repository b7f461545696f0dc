"""Event-driven delivery inside the coordinator: no message waits for a poll interval.

The round loop (:class:`~confide.server.flower_app.GridExecutor`) and the public gateway
(:class:`~confide.server.gateway.Gateway`) run in one process, with Flower's SuperLink between
them. Flower's Fleet and Runtime APIs are polled (a SuperNode asks for messages, the ServerApp
asks for replies); a :class:`Delivery` shared by the two tells each side instead:

* a client's ``pull-messages`` that finds nothing is held by the gateway (a long poll, at most
  ``hold_s``) and forwarded again as soon as the coordinator has pushed messages; while the
  coordinator is pushing, a client's pull waits for that push to finish, so it never receives a
  message whose objects are still on their way (each missing object costs it retries);
* the gateway tells the round loop when a client's reply has arrived whole (its
  ``push-messages`` and every object the SuperLink asked for), and the loop wakes at once;
* a client whose connections to the gateway were all closed from the client's side (its
  process exited or was killed: the kernel closes its sockets, RFC 9293, Sec. 3.6) and that
  has not reconnected within ``gone_grace_s`` is reported gone, so the round goes on without
  it instead of waiting for Flower's heartbeat expiry (two missed heartbeats, ~20 s). A live
  node keeps a connection open (its heartbeats use one every few seconds, and it never
  expires one itself: :mod:`confide.client.node`); connections the gateway closes (idle,
  refused) do not count.

Messages, objects, node signatures and TLS are unchanged: the gateway only chooses *when* to
forward a client's request, never what it forwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

__all__ = ["Delivery"]


class Delivery:
    """Shared by the round loop (any thread) and the gateway (its asyncio loop)."""

    def __init__(self, *, hold_s: float = 1.0, gone_grace_s: float = 1.0) -> None:
        #: the longest a client's empty pull is held (also bounds a wait for a push)
        self.hold_s = hold_s
        #: a client without a connection this long (closed from its side) is gone
        self.gone_grace_s = gone_grace_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._generation = 0
        self._pushing = 0
        self._open: dict[str, int] = {}
        self._gone: dict[str, float] = {}
        self._objects_due: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._quiet: asyncio.Event | None = None
        self._delivered: asyncio.Event | None = None

    # ------------------------------------------------------------------ the round loop
    @property
    def generation(self) -> int:
        """Counts the events the round loop waits for (replies, clients gone)."""
        with self._lock:
            return self._generation

    def wait(self, since: int, timeout: float) -> int:
        """Until an event after ``since`` (or ``timeout`` seconds); the new generation."""
        with self._changed:
            self._changed.wait_for(lambda: self._generation != since, timeout)
            return self._generation

    @contextlib.contextmanager
    def pushing(self) -> Iterator[None]:
        """Around the coordinator's push of messages: clients' pulls wait for its end."""
        with self._lock:
            self._pushing += 1
        self._call(self._push_started)
        try:
            yield
        finally:
            with self._lock:
                self._pushing -= 1
            self._call(self._push_finished)

    def gone_for(self, name: str) -> float | None:
        """Seconds since client ``name`` closed its last connection; None if connected."""
        with self._lock:
            since = self._gone.get(name)
        return None if since is None else time.monotonic() - since

    def _notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ the gateway's loop
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Called by the gateway on its running loop, before it serves."""
        self._loop = loop
        self._quiet, self._delivered = asyncio.Event(), asyncio.Event()
        with self._lock:
            if not self._pushing:
                self._quiet.set()

    def _call(self, fn: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop stopped meanwhile
                loop.call_soon_threadsafe(fn)  # type: ignore[arg-type]

    def _push_started(self) -> None:
        if self._quiet is not None:
            self._quiet.clear()

    def _push_finished(self) -> None:
        with self._lock:
            quiet = self._pushing == 0
        if quiet and self._quiet is not None and self._delivered is not None:
            self._quiet.set()
            self._delivered.set()  # wakes every held pull; the next push sets a fresh one
            self._delivered = asyncio.Event()

    async def before_pull(self) -> asyncio.Event | None:
        """Wait (at most ``hold_s``) for a push in progress; the event the next push sets."""
        if self._quiet is not None and not self._quiet.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), self.hold_s)
        return self._delivered

    async def hold(self, delivered: asyncio.Event | None) -> bool:
        """Hold an empty pull until the coordinator pushes (True) or ``hold_s`` passes."""
        if delivered is None:
            return False
        try:
            await asyncio.wait_for(delivered.wait(), self.hold_s)
        except TimeoutError:
            return False
        return True

    def reply_started(self, name: str, objects_due: int) -> None:
        """Client ``name`` pushed a reply's header; the SuperLink wants ``objects_due``."""
        with self._lock:
            self._objects_due[name] = objects_due
        if objects_due <= 0:
            self._notify()

    def object_pushed(self, name: str) -> None:
        """Client ``name`` pushed one object of its reply."""
        with self._lock:
            left = self._objects_due.get(name, 0) - 1
            self._objects_due[name] = left
        if left <= 0:
            self._notify()

    def connection_opened(self, name: str) -> None:
        """Client ``name`` was authorised on a new connection."""
        with self._lock:
            self._open[name] = self._open.get(name, 0) + 1
            self._gone.pop(name, None)

    def connection_closed(self, name: str, *, by_client: bool) -> None:
        """A connection of client ``name`` ended (``by_client``: not closed by the gateway)."""
        with self._lock:
            left = self._open.get(name, 0) - 1
            self._open[name] = max(0, left)
            gone = left <= 0 and by_client
            if gone:
                self._gone[name] = time.monotonic()
        if gone:
            self._notify()


def pull_found_nothing(body: bytes) -> bool:
    """Whether a Fleet ``PullMessagesResponse`` holds no message (False if unreadable)."""
    from flwr.proto.fleet_pb2 import PullMessagesResponse
    from google.protobuf.message import DecodeError

    try:
        return not PullMessagesResponse.FromString(body).messages_list
    except DecodeError:
        return False


def objects_requested(body: bytes) -> int | None:
    """How many objects a Fleet ``PushMessagesResponse`` asks for (None if unreadable)."""
    from flwr.proto.fleet_pb2 import PushMessagesResponse
    from google.protobuf.message import DecodeError

    try:
        return len(PushMessagesResponse.FromString(body).objects_to_push)
    except DecodeError:
        return None

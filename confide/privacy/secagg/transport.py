"""Message paths: how the protocol's requests reach clients and their replies come back.

The protocol (:mod:`confide.privacy.secagg.protocol`) only produces and consumes bytes. A
:class:`MessagePath` moves one stage's requests to the clients and returns their replies;
:func:`run_secure_aggregation` drives the coordinator's stages over any path. In simulation
the path calls :class:`~confide.privacy.secagg.protocol.SecAggClient` objects in process; in
deployment, a path over Flower's Grid sends each request as a message to the client's
SuperNode, whose ClientApp answers it with the same ``SecAggClient`` stage methods.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping

from confide.exceptions import ProtocolError
from confide.privacy.secagg.protocol import (
    STAGES,
    Contribution,
    SecAggClient,
)
from confide.privacy.secagg.protocol_server import SecAggResult, SecAggServer

__all__ = ["MessagePath", "InProcessMessagePath", "run_secure_aggregation"]

log = logging.getLogger("confide")


class MessagePath(ABC):
    """Carries one protocol stage's requests to clients and brings their replies back."""

    @abstractmethod
    def exchange(self, stage: str, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        """Deliver ``requests`` (client id -> bytes); return each client's reply, or None if it
        did not answer (dropped out, timed out, or failed).
        """


class InProcessMessagePath(MessagePath):
    """Calls in-process clients directly; simulates clients leaving after a given stage.

    ``drop_after`` maps a client id to the stage after which it leaves: it answers that
    stage, then never again. A client whose handler raises :class:`ProtocolError` (it
    refuses a request) gives no reply, as a real client that aborts would.
    """

    def __init__(self, clients: Mapping[int, SecAggClient],
                 contributions: Mapping[int, Contribution],
                 drop_after: Mapping[int, str] | None = None) -> None:
        self.clients = dict(clients)
        self.contributions = dict(contributions)
        self.drop_after = dict(drop_after or {})
        self.gone: set[int] = set()

    def exchange(self, stage: str, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        """Run every addressed client's handler for ``stage``."""
        replies: dict[int, bytes | None] = {}
        for cid, request in requests.items():
            client = self.clients.get(cid)
            if client is None or cid in self.gone:
                replies[cid] = None
                continue
            try:
                replies[cid] = client.handle(request, self.contributions.get(cid))
            except ProtocolError as exc:
                log.warning("client %d aborts secure aggregation at %s: %s", cid, stage, exc)
                replies[cid] = None
                self.gone.add(cid)
                continue
            if self.drop_after.get(cid) == stage:
                self.gone.add(cid)
        return replies


def run_secure_aggregation(server: SecAggServer, path: MessagePath) -> SecAggResult:
    """Drive the coordinator's four named stages over ``path``; return the unmasked sum."""
    requests = server.advertise_keys()
    handlers = (server.share_keys, server.masked_input, server.unmask)
    for stage, next_stage in zip(STAGES[:-1], handlers, strict=True):
        requests = next_stage(path.exchange(stage, requests))
    return server.finish(path.exchange(STAGES[-1], requests))

"""The client's side of secure aggregation in a deployment: ``query.secagg`` messages.

The update of a client taking part in secure aggregation never leaves it in the clear: its
``train`` reply carries counts and metrics only (:func:`confide.client.messages.encode_result`
with ``include_vectors=False``), and this handler answers the coordinator's SecAgg+ requests
(:mod:`confide.privacy.secagg.protocol`) with the masked contribution. The coordinator's side
is :mod:`confide.server.secagg_transport`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from confide.exceptions import ProtocolError

if TYPE_CHECKING:
    from confide.client.session import ClientSession

__all__ = ["STAGE", "pack", "unpack", "request_bound", "handle_secagg_stage"]

log = logging.getLogger("confide")

STAGE = "secagg"
#: the record that carries a stage's bytes: the same one the coordinator's Grid executor fills
#: with the stage header (client id, stage, round), so a request is three Flower objects
#: (message, record dict, one record) and a reply too; each object costs an HTTP request to
#: push and one to pull. Bonawitz et al. 2017 (Sec. 4) fix what each round's message says,
#: not how it is framed.
_KEY = "confide.stage"
_FIELD = "secagg"
#: no SecAgg message is larger (``confide.privacy.secagg.wire.MAX_MESSAGE_BYTES``: a 46-byte
#: header and a body whose length field is a u32)
MAX_MESSAGE_BYTES = 46 + 2**32 - 1


def pack(data: bytes) -> RecordDict:
    """Protocol bytes as one Flower ``ConfigRecord`` bytes value (never pickled)."""
    return RecordDict({_KEY: ConfigRecord({_FIELD: bytes(data)})})


def unpack(content: RecordDict, what: str, *, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    """The protocol bytes in ``content``; ProtocolError (only) if absent, malformed or big.

    At most ``max_bytes`` are accepted (the bytes are Flower's, already received: nothing is
    allocated from a length field here; the protocol's own lengths are checked by
    :mod:`confide.privacy.secagg.wire`).
    """
    try:
        data = content.config_records[_KEY][_FIELD]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProtocolError(f"{what}: no secure-aggregation payload ({exc!r})") from None
    if not isinstance(data, bytes):
        raise ProtocolError(f"{what}: the secure-aggregation payload is not bytes")
    if len(data) > max_bytes:
        raise ProtocolError(f"{what}: the secure-aggregation payload has {len(data)} bytes, "
                            f"expected {max_bytes} at most")
    return data


def request_bound(*, num_clients: int) -> int:
    """The largest request a client of a job of ``num_clients`` clients accepts.

    A request carries no vector and lists at most all the job's clients
    (:func:`confide.privacy.secagg.wire.max_message_bytes`).
    """
    from confide.privacy.secagg.wire import max_message_bytes

    return max_message_bytes(vector_length=0, bits=8, cohort_size=num_clients)


def handle_secagg_stage(content: RecordDict, session: ClientSession) -> RecordDict:
    """A client's answer to one ``query.secagg`` request (its update stays here).

    The round's :class:`SecAggClient` is made at the first stage of a round; its stochastic
    rounding uses the same derived generator as the simulation, its keys and masks come from
    the OS (never seeded).
    """
    from confide.privacy.secagg.aggregator import SecureAggregator
    from confide.privacy.secagg.protocol import INPUT_INTEGERS, SecAggClient
    from confide.privacy.secagg.quantisation import clipped_entries
    from confide.seeding import derive_rng

    try:
        server_round = content.config_records["confide.stage"]["server_round"]
    except (KeyError, TypeError, AttributeError):
        raise ProtocolError("a secure-aggregation request without its round") from None
    if not isinstance(server_round, int) or session.config is None or session.job is None:
        raise ProtocolError("secure aggregation before any training in this job")
    if session.last_task is None or session.last_task.server_round != server_round \
            or session.last_result is None:
        raise ProtocolError(f"no update of round {server_round} to aggregate")
    cid = session.last_task.client_id
    state: dict[str, Any] = session.scratch.setdefault(STAGE, {})
    if state.get("round") != server_round:
        state.clear()
        state["round"] = server_round
        state["client"] = SecAggClient(cid, server_round=server_round, rng=derive_rng(
            session.config.run.seed, "secagg-rounding", server_round, cid))
        aggregator = SecureAggregator(session.config)
        aux_names = sorted(session.last_result.aux)
        weighting = str(session.scratch.get("weighting", "examples"))
        state["contribution"] = contribution = aggregator._contribution(  # noqa: SLF001
            session.last_result, weighting, aux_names)
        if aggregator.input_mode != INPUT_INTEGERS:
            c = session.config.secure_aggregation.clipping_range
            clipped = clipped_entries(np.asarray(contribution.update),
                                      [np.asarray(a) for a in contribution.aux],
                                      clipping_range=c)
            if any(clipped):  # never silent (confide.strategies.aux_vectors, rule 3)
                log.warning("round %d: secure aggregation clips %d update and %d aux-vector "
                            "entries of this client beyond clipping_range = %g", server_round,
                            *clipped, c)
    request = unpack(content, "the coordinator's secure-aggregation request",
                     max_bytes=request_bound(num_clients=session.config.data.num_clients))
    reply = state["client"].handle(request, state["contribution"])
    return pack(reply)

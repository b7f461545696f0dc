"""Secure aggregation over Flower's Grid: SecAgg+ stages as ``query.secagg`` messages.

In a deployment a client's update never reaches the coordinator in the clear: its ``train``
reply carries counts and metrics only, and the update stays in the client's session. The
coordinator's :class:`DeployedSecureAggregator` then runs the protocol of
:mod:`confide.privacy.secagg` (the same stages and bytes as in simulation) through a
:class:`GridMessagePath`: each request goes to the client's node as a ``query.secagg``
message, whose handler (:func:`confide.privacy.secagg.flower_stage.handle_secagg_stage`) answers
it with a :class:`~confide.privacy.secagg.protocol.SecAggClient` built for that round and
the client's own contribution. The coordinator learns only the sum (Bell et al. 2020).

Requests and replies travel as byte arrays in an ``ArrayRecord`` (never pickled); a reply
that is not well formed counts as a dropout, which the protocol tolerates up to its threshold.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from flwr.app import RecordDict

from confide.config import Config
from confide.exceptions import ProtocolError, RoundFailedError
from confide.privacy.secagg.aggregator import SecureAggregator
from confide.privacy.secagg.flower_stage import STAGE, pack, unpack
from confide.privacy.secagg.protocol import Contribution, SecAggClient
from confide.privacy.secagg.protocol_server import SecAggServer
from confide.privacy.secagg.transport import MessagePath

if TYPE_CHECKING:
    from confide.server.flower_app import GridExecutor

__all__ = ["GridMessagePath", "DeployedSecureAggregator"]

log = logging.getLogger("confide")



class GridMessagePath(MessagePath):
    """One round's SecAgg+ stages over a :class:`GridExecutor`."""

    def __init__(self, executor: GridExecutor, server_round: int,
                 stage_timeout: float | None = None,
                 advertised: Mapping[int, bytes] | None = None) -> None:
        self.executor = executor
        #: Round 0's replies, when they came with the training replies (see
        #: DeployedSecureAggregator.setup_requests)
        self.advertised = advertised
        self.server_round = server_round
        #: a stage waits this long; clients silent by then dropped out at that stage
        self.stage_timeout = stage_timeout
        #: seconds per client spent waiting for its replies (for the aggregator's report)
        self.seconds: dict[int, float] = {}

    def exchange(self, stage: str, requests: Mapping[int, bytes]) -> dict[int, bytes | None]:
        """Send each request to its client's node; None where no valid reply came back."""
        if stage == "advertise_keys" and self.advertised is not None:
            return {cid: self.advertised.get(cid) for cid in requests}
        t0 = time.perf_counter()
        replies = self.executor.exchange(STAGE, {cid: pack(req) for cid, req in
                                                 requests.items()},
                                         server_round=self.server_round,
                                         timeout=self.stage_timeout)
        elapsed = time.perf_counter() - t0
        out: dict[int, bytes | None] = {}
        for cid in requests:
            reply = replies.get(cid)
            self.seconds[cid] = self.seconds.get(cid, 0.0) + elapsed
            if isinstance(reply, RecordDict):
                try:
                    out[cid] = unpack(reply, f"client {cid}'s {stage} reply")
                    continue
                except ProtocolError as exc:
                    log.warning("%s", exc)
            else:
                log.info("secure aggregation, %s: client %d did not answer (%s)", stage, cid,
                         reply)
            out[cid] = None
        return out


class DeployedSecureAggregator(SecureAggregator):
    """:class:`SecureAggregator` whose stages reach real clients through the Grid.

    The client results it receives carry placeholder (zero) vectors of the right shape; the
    contributions that are summed are built and masked on the clients, with each client's
    example count, step count and loss as extra coordinates: the batch's counts and loss are
    rewritten from those sums (``metadata_from_sum``).
    """

    metadata_from_sum = True

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.executor: GridExecutor | None = None
        self._prepared: tuple[int, SecAggServer] | None = None
        self._advertised_round: int | None = None

    def setup_requests(self, cohort: Sequence[int], server_round: int) -> dict[int, bytes]:
        """Round 0's SETUP for the sampled ``cohort``, to travel with the training tasks.

        Round 0 (AdvertiseKeys, Bonawitz et al. 2017, Sec. 4 and Fig. 4) needs nothing that
        training produces: the coordinator's SETUP names the public parameters and each
        client's neighbours, the client answers with two fresh public keys. Sent with the task
        and answered with the training reply, it saves a whole round trip; the stages, their
        bytes and checks are unchanged, and a client that does not finish training has
        dropped out at ``advertise_keys``, as the protocol allows. An empty dict: no SETUP
        now (too small a cohort; the round then runs all four stages after training).
        """
        self._prepared = None
        if self.executor is None or self.settings.skip_pairwise_masks or self.codec is not None:
            return {}
        n = len(cohort)
        try:
            degree, threshold = self.graph_for(n)
            server = SecAggServer(
                cohort=list(cohort), server_round=server_round, bits=self.settings.bits,
                vector_length=self.vector_length(self.executor.job.num_params,
                                                 len(self.executor.aux_names), n),
                degree=degree, threshold=threshold, max_weight=self.settings.max_weight,
                clipping_range=self.settings.clipping_range, input_mode=self.input_mode)
        except RoundFailedError:
            return {}
        self._prepared = (server_round, server)
        return server.advertise_keys()

    def prepared_server(self, server_round: int,  # noqa: D102
                        reporting: list[int]) -> SecAggServer | None:
        prepared, self._prepared = self._prepared, None  # a SETUP serves one protocol run
        if prepared is None or prepared[0] != server_round \
                or not set(reporting) <= set(prepared[1].cohort):
            return None
        self._advertised_round = server_round
        return prepared[1]

    def message_path(self, clients: dict[int, SecAggClient],  # type: ignore[override]
                     contributions: dict[int, Contribution], drop_after: dict[int, str],
                     server_round: int) -> GridMessagePath:
        """The Grid path (the in-process clients and contributions are not used)."""
        if self.executor is None:
            raise ProtocolError("the deployed secure aggregator has no Grid executor")
        advertised = None
        if self._advertised_round == server_round:
            advertised, self._advertised_round = dict(self.executor.advertised), None
        return GridMessagePath(self.executor, server_round,
                               stage_timeout=self.settings.stage_timeout_s,
                               advertised=advertised)

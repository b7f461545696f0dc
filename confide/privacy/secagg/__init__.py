"""Secure aggregation: SecAgg+ (Bonawitz et al. 2017; Bell et al. 2020) on ``cryptography``.

The coordinator learns only the sum of the cohort's (quantised) contributions, even when
clients drop out mid-protocol, as long as every Shamir threshold holds; otherwise the round
aborts with :class:`~confide.exceptions.RoundFailedError` and no partial sum is released.

Modules, bottom up:

* :mod:`~confide.privacy.secagg.primitives` — X25519, HKDF-SHA256, AES-GCM, the AES-CTR mask
  PRG, Shamir sharing over GF(2^256 + 297); pure, no I/O.
* :mod:`~confide.privacy.secagg.wire` — the byte layout of every message (documented there),
  explicit and length-checked; peer bytes are never unpickled.
* :mod:`~confide.privacy.secagg.graph` — the random Harary neighbourhood graph and the choice
  of its degree and threshold.
* :mod:`~confide.privacy.secagg.quantisation` — clip, weight, scale, stochastic rounding into
  Z_{2^b}, the overflow check, decoding.
* :mod:`~confide.privacy.secagg.protocol` — the named stages ``advertise_keys``,
  ``share_keys``, ``masked_input``, ``unmask``: :class:`SecAggClient` (client side, bytes in
  -> bytes out) and :class:`SecAggServer` (coordinator side, one method per stage).
* :mod:`~confide.privacy.secagg.transport` — :class:`MessagePath` and the in-process path;
  :func:`run_secure_aggregation` drives the stages over any path.
* :mod:`~confide.privacy.secagg.compressed` — what enters the protocol under compression:
  random-k's k shared coordinates, QSGD's weighted codes, or rotated QSGD in a narrow field.
* :mod:`~confide.privacy.secagg.aggregator` — :class:`SecureAggregator`, the
  :class:`~confide.round.Aggregator` that ``secure_aggregation.enabled`` selects.

Driving it over another transport (e.g. Flower's Grid)::

    server = SecAggServer(cohort=node_ids, server_round=rnd, bits=32, vector_length=L,
                          degree=k, threshold=t, max_weight=1000, clipping_range=8.0)
    requests = server.advertise_keys()          # {node_id: bytes}; send, collect replies
    requests = server.share_keys(replies)       # replies: {node_id: bytes or None}
    requests = server.masked_input(replies)
    requests = server.unmask(replies)
    result = server.finish(replies)             # result.words: the modular sum

    # on each client, one SecAggClient per round; reply = client.handle(request, contribution)
"""

from confide.privacy.secagg.protocol import (
    INPUT_FLOATS,
    INPUT_INTEGERS,
    STAGES,
    Contribution,
    SecAggClient,
)
from confide.privacy.secagg.protocol_server import SecAggResult, SecAggServer
from confide.privacy.secagg.transport import (
    InProcessMessagePath,
    MessagePath,
    run_secure_aggregation,
)

__all__ = [
    "STAGES",
    "INPUT_FLOATS",
    "INPUT_INTEGERS",
    "Contribution",
    "SecAggClient",
    "SecAggServer",
    "SecAggResult",
    "MessagePath",
    "InProcessMessagePath",
    "run_secure_aggregation",
]

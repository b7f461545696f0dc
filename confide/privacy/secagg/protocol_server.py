"""SecAgg+'s coordinator side: :class:`SecAggServer` runs the four stages over a cohort.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, Sec. 4 and Fig. 4 (the server's part of Rounds 0-4); Bell et al., "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020 (the neighbourhood
graph). The protocol, its messages and the client side are :mod:`confide.privacy.secagg.protocol`.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from confide.exceptions import ProtocolError, RoundFailedError
from confide.privacy.secagg import primitives as crypto
from confide.privacy.secagg.graph import harary_graph
from confide.privacy.secagg.protocol import (
    _KEY,
    _PURPOSE_MASK,
    _SEED,
    _UNMASK_ENTRY,
    INPUT_FLOATS,
    MIN_CLIENTS,
    _context,
    _reduce,
    _sign,
)
from confide.privacy.secagg.wire import (
    SEALED_SHARE_BYTES,
    SERVER_ID,
    SESSION_BYTES,
    MessageKind,
    SetupBody,
    encode,
    encode_ids,
    open_message,
    packed_size,
    unpack_words,
)

__all__ = ["SecAggServer", "SecAggResult"]

log = logging.getLogger("confide")

@dataclass
class SecAggResult:
    """What the coordinator learns: the modular sum of the included inputs, and who is in it."""

    words: np.ndarray
    included: list[int]
    #: client -> the stage at which it dropped out or was excluded, with the reason
    dropped: dict[int, str] = field(default_factory=dict)
    #: client -> why one of its messages or shares was rejected
    rejected: dict[int, str] = field(default_factory=dict)
    #: client -> bytes the client sent / received over the whole protocol
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)


Replies = Mapping[int, "bytes | None"]


class SecAggServer:
    """The coordinator's side of one round of SecAgg+: one method per stage.

    ``advertise_keys()`` returns the first requests; each later method takes the replies to
    the previous stage and returns the next stage's requests; :meth:`finish` takes the
    replies to ``unmask`` and returns the :class:`SecAggResult`. A reply of ``None`` means
    the client did not answer (it dropped out).
    """

    def __init__(self, *, cohort: Sequence[int], server_round: int, bits: int,
                 vector_length: int, degree: int, threshold: int, max_weight: int = 1,
                 clipping_range: float = 1.0, input_mode: int = INPUT_FLOATS) -> None:
        ids = sorted(int(c) for c in cohort)
        if len(set(ids)) != len(ids) or any(not 0 <= c < SERVER_ID for c in ids):
            raise ValueError("cohort ids must be distinct u64 values")
        if len(ids) < MIN_CLIENTS:
            raise RoundFailedError(f"secure aggregation needs at least {MIN_CLIENTS} live "
                                   f"clients, the round has {len(ids)}")
        self.cohort = ids
        self.server_round = server_round
        self.session = os.urandom(SESSION_BYTES)
        self.graph = harary_graph(ids, degree)
        min_degree = min(len(v) for v in self.graph.values())
        if not 2 <= threshold <= min_degree + 1:  # t counts each client's own share
            raise RoundFailedError(f"threshold {threshold} is not in [2, {min_degree + 1}] for "
                                   f"a neighbourhood of {min_degree} among {len(ids)} live "
                                   "clients")
        self.threshold = threshold
        self.bits = bits
        self.vector_length = vector_length
        self.max_weight = max_weight
        self.clipping_range = clipping_range
        self.input_mode = input_mode
        self.result = SecAggResult(words=np.zeros(0), included=[])
        self._stage = "advertise_keys"
        self._requested: list[int] = []
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._shares_for: dict[int, dict[int, bytes]] = {}
        self._commitments: dict[int, bytes] = {}
        self._mask_sets: dict[int, set[int]] = {}
        self._alive: list[int] = []
        self._dropped_masks: list[int] = []
        self._sum: np.ndarray | None = None
        self._unmask_requests: dict[int, tuple[list[int], list[int]]] = {}

    @property
    def context(self) -> bytes:
        """Session and round, bound into every key and commitment."""
        return _context(self.session, self.server_round)

    # -- helpers
    def _send(self, cid: int, kind: MessageKind, body: bytes) -> bytes:
        msg = encode(kind, session=self.session, server_round=self.server_round,
                     sender=SERVER_ID, recipient=cid, body=body)
        self.result.bytes_received[cid] = self.result.bytes_received.get(cid, 0) + len(msg)
        return msg

    def _collect(self, replies: Replies, stage: str) -> dict[int, bytes]:
        """The replies of the clients asked this stage; the silent ones dropped here."""
        if self._stage != stage:
            raise ProtocolError(f"the coordinator is at stage {self._stage}, not {stage}")
        got = {}
        for cid in self._requested:
            msg = replies.get(cid)
            if msg is None:
                self.result.dropped.setdefault(cid, f"{stage}: no reply")
                continue
            self.result.bytes_sent[cid] = self.result.bytes_sent.get(cid, 0) + len(msg)
            got[cid] = msg
        return got

    def _reject(self, cid: int, stage: str, exc: Exception) -> None:
        log.warning("secure aggregation, round %d: client %d excluded at %s: %s",
                    self.server_round, cid, stage, exc)
        self.result.rejected[cid] = str(exc)
        self.result.dropped.setdefault(cid, f"{stage}: rejected ({exc})")

    def _open(self, msg: bytes, kind: MessageKind, cid: int):  # type: ignore[no-untyped-def]
        return open_message(msg, kind=kind, session=self.session,
                            server_round=self.server_round, sender=cid, recipient=SERVER_ID)

    def _require(self, count: int, what: str, *, live: int | None = None) -> None:
        if count < self.threshold:
            answered = "" if live is None else f" ({live} of {len(self.cohort)} answered)"
            raise RoundFailedError(
                f"secure aggregation, round {self.server_round}: {count} {what}{answered}, "
                f"fewer than the threshold {self.threshold}; the round is aborted and no sum "
                "is released")

    # -- stage 1: advertise keys
    def advertise_keys(self) -> dict[int, bytes]:
        """Requests of stage ``advertise_keys`` (SETUP) to the whole cohort."""
        self._requested = list(self.cohort)
        return {cid: self._send(cid, MessageKind.SETUP, SetupBody(
            threshold=self.threshold, bits=self.bits, input_mode=self.input_mode,
            vector_length=self.vector_length, cohort_size=len(self.cohort),
            max_weight=self.max_weight, clipping_range=self.clipping_range,
            neighbours=self.graph[cid]).encode()) for cid in self.cohort}

    # -- stage 2: share keys
    def share_keys(self, replies: Replies) -> dict[int, bytes]:
        """Collect public keys; send each client its neighbours' keys."""
        keys: dict[int, tuple[bytes, bytes]] = {}
        seen: set[bytes] = set()
        for cid, msg in self._collect(replies, "advertise_keys").items():
            try:
                reader = self._open(msg, MessageKind.ADVERTISE_KEYS, cid)
                enc_pk, mask_pk = reader.raw(crypto.KEY_BYTES), reader.raw(crypto.KEY_BYTES)
                reader.done()
                if enc_pk == mask_pk or enc_pk in seen or mask_pk in seen:
                    raise ProtocolError("its public keys repeat keys already advertised")
            except ProtocolError as exc:
                self._reject(cid, "advertise_keys", exc)
                continue
            seen.update((enc_pk, mask_pk))
            keys[cid] = (enc_pk, mask_pk)
        # A client with fewer than t live neighbours cannot share its secrets; drop it,
        # and repeat, since that shrinks its neighbours' neighbourhoods too.
        live = set(keys)
        while True:
            short = {c for c in live if len(set(self.graph[c]) & live) + 1 < self.threshold}
            if not short:
                break
            for c in short:
                self.result.dropped.setdefault(c, "share_keys: too few neighbours advertised")
            live -= short
        self._require(len(live), "clients advertised keys and have enough live neighbours",
                      live=len(keys))
        self._keys = {c: keys[c] for c in sorted(live)}
        self._requested = sorted(live)
        self._stage = "share_keys"
        requests = {}
        for cid in self._requested:
            peers = [p for p in self.graph[cid] if p in live]
            body = struct.pack(">I", len(peers)) + b"".join(
                p.to_bytes(8, "big") + self._keys[p][0] + self._keys[p][1] for p in peers)
            requests[cid] = self._send(cid, MessageKind.SHARE_KEYS_REQUEST, body)
        return requests

    # -- stage 3: masked input
    def masked_input(self, replies: Replies) -> dict[int, bytes]:
        """Collect sealed shares; forward each client the shares addressed to it."""
        live = set(self._requested)
        sealed: dict[int, dict[int, bytes]] = {}
        for cid, msg in self._collect(replies, "share_keys").items():
            try:
                reader = self._open(msg, MessageKind.SHARE_KEYS, cid)
                commitment = reader.raw(32)
                expected = {p for p in self.graph[cid] if p in live}
                n = reader.count(limit=len(expected), item_bytes=8 + SEALED_SHARE_BYTES,
                                 what="sealed shares")
                out: dict[int, bytes] = {}
                for _ in range(n):
                    recipient, blob = reader.u64(), reader.raw(SEALED_SHARE_BYTES)
                    if recipient not in expected or recipient in out:
                        raise ProtocolError(f"a sealed share for {recipient}, not a live "
                                            "neighbour (or twice)")
                    out[recipient] = blob
                reader.done()
                if set(out) != expected:
                    raise ProtocolError(f"shares for {len(out)} of its {len(expected)} live "
                                        "neighbours")
            except ProtocolError as exc:
                self._reject(cid, "share_keys", exc)
                continue
            sealed[cid] = out
            self._commitments[cid] = commitment
        self._require(len(sealed), "clients shared their keys")
        self._requested = sorted(sealed)
        self._stage = "masked_input"
        requests = {}
        for cid in self._requested:
            senders = [p for p in self.graph[cid] if p in sealed]
            self._shares_for[cid] = {p: sealed[p][cid] for p in senders}
            body = struct.pack(">I", len(senders)) + b"".join(
                p.to_bytes(8, "big") + sealed[p][cid] for p in senders)
            requests[cid] = self._send(cid, MessageKind.MASKED_INPUT_REQUEST, body)
        return requests

    # -- stage 4: unmask
    def unmask(self, replies: Replies) -> dict[int, bytes]:
        """Collect masked inputs; ask survivors for the shares that remove the masks."""
        vector_bytes = packed_size(self.vector_length, self.bits)
        parsed: dict[int, tuple[set[int], memoryview]] = {}
        for cid, msg in self._collect(replies, "masked_input").items():
            try:
                reader = self._open(msg, MessageKind.MASKED_INPUT, cid)
                forwarded = self._shares_for[cid]
                rejected = reader.ids(limit=len(forwarded), what="rejected senders")
                if not set(rejected) <= set(forwarded):
                    raise ProtocolError("it rejects shares it was never sent")
                if reader.remaining() != vector_bytes:
                    size = "truncated" if reader.remaining() < vector_bytes else "oversized"
                    raise ProtocolError(f"masked input {size}: {reader.remaining()} vector "
                                        f"bytes, expected {vector_bytes}")
                vector = reader.body[reader.offset:]
            except ProtocolError as exc:
                self._reject(cid, "masked_input", exc)
                continue
            parsed[cid] = (set(rejected), vector)
        # A sealed share that failed authentication excludes its sender (Bonawitz et al.
        # 2017, §4: a client that cannot be trusted to have shared correctly is treated as
        # dropped; its pairwise masks are removed via its mask key, its input is not summed).
        bad: dict[int, list[int]] = {}
        for cid, (rejected, _) in parsed.items():
            for sender in rejected:
                bad.setdefault(sender, []).append(cid)
        for sender, by in bad.items():
            self._reject(sender, "masked_input", ProtocolError(
                f"its sealed share failed authentication at client(s) {sorted(by)[:5]}"))
        alive = sorted(c for c in parsed if c not in bad)
        self._require(len(alive), "masked inputs survived")
        acc = np.zeros(self.vector_length, dtype=crypto.mask_dtype(self.bits))
        for cid in alive:
            try:
                np.add(acc, unpack_words(parsed[cid][1], self.vector_length, self.bits),
                       out=acc)
            except ProtocolError as exc:  # padding bits: the input cannot be trusted
                raise RoundFailedError(f"secure aggregation, round {self.server_round}: client "
                                       f"{cid}'s masked input is malformed ({exc}); the round "
                                       "is aborted and no sum is released") from None
        self._sum = acc
        self._mask_sets = {cid: set(self._shares_for[cid]) - parsed[cid][0] for cid in alive}
        alive_set = set(alive)
        shared = set(self._shares_for)
        self._dropped_masks = sorted(
            u for u in shared - alive_set if any(u in self._mask_sets[w] for w in alive))
        self._alive = alive
        dropped_set = set(self._dropped_masks)
        self._requested = alive
        self._stage = "unmask"
        requests = {}
        for cid in alive:
            m = self._mask_sets[cid]
            ask_alive = sorted((m & alive_set) | {cid})  # its own share of b too
            ask_dropped = sorted(m & dropped_set)
            self._unmask_requests[cid] = (ask_alive, ask_dropped)
            body = encode_ids(ask_alive) + encode_ids(ask_dropped)
            requests[cid] = self._send(cid, MessageKind.UNMASK_REQUEST, body)
        return requests

    # -- the end: reconstruct and strip the masks
    def finish(self, replies: Replies) -> SecAggResult:
        """Collect shares, reconstruct seeds and keys, return the unmasked sum."""
        seed_shares: dict[int, dict[int, int]] = {u: {} for u in self._alive}
        key_shares: dict[int, dict[int, int]] = {u: {} for u in self._dropped_masks}
        for cid, msg in self._collect(replies, "unmask").items():
            ask_alive, ask_dropped = self._unmask_requests[cid]
            try:
                reader = self._open(msg, MessageKind.UNMASK, cid)
                want = {(u, _SEED) for u in ask_alive} | {(u, _KEY) for u in ask_dropped}
                n = reader.count(limit=len(want), item_bytes=_UNMASK_ENTRY, what="shares")
                got: dict[tuple[int, int], int] = {}
                for _ in range(n):
                    owner, kind = reader.u64(), reader.u8()
                    value = int.from_bytes(reader.raw(crypto.SHARE_BYTES), "big")
                    if (owner, kind) not in want or (owner, kind) in got:
                        raise ProtocolError(f"a share of client {owner} it was not asked for")
                    if value >= crypto.FIELD_PRIME:
                        raise ProtocolError("a share is not a field element")
                    got[(owner, kind)] = value
                reader.done()
                if len(got) != len(want):
                    raise ProtocolError(f"{len(got)} of the {len(want)} shares asked for")
            except ProtocolError as exc:
                self._reject(cid, "unmask", exc)
                continue
            for (owner, kind), value in got.items():
                (seed_shares if kind == _SEED else key_shares)[owner][cid] = value
        if self._sum is None:
            raise ProtocolError("finish() before the masked inputs arrived")
        acc = self._sum
        ctx = self.context
        for u in self._alive:
            seed = self._reconstruct(u, seed_shares[u], "self-mask seed",
                                     lambda s, u=u: crypto.commit_seed(s, ctx)
                                     == self._commitments[u])
            crypto.add_mask(acc, seed, self.bits, sign=-1)
        for u in self._dropped_masks:
            mask_pk = self._keys[u][1]
            mask_sk = crypto.load_private(self._reconstruct(
                u, key_shares[u], "mask key", lambda s, pk=mask_pk: crypto.public_key_of(s) == pk))
            for w in self._alive:
                if u not in self._mask_sets[w]:
                    continue
                shared = crypto.agree(mask_sk, self._keys[w][1])
                seed = crypto.derive_key(shared, context=ctx, purpose=_PURPOSE_MASK,
                                         first=min(u, w), second=max(u, w))
                # w added sign(w, u) * PRG(s_wu); take it away.
                crypto.add_mask(acc, seed, self.bits, sign=-_sign(w, u))
        self._stage = "done"
        self._sum = None
        self.result.words = _reduce(acc, self.bits)
        self.result.included = list(self._alive)
        return self.result

    def _reconstruct(self, owner: int, shares: Mapping[int, int], what: str,
                     verify: object) -> bytes:
        if len(shares) < self.threshold:
            raise RoundFailedError(
                f"secure aggregation, round {self.server_round}: only {len(shares)} of client "
                f"{owner}'s neighbours returned shares of its {what}, fewer than the threshold "
                f"{self.threshold}; the round is aborted and no sum is released")
        try:
            secret, wrong = crypto.reconstruct_secret(shares, threshold=self.threshold,
                                                      verify=verify)  # type: ignore[arg-type]
        except ProtocolError as exc:
            raise RoundFailedError(f"secure aggregation, round {self.server_round}: the "
                                   f"{what} of client {owner} cannot be reconstructed ({exc}); "
                                   "the round is aborted and no sum is released") from None
        for holder in wrong:
            self._reject(holder, "unmask", ProtocolError(
                f"it returned a wrong share of client {owner}'s {what}"))
        return secret

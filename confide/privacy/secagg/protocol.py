"""SecAgg+ as explicit, named, pure protocol stages, separate from any transport.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS, §4 and Fig. 4, the semi-honest protocol) with the neighbourhood graph of
Bell et al. 2020 (CCS, §3): each client agrees masks with and secret-shares its seeds among
only its graph neighbours. Four stages, each one request from the coordinator to every
client still in the round and one reply back (formats: :mod:`confide.privacy.secagg.wire`):

``advertise_keys``
    The coordinator sends the public parameters and the client's neighbours (SETUP). Each
    client draws two fresh X25519 key pairs, ``c`` (share channel) and ``s`` (masks), and
    replies with the public halves. [Bonawitz §4, Round 0]
``share_keys``
    The coordinator forwards to each client the keys of its neighbours that answered. The
    client draws a self-mask seed ``b``, Shamir-shares ``b`` and its mask private key ``s_sk``
    among those neighbours and itself (threshold ``t``; it keeps its own share, Bonawitz
    Fig. 4, so ``t`` survivors counting itself suffice), seals each neighbour's pair of shares with
    AES-GCM under a key from X25519(c) + HKDF, and sends the sealed shares plus a SHA-256
    commitment to ``b``. [Round 1]
``masked_input``
    The coordinator forwards to each client the sealed shares addressed to it. The client
    opens them (a share that fails authentication is *rejected* and reported), then sends
    ``y = x + PRG(b) + sum_{v in M} sign(u, v) * PRG(s_uv)`` mod 2^b, ``M`` the neighbours
    whose shares it accepted and ``s_uv`` the HKDF of their X25519(s) agreement
    (sign +1 if u < v, else -1, so the pair's masks cancel). [Round 2]
``unmask``
    The coordinator tells each surviving client which of its neighbours' inputs are in the
    sum (alive) and which neighbours dropped after sharing keys. The client returns its
    shares of ``b`` for the alive (its own included) and of ``s_sk`` for the dropped, never
    both for one client (the invariant that protects every input). The coordinator
    reconstructs the seeds, checks them against the commitments and public keys, strips the
    self masks of the alive and the pairwise masks the alive shared with the dropped, and
    obtains exactly ``sum_{alive} x`` mod 2^b. [Rounds 3-4]

The coordinator's side is :class:`SecAggServer`, one method per stage; the client's is
:class:`SecAggClient`, one method per stage (or :meth:`SecAggClient.handle`, which dispatches
on the message kind). Both consume and produce bytes only, so any message path carries them:
in process (simulation), or Flower's Grid (deployment).

Failure handling. A client that does not answer a stage has dropped at that stage. A reply
that is truncated, oversized, malformed, replayed from another round, or addressed wrongly is
rejected with a :class:`ProtocolError` naming the client; that client is treated as dropped.
A client whose sealed share fails authentication at a neighbour is excluded the same way.
The round goes on while every threshold holds; otherwise it raises :class:`RoundFailedError`
and no partial sum is released.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from dataclasses import dataclass

import numpy as np

from confide.exceptions import ConfigError, ProtocolError
from confide.privacy.secagg import primitives as crypto
from confide.privacy.secagg.metadata import META_FIELDS, encode_meta, meta_scale
from confide.privacy.secagg.quantisation import Quantiser, check_capacity
from confide.privacy.secagg.wire import (
    SEALED_SHARE_BYTES,
    SERVER_ID,
    MessageKind,
    SetupBody,
    decode_header,
    decode_share_plaintext,
    encode,
    encode_ids,
    encode_share_plaintext,
    open_message,
    pack_words,
    share_associated_data,
)

__all__ = [
    "STAGES",
    "META_FIELDS",
    "encode_meta",
    "meta_scale",
    "INPUT_FLOATS",
    "INPUT_INTEGERS",
    "Contribution",
    "SecAggClient",
]

log = logging.getLogger("confide")

#: the protocol's stages, in order
STAGES = ("advertise_keys", "share_keys", "masked_input", "unmask")
#: the client quantises float vectors itself (:mod:`~confide.privacy.secagg.quantisation`)
INPUT_FLOATS = 0
#: the client's input is already in Z_{2^b} (distributed DP encodes before masking)
INPUT_INTEGERS = 1

_SEED, _KEY = 0, 1
#: the fewest live clients a round runs with. Two is the least with which the coordinator
#: learns a sum rather than an input (t >= 2, so no lone input is ever unmasked). At n = 2 each
#: client can subtract its own input from the released sum and learn the other's: Bonawitz
#: et al. 2017's model protects inputs from the coordinator (and from up to t - 1 colluders),
#: not a client from the aggregate it receives, so n = 2 is within the model; operators who
#: want more run with cohort.min_clients >= 3 (and central or distributed DP noise blurs
#: what the aggregate reveals).
MIN_CLIENTS = 2
_UNMASK_ENTRY = 8 + 1 + crypto.SHARE_BYTES
_PURPOSE_MASK = b"pairwise-mask"
_PURPOSE_CHANNEL = b"share-channel"


def _context(session: bytes, server_round: int) -> bytes:
    return session + server_round.to_bytes(4, "big")


def _sign(me: int, other: int) -> int:
    # Bonawitz et al. 2017, §4: p_{u,v} = Delta_{u,v} * PRG(s_{u,v}), Delta = +1 iff u < v.
    return 1 if me < other else -1


@dataclass
class Contribution:
    """What one client adds to the sum.

    ``update`` and ``aux`` are float vectors with an integer ``weight`` (input mode floats),
    or ``update`` holds entries of Z_{2^b} already (input mode integers, ``weight`` is 1).
    """

    update: np.ndarray
    weight: int = 1
    aux: tuple[np.ndarray, ...] = ()
    #: the round's metadata, summed inside the masked vector so the coordinator learns only
    #: sums: ``(examples, steps, train_loss)`` (:data:`META_FIELDS`); empty: none
    meta: tuple[float, ...] = ()



# --------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of one round of SecAgg+; holds its secrets for that round only.

    Create one per round. ``server_round``, when given, must match the SETUP message;
    ``rng`` drives stochastic rounding only (never any secret, which come from the OS).
    """

    def __init__(self, client_id: int, *, server_round: int | None = None,
                 rng: np.random.Generator | None = None) -> None:
        if not 0 <= client_id < SERVER_ID:
            raise ValueError(f"client id {client_id} out of range")
        self.client_id = client_id
        self.expected_round = server_round
        self.rng = rng if rng is not None else np.random.default_rng(
            int.from_bytes(os.urandom(16), "big"))
        self._next = MessageKind.SETUP
        self.setup: SetupBody | None = None
        self.session = b""
        self.server_round = 0
        self._enc_sk = self._mask_sk = b""
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._inbound: dict[int, bytes] = {}
        self._own_public: tuple[bytes, bytes] = (b"", b"")
        self._held: dict[int, tuple[int, int]] = {}
        self._seed = b""
        self._own_share = (0, 0)
        self._done = False

    # -- helpers
    def _open(self, message: bytes, kind: MessageKind):  # type: ignore[no-untyped-def]
        if kind != self._next:
            got = decode_header(message).kind
            raise ProtocolError(f"client {self.client_id}: expected a {self._next.name} "
                                f"message, got {got.name} (out of order or replayed)")
        return open_message(message, kind=kind, session=self.session,
                            server_round=self.server_round, sender=SERVER_ID,
                            recipient=self.client_id)

    def _reply(self, kind: MessageKind, body: bytes) -> bytes:
        return encode(kind, session=self.session, server_round=self.server_round,
                      sender=self.client_id, recipient=SERVER_ID, body=body)

    @property
    def _ctx(self) -> bytes:
        return _context(self.session, self.server_round)

    def handle(self, message: bytes, contribution: Contribution | None = None) -> bytes:
        """Answer any stage's request (dispatch on the message kind)."""
        kind = decode_header(message).kind
        if kind == MessageKind.SETUP:
            return self.advertise_keys(message)
        if kind == MessageKind.SHARE_KEYS_REQUEST:
            return self.share_keys(message)
        if kind == MessageKind.MASKED_INPUT_REQUEST:
            if contribution is None:
                raise ProtocolError(f"client {self.client_id} has no input for masked_input")
            return self.masked_input(message, contribution)
        if kind == MessageKind.UNMASK_REQUEST:
            return self.unmask(message)
        raise ProtocolError(f"client {self.client_id}: {kind.name} is not a request")

    # -- stage 1
    def advertise_keys(self, message: bytes) -> bytes:
        """SETUP -> ADVERTISE_KEYS: fresh key pairs for this round."""
        if self._next != MessageKind.SETUP or self._done:
            raise ProtocolError(f"client {self.client_id}: a second SETUP in one round (a "
                                "SecAggClient serves one round)")
        header = decode_header(message)
        if self.expected_round is not None and header.server_round != self.expected_round:
            raise ProtocolError(f"client {self.client_id}: SETUP for round "
                                f"{header.server_round} in round {self.expected_round} "
                                "(replayed)")
        if header.sender != SERVER_ID or header.recipient != self.client_id:
            raise ProtocolError(f"client {self.client_id}: SETUP not from the coordinator to "
                                "this client")
        self.session, self.server_round = header.session, header.server_round
        setup = SetupBody.decode(self._open(message, MessageKind.SETUP))
        _check_setup(setup, self.client_id)
        self.setup = setup
        self._enc_sk, enc_pk = crypto.generate_keypair()
        self._mask_sk, mask_pk = crypto.generate_keypair()
        self._own_public = (enc_pk, mask_pk)
        self._next = MessageKind.SHARE_KEYS_REQUEST
        return self._reply(MessageKind.ADVERTISE_KEYS, enc_pk + mask_pk)

    # -- stage 2
    def share_keys(self, message: bytes) -> bytes:
        """SHARE_KEYS_REQUEST -> SHARE_KEYS: sealed shares of ``b`` and ``s_sk``."""
        reader = self._open(message, MessageKind.SHARE_KEYS_REQUEST)
        setup = self._setup()
        n = reader.count(limit=len(setup.neighbours), item_bytes=8 + 2 * crypto.KEY_BYTES,
                         what="neighbour keys")
        neighbours = set(setup.neighbours)
        peers: dict[int, tuple[bytes, bytes]] = {}
        for _ in range(n):
            peer, enc_pk, mask_pk = reader.u64(), reader.raw(32), reader.raw(32)
            if peer not in neighbours or peer in peers:
                raise ProtocolError(f"client {self.client_id}: keys offered for {peer}, not a "
                                    "(new) neighbour")
            peers[peer] = (enc_pk, mask_pk)
        reader.done()
        keys = [k for pair in peers.values() for k in pair]
        if len(set(keys)) != len(keys) or set(self._own_public) & set(keys):
            raise ProtocolError(f"client {self.client_id}: neighbours' public keys repeat")
        # The client holds one share of its own secrets (Bonawitz et al. 2017, Fig. 4, Round
        # 1: shares for every v in U_1, u included), so t counts it: t - 1 neighbours suffice.
        if len(peers) + 1 < setup.threshold:
            raise ProtocolError(f"client {self.client_id}: only {len(peers)} neighbours "
                                f"advertised keys, too few for threshold {setup.threshold} "
                                "(counting this client's own share)")
        self._peers = peers
        enc_key = crypto.load_private(self._enc_sk)
        shared = {peer: crypto.agree(enc_key, peers[peer][0]) for peer in peers}
        # one-way keys: this client -> peer seals, peer -> this client opens
        self._inbound = {peer: self._channel_key(s, sender=peer, recipient=self.client_id)
                         for peer, s in shared.items()}
        self._seed = crypto.new_seed()
        holders = sorted([*peers, self.client_id])
        seed_shares = crypto.split_secret(self._seed, threshold=setup.threshold, holders=holders)
        key_shares = crypto.split_secret(self._mask_sk, threshold=setup.threshold,
                                         holders=holders)
        # Its own share stays here; only the share of b is ever sent, and only in unmask.
        self._own_share = (seed_shares.pop(self.client_id), key_shares.pop(self.client_id))
        holders.remove(self.client_id)
        parts = [crypto.commit_seed(self._seed, self._ctx), struct.pack(">I", len(holders))]
        for peer in holders:
            key = self._channel_key(shared[peer], sender=self.client_id, recipient=peer)
            plaintext = encode_share_plaintext(self.client_id, peer, seed_shares[peer],
                                               key_shares[peer])
            ad = share_associated_data(self.session, self.server_round, self.client_id, peer)
            parts += [peer.to_bytes(8, "big"), crypto.encrypt(key, plaintext, ad)]
        self._next = MessageKind.MASKED_INPUT_REQUEST
        return self._reply(MessageKind.SHARE_KEYS, b"".join(parts))

    def _channel_key(self, shared: bytes, *, sender: int, recipient: int) -> bytes:
        return crypto.derive_key(shared, context=self._ctx, purpose=_PURPOSE_CHANNEL,
                                 first=sender, second=recipient)

    # -- stage 3
    def masked_input(self, message: bytes, contribution: Contribution) -> bytes:
        """MASKED_INPUT_REQUEST -> MASKED_INPUT: open shares, send the masked vector."""
        reader = self._open(message, MessageKind.MASKED_INPUT_REQUEST)
        setup = self._setup()
        n = reader.count(limit=len(self._peers), item_bytes=8 + SEALED_SHARE_BYTES,
                         what="sealed shares")
        rejected: list[int] = []
        held: dict[int, tuple[int, int]] = {}
        seen: set[int] = set()
        for _ in range(n):
            sender, sealed = reader.u64(), reader.raw(SEALED_SHARE_BYTES)
            if sender not in self._peers or sender in seen:
                raise ProtocolError(f"client {self.client_id}: a share from {sender}, not a "
                                    "neighbour that shared keys (or twice)")
            seen.add(sender)
            try:
                key = self._inbound[sender]
                ad = share_associated_data(self.session, self.server_round, sender,
                                           self.client_id)
                src, dst, seed_share, key_share = decode_share_plaintext(
                    crypto.decrypt(key, sealed, ad))
                if (src, dst) != (sender, self.client_id):
                    raise ProtocolError("the share names other parties than its envelope")
                if seed_share >= crypto.FIELD_PRIME or key_share >= crypto.FIELD_PRIME:
                    raise ProtocolError("a share is not a field element")
            except ProtocolError as exc:
                log.warning("client %d rejects the share of client %d: %s", self.client_id,
                            sender, exc)
                rejected.append(sender)
                continue
            held[sender] = (seed_share, key_share)
        reader.done()
        if len(held) + 1 < setup.threshold:
            raise ProtocolError(f"client {self.client_id}: only {len(held)} neighbours' shares "
                                f"arrived intact, too few for threshold {setup.threshold}; "
                                "refusing to send an input that could be unmasked alone")
        self._held = {**held, self.client_id: self._own_share}
        words = self._encode(contribution, setup)
        bits = setup.bits
        crypto.add_mask(words, self._seed, bits, sign=+1)
        mask_key = crypto.load_private(self._mask_sk)
        for peer in sorted(held):  # the pairwise masks: neighbours only, never itself
            shared = crypto.agree(mask_key, self._peers[peer][1])
            seed = crypto.derive_key(shared, context=self._ctx, purpose=_PURPOSE_MASK,
                                     first=min(self.client_id, peer),
                                     second=max(self.client_id, peer))
            crypto.add_mask(words, seed, bits, sign=_sign(self.client_id, peer))
        body = encode_ids(sorted(rejected)) + pack_words(_reduce(words, bits), bits)
        self._next = MessageKind.UNMASK_REQUEST
        return self._reply(MessageKind.MASKED_INPUT, body)

    def _encode(self, contribution: Contribution, setup: SetupBody) -> np.ndarray:
        dtype = crypto.mask_dtype(setup.bits)
        if setup.input_mode == INPUT_INTEGERS:
            values = np.asarray(contribution.update)
            if values.ndim != 1:
                raise ProtocolError(f"client {self.client_id}: an encoded input must be flat")
            if (not np.issubdtype(values.dtype, np.integer) and
                    not np.array_equal(values, np.floor(values))):
                raise ProtocolError(f"client {self.client_id}: an encoded input must be integer")
            ints = np.mod(values.astype(np.int64), 1 << setup.bits)
            meta = self._meta(contribution, setup, levels=(2 ** (setup.bits - 1) - 1)
                              // setup.cohort_size)
            if values.size + 1 + meta.size != setup.vector_length:
                raise ProtocolError(f"client {self.client_id}: an encoded input has "
                                    f"{values.size} entries, expected "
                                    f"{setup.vector_length - 1 - meta.size}")
            out = np.empty(setup.vector_length, dtype=dtype)
            out[:values.size] = ints
            out[values.size] = contribution.weight
            out[values.size + 1:] = meta
            return out
        quantiser = Quantiser(bits=setup.bits, clipping_range=setup.clipping_range,
                              max_weight=setup.max_weight, cohort_size=setup.cohort_size)
        words = quantiser.encode(np.asarray(contribution.update), contribution.weight,
                                 [np.asarray(a) for a in contribution.aux], self.rng)
        meta = self._meta(contribution, setup, levels=quantiser.levels)
        if meta.size:
            words = np.concatenate([words, quantiser.embed(meta)])
        if words.shape[0] != setup.vector_length:
            raise ProtocolError(f"client {self.client_id}: its contribution has "
                                f"{words.shape[0]} entries, the round expects "
                                f"{setup.vector_length}")
        return words

    def _meta(self, contribution: Contribution, setup: SetupBody, *,
              levels: int) -> np.ndarray:
        if not contribution.meta:
            return np.zeros(0, dtype=np.int64)
        return encode_meta(contribution.meta, levels=levels, max_weight=setup.max_weight,
                           rng=self.rng)

    # -- stage 4
    def unmask(self, message: bytes) -> bytes:
        """UNMASK_REQUEST -> UNMASK: shares of ``b`` for the alive, of ``s_sk`` for the dropped."""
        reader = self._open(message, MessageKind.UNMASK_REQUEST)
        setup = self._setup()
        alive = reader.ids(limit=len(self._held), what="alive neighbours")
        dropped = reader.ids(limit=len(self._held), what="dropped neighbours")
        reader.done()
        # Bonawitz et al. 2017, §4 Round 4: never reveal both shares of one client.
        if set(alive) & set(dropped) or self.client_id in dropped:
            raise ProtocolError(f"client {self.client_id}: the coordinator asked for both "
                                "shares of one client; refusing")
        unknown = (set(alive) | set(dropped)) - set(self._held)
        if unknown:
            raise ProtocolError(f"client {self.client_id}: asked for shares it does not hold "
                                f"(clients {sorted(unknown)[:5]})")
        survivors = len(set(alive) | {self.client_id})
        if survivors < setup.threshold:
            raise ProtocolError(f"client {self.client_id}: only {survivors} clients (itself "
                                f"included) are said to be alive, fewer than the threshold "
                                f"{setup.threshold}")
        parts = [struct.pack(">I", len(alive) + len(dropped))]
        for owner in alive:
            parts.append(owner.to_bytes(8, "big") + bytes([_SEED])
                         + self._held[owner][0].to_bytes(crypto.SHARE_BYTES, "big"))
        for owner in dropped:
            parts.append(owner.to_bytes(8, "big") + bytes([_KEY])
                         + self._held[owner][1].to_bytes(crypto.SHARE_BYTES, "big"))
        self._next = MessageKind.SETUP  # never accepted again: a new round, a new client
        self._done = True
        self._seed = self._mask_sk = self._enc_sk = b""
        self._held, self._inbound = {}, {}
        self._own_share = (0, 0)
        return self._reply(MessageKind.UNMASK, b"".join(parts))

    def _setup(self) -> SetupBody:
        if self.setup is None or self._done:
            raise ProtocolError(f"client {self.client_id}: no round in progress")
        return self.setup


def _reduce(words: np.ndarray, bits: int) -> np.ndarray:
    if bits % (8 * words.dtype.itemsize):
        words &= words.dtype.type((1 << bits) - 1)
    return words


def _check_setup(setup: SetupBody, client_id: int) -> None:
    """Refuse public parameters that would void the protocol's guarantees."""
    k = len(setup.neighbours)
    problems = []
    if client_id in setup.neighbours:
        problems.append("the client is its own neighbour")
    if not 2 <= setup.threshold <= k + 1:  # k neighbours' shares plus the client's own
        problems.append(f"threshold {setup.threshold} is not in [2, {k + 1}] for {k} "
                        "neighbours")
    if not 8 <= setup.bits <= 62:
        problems.append(f"bit width {setup.bits} is not in [8, 62]")
    if setup.input_mode not in (INPUT_FLOATS, INPUT_INTEGERS):
        problems.append(f"unknown input mode {setup.input_mode}")
    if setup.vector_length < 1:
        problems.append("the vector is empty")
    if setup.cohort_size < k + 1:
        problems.append(f"cohort size {setup.cohort_size} is below the neighbourhood")
    if not (math.isfinite(setup.clipping_range) and setup.clipping_range > 0):
        problems.append("the clipping range is not a positive number")
    if setup.max_weight < 1:
        problems.append("max_weight is below 1")
    if not problems and setup.input_mode == INPUT_FLOATS:
        try:
            check_capacity(cohort_size=setup.cohort_size, bits=setup.bits,
                           max_weight=setup.max_weight)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ProtocolError(f"client {client_id}: unacceptable SETUP: {'; '.join(problems)}")


# --------------------------------------------------------------------------- server

"""Cryptographic primitives of secure aggregation, on ``cryptography`` only; pure, no I/O.

* X25519 key agreement (RFC 7748) for the two per-round key pairs of every client
  (Bonawitz et al. 2017, §4 "AdvertiseKeys": ``c`` for the share channel, ``s`` for masks).
* HKDF-SHA256 (RFC 5869) turns every shared secret into a key bound to the round's context
  (run session, round number, the pair of clients, the purpose and the direction).
* AES-256-GCM (NIST SP 800-38D) encrypts the Shamir shares that travel client -> client
  through the coordinator (Bonawitz et al. 2017, §4 "ShareKeys"); its tag authenticates them.
* A PRG: AES-256-CTR keyed by the full 256-bit seed, its keystream read straight as a vector
  of words mod 2^b (Bonawitz et al. 2017, §3 "PRG"). Every word is uniform mod 2^32 (or
  2^64) and 2^b divides that, so every entry is exactly uniform in Z_{2^b}.
* Shamir t-out-of-n secret sharing (Shamir 1979) over the prime field GF(2^256 + 297), large
  enough for 256-bit secrets (seeds and X25519 private keys) without splitting them.

Secrets come from ``os.urandom``/``secrets`` and are never seeded.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from confide.exceptions import ProtocolError

__all__ = [
    "KEY_BYTES",
    "SEED_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "FIELD_PRIME",
    "SHARE_BYTES",
    "generate_keypair",
    "public_key_of",
    "agree",
    "load_private",
    "derive_key",
    "encrypt",
    "decrypt",
    "new_seed",
    "commit_seed",
    "mask_dtype",
    "expand_mask",
    "add_mask",
    "split_secret",
    "interpolate_at",
    "reconstruct_secret",
]

#: X25519 public/private keys and every derived key: 32 bytes
KEY_BYTES = 32
#: mask seeds are full 256-bit AES keys
SEED_BYTES = 32
#: AES-GCM nonce (96 bits, SP 800-38D §8.2) and tag (128 bits)
NONCE_BYTES = 12
TAG_BYTES = 16
#: the smallest prime above 2^256, so any 32-byte secret is a field element
FIELD_PRIME = 2**256 + 297
#: a field element on the wire: 33 bytes, big-endian
SHARE_BYTES = 33

_HKDF_LABEL = b"confide-secagg/v1"


# --------------------------------------------------------------------------- X25519


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes ``(private, public)`` (RFC 7748 §6.1)."""
    private = X25519PrivateKey.generate()  # os.urandom inside OpenSSL; never seeded
    return _raw_private(private), _raw_public(private.public_key())


def public_key_of(private: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    if len(private) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(private)}")
    return _raw_public(X25519PrivateKey.from_private_bytes(private).public_key())


def agree(private: bytes | X25519PrivateKey, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``private`` (raw bytes or a loaded key) and ``peer_public``.

    A peer key of the wrong length or of small order (the all-zero shared secret, RFC 7748
    §6.1) is a :class:`ProtocolError`: a client offering it would make its masks predictable.
    """
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(f"an X25519 public key has {KEY_BYTES} bytes, got {len(peer_public)}")
    key = (private if isinstance(private, X25519PrivateKey)
           else X25519PrivateKey.from_private_bytes(private))
    try:
        return key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ProtocolError("X25519 key agreement failed: the peer's public key has small "
                            "order") from None


def load_private(private: bytes) -> X25519PrivateKey:
    """A loaded X25519 private key (load once, agree many times)."""
    if len(private) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key has {KEY_BYTES} bytes, got {len(private)}")
    return X25519PrivateKey.from_private_bytes(private)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --------------------------------------------------------------------------- HKDF


def derive_key(shared_secret: bytes, *, context: bytes, purpose: bytes, first: int,
               second: int) -> bytes:
    """A 32-byte key from an X25519 shared secret, bound to its use (RFC 5869, HKDF-SHA256).

    ``info`` carries the round ``context`` (session id and round number), the ``purpose``
    (pairwise mask, or the share channel) and the two client ids, so a key never serves two
    rounds, two purposes or two pairs. Callers pass ``(min, max)`` for a symmetric key and
    ``(sender, recipient)`` for a one-way key.
    """
    info = b"|".join([_HKDF_LABEL, purpose, context, first.to_bytes(8, "big"),
                      second.to_bytes(8, "big")])
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=info).derive(shared_secret)


# --------------------------------------------------------------------------- AES-GCM


def encrypt(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag`` with a random 96-bit nonce."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, sealed: bytes, associated_data: bytes) -> bytes:
    """Open what :func:`encrypt` sealed; a wrong key, context or any flipped bit is rejected."""
    if len(sealed) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError("an encrypted share is truncated")
    try:
        return AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise ProtocolError("an encrypted share failed authentication (AES-GCM tag mismatch: "
                            "tampered, replayed or sent under another round's keys)") from None


# --------------------------------------------------------------------------- PRG


def new_seed() -> bytes:
    """A fresh 256-bit mask seed from the operating system's CSPRNG."""
    return os.urandom(SEED_BYTES)


def commit_seed(seed: bytes, context: bytes) -> bytes:
    """A SHA-256 commitment to a self-mask seed; lets the coordinator verify reconstruction."""
    return hashlib.sha256(b"|".join([_HKDF_LABEL, b"self-mask-commitment", context,
                                     seed])).digest()


def mask_dtype(bits: int) -> type[np.unsignedinteger]:
    """The unsigned word type that holds Z_{2^bits} and wraps modulo a multiple of 2^bits."""
    return np.uint32 if bits <= 32 else np.uint64


_ZERO_IV = bytes(16)


def _keystream(seed: bytes, length: int, bits: int) -> np.ndarray:
    """AES-256-CTR keystream under ``seed`` (counter from zero) as ``length`` little-endian
    words, read-only.
    """
    if len(seed) != SEED_BYTES:
        raise ProtocolError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    dtype = np.dtype(mask_dtype(bits)).newbyteorder("<")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()
    return np.frombuffer(encryptor.update(bytes(length * dtype.itemsize)), dtype=dtype)


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` uniform entries of Z_{2^bits} from the 256-bit ``seed`` (AES-256-CTR).

    The counter starts at zero: every seed is used for exactly one vector (self-mask seeds are
    fresh per round; pairwise seeds are HKDF outputs bound to the round and the pair).
    """
    dtype = mask_dtype(bits)
    words = _keystream(seed, length, bits).astype(dtype)
    if bits % (8 * np.dtype(dtype).itemsize):
        words &= dtype((1 << bits) - 1)
    return words


def add_mask(acc: np.ndarray, seed: bytes, bits: int, *, sign: int) -> None:
    """``acc += sign * PRG(seed)`` in place, modulo the word size (a multiple of 2^bits).

    Callers reduce ``acc`` modulo 2^bits once at the end: unsigned wrap-around keeps every
    intermediate sum exact modulo 2^bits, so the words need no reduction here.
    """
    stream = _keystream(seed, acc.shape[0], bits)
    if sign > 0:
        np.add(acc, stream, out=acc)
    else:
        np.subtract(acc, stream, out=acc)


# --------------------------------------------------------------------------- Shamir


def _secret_to_int(secret: bytes) -> int:
    if len(secret) != SEED_BYTES:
        raise ProtocolError(f"a shared secret has {SEED_BYTES} bytes, got {len(secret)}")
    return int.from_bytes(secret, "big")


def split_secret(secret: bytes, *, threshold: int, holders: Sequence[int]) -> dict[int, int]:
    """Shamir-share a 32-byte ``secret`` among ``holders`` (client ids), ``threshold`` of them
    needed to reconstruct it (Shamir 1979; Bonawitz et al. 2017, §3 "Secret sharing").

    Holder ``h`` gets the point ``(h + 1, f(h + 1))`` of a random polynomial ``f`` of degree
    ``threshold - 1`` with ``f(0) = secret``; returns ``{holder: f(h + 1)}``.
    """
    if threshold < 1 or threshold > len(holders):
        raise ProtocolError(f"cannot share a secret {threshold}-out-of-{len(holders)}")
    if len(set(holders)) != len(holders):
        raise ProtocolError("share holders must be distinct")
    p = FIELD_PRIME
    coefficients = [_secret_to_int(secret)] + [secrets.randbelow(p) for _ in range(threshold - 1)]
    shares = {}
    for h in holders:
        x = h + 1
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % p
        shares[h] = y
    return shares


def _batch_inverse(values: Sequence[int]) -> list[int]:
    """Modular inverses of nonzero ``values`` with one exponentiation (Montgomery's trick)."""
    p = FIELD_PRIME
    prefix = [1]
    for v in values:
        prefix.append(prefix[-1] * v % p)
    inv = pow(prefix[-1], -1, p)
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = prefix[i] * inv % p
        inv = inv * values[i] % p
    return out


class _Interpolant:
    """The polynomial through ``points`` in barycentric form (evaluation in O(t))."""

    def __init__(self, points: Sequence[tuple[int, int]]) -> None:
        p = FIELD_PRIME
        self.xs = [x % p for x, _ in points]
        self.ys = [y % p for _, y in points]
        if len(set(self.xs)) != len(self.xs):
            raise ProtocolError("duplicate share coordinates")
        dens = []
        for j, xj in enumerate(self.xs):
            d = 1
            for m, xm in enumerate(self.xs):
                if m != j:
                    d = d * (xj - xm) % p
            dens.append(d)
        # barycentric weights times values: w_j y_j with w_j = 1 / prod_{m != j} (x_j - x_m)
        self.wy = [w * y % p for w, y in zip(_batch_inverse(dens), self.ys, strict=True)]

    def __call__(self, x: int) -> int:
        p = FIELD_PRIME
        x %= p
        if x in self.xs:
            return self.ys[self.xs.index(x)]
        diffs = [(x - xj) % p for xj in self.xs]
        whole = 1
        for d in diffs:
            whole = whole * d % p
        total = sum(wy * inv for wy, inv in zip(self.wy, _batch_inverse(diffs), strict=True))
        return whole * total % p


def interpolate_at(points: Sequence[tuple[int, int]], x: int) -> int:
    """The value at ``x`` of the polynomial through ``points`` (Lagrange, over GF(p))."""
    return _Interpolant(points)(x)


def reconstruct_secret(
    shares: Mapping[int, int],
    *,
    threshold: int,
    verify: Callable[[bytes], bool],
) -> tuple[bytes, list[int]]:
    """Rebuild a secret from ``{holder: share}`` and name the holders of wrong shares.

    Any ``threshold`` correct shares determine the secret; ``verify`` (a commitment or public
    key check) tells a correct reconstruction from garbage. With more than ``threshold``
    shares, subsets that leave out one share, then windows of consecutive shares, are tried,
    so a single wrong share is always skipped; the polynomial found then names every holder
    whose share is off it. Returns
    ``(secret, holders_with_wrong_shares)``; raises ProtocolError when no window verifies.
    """
    if len(shares) < threshold:
        raise ProtocolError(f"{len(shares)} shares cannot reconstruct a {threshold}-out-of-n "
                            "secret")
    points = sorted((h + 1, y % FIELD_PRIME) for h, y in shares.items())
    m = len(points)
    # Candidate subsets: the first t; the first t without point i (any single wrong share,
    # given m > t); then windows of t consecutive points (some cases of several wrong ones).
    candidates = [points[:threshold]]
    if m > threshold:
        candidates += [(points[:i] + points[i + 1:])[:threshold] for i in range(threshold)]
        candidates += [points[s:s + threshold] for s in range(1, m - threshold + 1)]
    for window in candidates:
        poly = _Interpolant(window)
        value = poly(0)
        if value >= 1 << (8 * SEED_BYTES):
            continue
        secret = value.to_bytes(SEED_BYTES, "big")
        if not verify(secret):
            continue
        wrong = [x - 1 for x, y in points if poly(x) != y]
        return secret, wrong
    raise ProtocolError(f"the {len(points)} shares are inconsistent: no {threshold} of them "
                        "reconstruct a secret that matches its commitment")

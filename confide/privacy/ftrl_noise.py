"""DP-FTRL's noise source: Gaussian vectors from a secret key, and how that key is kept.

Correlated-noise mechanisms (tree aggregation, banded matrix factorisation) reuse a noise
vector across rounds, so the coordinator must be able to regenerate it: each vector is a pure
function of a 256-bit secret key and the vector's index. The key is drawn from the operating
system's CSPRNG (``os.urandom``) and the Gaussians are read off a ChaCha20 keystream (RFC 8439)
through the Box-Muller transform, so knowing the released models and every index reveals
nothing about the noise without the key. A seeded Mersenne Twister (``torch.Generator``) would
not do: its state can be recovered from its outputs, and whoever knows the seed can subtract
the noise (:mod:`confide.privacy.mechanisms`).

Resume. The checkpoint never holds the key or a noise vector in clear: it holds the key
*wrapped* (AES key wrap, RFC 3394) under a key-encryption key (KEK) that lives in its own file,
``privacy.noise_key_file`` (default ``RUN_DIR/secrets/dp_ftrl_noise.kek``, mode 0600, like the
CA's private key). On resume the key is unwrapped and the mechanism's state is *replayed* from
round 1: no noise state needs to be stored at all, and the replay is bit-for-bit the same
computation as the uninterrupted run. A copied or published checkpoint (or ``history.json``,
or the ledger) therefore cannot be used to denoise the released models; only the KEK file can,
and it must be protected (and may be deleted once the run is final, which makes the noise
unrecoverable). Storing the band's past noise vectors in the checkpoint instead would let a
leaked checkpoint remove the noise of the last rounds' updates exactly.
"""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from confide.exceptions import PrivacyError

__all__ = ["NoiseSource", "KEY_BYTES", "load_or_create_kek", "wrap_key", "unwrap_key"]

KEY_BYTES = 32


class NoiseSource:
    """Standard normal vectors ``N(0, I_d)`` indexed by ``(stream, index)``, from a secret key."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(self.key) != KEY_BYTES:
            raise PrivacyError(f"a DP-FTRL noise key has {KEY_BYTES} bytes, not {len(self.key)}")

    def normal(self, stream: int, index: int, size: int) -> np.ndarray:
        """``size`` i.i.d. standard normals (float64) for vector ``index`` of ``stream``."""
        if not (0 <= stream < 2 ** 32 and 0 <= index < 2 ** 64):
            raise PrivacyError(f"noise index ({stream}, {index}) is out of range")
        pairs = (size + 1) // 2
        # cryptography's 16-byte ChaCha20 nonce is the 32-bit block counter then RFC 8439's
        # 96-bit nonce: (stream, index) is the nonce, so every vector has its own keystream.
        nonce = struct.pack("<IIQ", 0, stream, index)
        encryptor = Cipher(algorithms.ChaCha20(self.key, nonce), mode=None).encryptor()
        words = np.frombuffer(encryptor.update(bytes(16 * pairs)), dtype="<u8")
        # 53-bit uniforms in (0, 1]: log(u1) is finite (Box & Muller 1958).
        uniform = ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53
        u1, u2 = uniform[:pairs], uniform[pairs:]
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size]


def load_or_create_kek(path: Path, *, create: bool) -> bytes:
    """The key-encryption key in ``path`` (created with mode 0600 when ``create`` and absent)."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if len(data) != KEY_BYTES:
            raise PrivacyError(f"DP-FTRL key-encryption key {str(path)!r} is malformed")
        return data
    if not create:
        raise PrivacyError(
            f"DP-FTRL key-encryption key {str(path)!r} is missing: the checkpoint's noise key "
            "cannot be unwrapped, so the correlated noise cannot continue; restore the file "
            "or start a new run")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    kek = os.urandom(KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "wb") as fh:
        fh.write(kek)
    return kek


def wrap_key(kek: bytes, key: bytes) -> str:
    """``key`` wrapped under ``kek`` (RFC 3394), hex-encoded for the checkpoint."""
    return aes_key_wrap(kek, key).hex()


def unwrap_key(kek: bytes, wrapped: str) -> bytes:
    """Inverse of :func:`wrap_key`; a wrong KEK or a tampered value is a PrivacyError."""
    try:
        return aes_key_unwrap(kek, bytes.fromhex(wrapped))
    except (InvalidUnwrap, ValueError):
        raise PrivacyError("the checkpoint's DP-FTRL noise key does not unwrap with this "
                           "key-encryption key (a different run's key, or a tampered "
                           "checkpoint)") from None

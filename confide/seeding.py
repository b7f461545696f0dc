"""Explicit randomness: one root seed -> a derived seed per (purpose, round, client).

Simulation randomness (sampling, shuffling, fault injection, DP noise in simulation) comes
from here, so the same seed gives the same run. Cryptographic randomness never does: secure
aggregation keys and masks use ``os.urandom``/``secrets`` and are never seeded.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["derive_seed", "derive_rng"]


def _key(part: int | str) -> int:
    return zlib.crc32(part.encode()) if isinstance(part, str) else int(part)


def derive_seed(root: int, *parts: int | str) -> int:
    """A 63-bit seed derived from ``root`` and the labels ``parts`` (stable across runs)."""
    seq = np.random.SeedSequence([int(root), *(_key(p) for p in parts)])
    lo, hi = (int(v) for v in seq.generate_state(2, dtype=np.uint32))
    return (lo | (hi << 32)) & ((1 << 63) - 1)


def derive_rng(root: int, *parts: int | str) -> np.random.Generator:
    """A numpy Generator seeded by :func:`derive_seed`."""
    return np.random.default_rng(derive_seed(root, *parts))

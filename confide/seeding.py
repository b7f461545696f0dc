"""Explicit randomness: one root seed -> a derived seed per (purpose, round, client).

Simulation randomness (sampling, shuffling, fault injection, DP noise in simulation) comes
from here, so the same seed gives the same run. Cryptographic randomness never does: secure
aggregation keys and masks use ``os.urandom``/``secrets`` and are never seeded.
"""

from __future__ import annotations

import zlib

import numpy as np

__all__ = ["derive_seed", "derive_rng", "derive_seeds", "keyed_normals"]


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


_MASK63 = np.uint64((1 << 63) - 1)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (Steele, Lea, Flood, "Fast Splittable
    Pseudorandom Number Generators", OOPSLA 2014, Fig. 16): a bijective 64-bit mix whose
    outputs for consecutive inputs pass BigCrush.
    """
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def derive_seeds(root: int, *parts: int | str, keys: np.ndarray) -> np.ndarray:
    """One 63-bit seed per entry of ``keys`` (e.g. client ids), for the labels ``parts``.

    The vectorised form of :func:`derive_seed` for a whole cohort: a seed depends only on
    ``root``, ``parts`` and its own key (not on which other keys are asked), so a client's
    seed is the same whoever else is sampled. ``keys`` is ``[n]`` or ``[n, k]`` (several
    integer keys per entry, e.g. client and task index).
    """
    base = np.uint64(derive_seed(root, *parts))
    k = np.asarray(keys, dtype=np.int64).astype(np.uint64)
    z = np.full(k.shape[0], base, dtype=np.uint64)
    for col in (k.reshape(k.shape[0], -1).T if k.size else []):
        z = _splitmix64(z ^ _splitmix64(col))
    return (_splitmix64(z) & _MASK63).astype(np.int64)


def keyed_normals(root: int, *parts: int | str, keys: np.ndarray, width: int) -> np.ndarray:
    """``[n, width]`` standard normals, row ``i`` a pure function of (root, parts, keys[i]).

    Box-Muller on uniforms from :func:`derive_seeds` (53-bit mantissas, never 0).
    """
    if len(keys) == 0:
        return np.zeros((0, width))
    k = np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)
    n = k.shape[0]
    m = width + width % 2
    cols = np.repeat(k, m, axis=0).reshape(n, m, k.shape[1])
    idx = np.broadcast_to(np.arange(m), (n, m))[..., None]
    seeds = derive_seeds(root, *parts, keys=np.concatenate([cols, idx], axis=2).reshape(
        n * m, -1)).reshape(n, m).astype(np.uint64)
    u = ((seeds >> np.uint64(10)).astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = u[:, 0::2], u[:, 1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)], axis=1)
    return z[:, :width]

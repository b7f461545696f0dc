"""Quantisation of a client's contribution into Z_{2^b}, and decoding of the modular sum.

Secure aggregation sums integers modulo 2^b, so every client maps its floats to integers the
same way (Bonawitz et al. 2017, §1 and §7 on fixed-point inputs):

1. **Clip** every coordinate of the update (and of each auxiliary vector, e.g. SCAFFOLD's
   control-variate delta) to ``[-clipping_range, clipping_range]``.
2. **Weight and scale**: the update is multiplied by the client's integer weight ``w``
   (its example count, capped at ``max_weight``; 1 under uniform weighting) and by
   ``Q / (clipping_range * max_weight)``; auxiliary vectors by ``Q / clipping_range``. So every
   entry lies in ``[-Q, Q]``.
3. **Stochastic rounding** to an integer neighbour, unbiased: ``E[round(v)] = v``.
4. **Embed** into Z_{2^b}: negative values wrap (two's complement modulo 2^b). The weight is
   appended as one exact integer entry, so ``sum w_i`` and ``sum w_i * u_i`` both survive the
   modular sum, and the coordinator divides them after decoding.

**No overflow**: ``Q = floor((2^(b-1) - 1) / n)`` for a cohort of ``n``, so the true sum of up
to ``n`` entries lies in ``(-2^(b-1), 2^(b-1))`` and the centred lift of the modular sum
recovers it exactly. :func:`check_capacity` refuses a bit width that leaves fewer levels than
``max_weight`` (the weights would not be exact) with a clear error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from confide.exceptions import ConfigError, ProtocolError
from confide.privacy.secagg.primitives import mask_dtype

__all__ = ["Quantiser", "check_capacity", "clipped_entries", "stochastic_round",
           "centred_lift"]


def check_capacity(*, cohort_size: int, bits: int, max_weight: int) -> int:
    """The per-client level bound Q for ``cohort_size`` clients at ``bits`` bits.

    Raises ConfigError when the sum could overflow the field or the weights would be inexact.
    """
    if not 2 <= bits <= 62:
        raise ConfigError(f"secure_aggregation.bits = {bits} is out of range; use 8 to 62")
    levels = (2 ** (bits - 1) - 1) // max(cohort_size, 1)
    if levels < max(max_weight, 2):
        need = math.ceil(math.log2(max(max_weight, 2) * cohort_size + 1)) + 1
        raise ConfigError(
            f"secure_aggregation.bits = {bits} is too small for {cohort_size} clients with "
            f"max_weight = {max_weight}: the sum could overflow Z_2^{bits}; use bits >= {need} "
            "(or lower max_weight)")
    return levels


def stochastic_round(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Round each entry down or up at random, unbiased: ``floor(v) + Bernoulli(v - floor(v))``."""
    low = np.floor(values)
    return (low + (rng.random(values.shape) < (values - low))).astype(np.int64)


def centred_lift(words: np.ndarray, bits: int) -> np.ndarray:
    """Map Z_{2^bits} to the integers in ``[-2^(bits-1), 2^(bits-1))`` (int64)."""
    signed = words.astype(np.int64) & np.int64((1 << bits) - 1)
    return np.where(signed >= (1 << (bits - 1)), signed - (1 << bits), signed)


def clipped_entries(update: np.ndarray, aux: Sequence[np.ndarray], *,
                    clipping_range: float) -> tuple[int, int]:
    """How many entries of ``update`` and of the aux vectors step 1 clips.

    Clipping changes the sum, so the callers report it, never silently (the strategy
    aux-vector contract, :mod:`confide.strategies.aux_vectors`, rule 3).
    """
    c = clipping_range
    return (int(np.count_nonzero(np.abs(update) > c)),
            sum(int(np.count_nonzero(np.abs(a) > c)) for a in aux))


@dataclass(frozen=True)
class Quantiser:
    """Maps contributions of a cohort of ``cohort_size`` clients to Z_{2^bits} and back."""

    bits: int
    clipping_range: float
    max_weight: int
    cohort_size: int

    def __post_init__(self) -> None:
        if not self.clipping_range > 0 or not math.isfinite(self.clipping_range):
            raise ConfigError("secure_aggregation.clipping_range must be a positive number")
        check_capacity(cohort_size=self.cohort_size, bits=self.bits, max_weight=self.max_weight)

    @property
    def levels(self) -> int:
        """Q: every client's entries lie in ``[-Q, Q]``."""
        return (2 ** (self.bits - 1) - 1) // self.cohort_size

    @property
    def update_scale(self) -> float:
        """Integer units per unit of ``weight * update``."""
        return self.levels / (self.clipping_range * self.max_weight)

    @property
    def aux_scale(self) -> float:
        """Integer units per unit of an auxiliary vector."""
        return self.levels / self.clipping_range

    def vector_length(self, dim: int, num_aux: int) -> int:
        """Entries of an encoded contribution: update, auxiliary vectors, weight."""
        return dim * (1 + num_aux) + 1

    def encode(self, update: np.ndarray, weight: int, aux: Sequence[np.ndarray],
               rng: np.random.Generator) -> np.ndarray:
        """Clip, weight, scale, round and embed one client's contribution (module docstring)."""
        if not 0 <= weight <= self.max_weight or int(weight) != weight:
            raise ProtocolError(f"a client weight must be an integer in [0, {self.max_weight}], "
                                f"got {weight}")
        parts = [update, *aux]
        if any(a.shape != update.shape or a.ndim != 1 for a in parts):
            raise ProtocolError("a contribution's update and auxiliary vectors must be flat and "
                                "of the same length")
        if any(not np.isfinite(p).all() for p in parts):
            raise ProtocolError("a contribution to secure aggregation has non-finite entries")
        c, q = self.clipping_range, self.levels
        ints = [stochastic_round(np.clip(update.astype(np.float64), -c, c)
                                 * (weight * self.update_scale), rng)]
        ints += [stochastic_round(np.clip(a.astype(np.float64), -c, c) * self.aux_scale, rng)
                 for a in aux]
        ints.append(np.array([weight], dtype=np.int64))
        flat = np.concatenate(ints)
        # Float rounding can never push an entry past Q by more than the rounding step.
        np.clip(flat, -q, q, out=flat)
        return self.embed(flat)

    def embed(self, integers: np.ndarray) -> np.ndarray:
        """Signed integers -> Z_{2^bits} words (two's complement modulo 2^bits)."""
        dtype = mask_dtype(self.bits)
        return (integers.astype(np.int64) & np.int64((1 << self.bits) - 1)).astype(dtype)

    def decode(self, words: np.ndarray, *, dim: int, num_aux: int
               ) -> tuple[np.ndarray, int, list[np.ndarray]]:
        """``(sum of weight*update, sum of weights, [sum of each aux vector])`` from a sum."""
        if words.shape[0] != self.vector_length(dim, num_aux):
            raise ProtocolError(f"the aggregated vector has {words.shape[0]} entries, expected "
                                f"{self.vector_length(dim, num_aux)}")
        signed = centred_lift(words, self.bits)
        update_sum = signed[:dim].astype(np.float64) / self.update_scale
        aux_sums = [signed[dim * (i + 1):dim * (i + 2)].astype(np.float64) / self.aux_scale
                    for i in range(num_aux)]
        return update_sum, int(signed[-1]), aux_sums

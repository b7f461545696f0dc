"""The round's metadata as extra coordinates of the masked sum.

Under secure aggregation the coordinator must learn a client's example count, step count and
training loss only as sums over the cohort (issue 12): each client appends them, as integers
in Z_{2^b}, after its weight; the modular sum then carries the cohort's totals and nothing
per client. Each entry is at most Q (the quantiser's per-client level bound,
:mod:`~confide.privacy.secagg.quantisation`), so the sum of n entries never wraps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from confide.exceptions import ProtocolError
from confide.privacy.secagg.quantisation import stochastic_round

__all__ = ["META_FIELDS", "LOSS_CAP", "meta_scale", "encode_meta"]


#: metadata words after the weight: example count and step count (exact, capped) and the
#: example-weighted training loss (fixed point, clipped to [0, LOSS_CAP])
META_FIELDS = ("num_examples", "num_steps", "loss_x_examples")
#: training losses are clipped to this before they enter the sum
LOSS_CAP = 64.0


def meta_scale(levels: int, max_weight: int) -> float:
    """Integer units per unit of ``loss * examples`` (the sum of n stays below 2^(b-1))."""
    return levels / (LOSS_CAP * max_weight)


def encode_meta(meta: Sequence[float], *, levels: int, max_weight: int,
                rng: np.random.Generator) -> np.ndarray:
    """``(examples, steps, loss)`` as :data:`META_FIELDS` integers in ``[0, levels]``.

    Each entry of a client is at most Q = ``levels``, so the sum of the cohort cannot wrap
    (the quantiser's bound, :mod:`~confide.privacy.secagg.quantisation`).
    """
    if len(meta) != len(META_FIELDS):
        raise ProtocolError(f"metadata has {len(meta)} entries, expected {len(META_FIELDS)}")
    examples = int(min(max(meta[0], 0), max_weight, levels))
    steps = int(min(max(meta[1], 0), levels))
    loss = float(meta[2]) if math.isfinite(meta[2]) else 0.0
    scaled = np.array([min(max(loss, 0.0), LOSS_CAP) * examples
                       * meta_scale(levels, max_weight)])
    lossx = int(min(stochastic_round(scaled, rng)[0], levels))
    return np.array([examples, steps, lossx], dtype=np.int64)

"""Tree aggregation for DP-FTRL (Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, ICML 2021,
"Practical and Private (Deep) Learning without Sampling or Shuffling", Sec. 3 and App. B).

Round ``t``'s sum of clipped updates is a leaf of a binary tree; every complete dyadic block
of leaves is a node, released with its own Gaussian noise ``N(0, σ² I)`` once its last leaf is
in. The prefix sum up to ``τ`` is the sum of the nodes of ``τ``'s binary decomposition (one per
set bit), so each prefix sum carries ``popcount(τ)`` noise vectors instead of ``τ``.

* Sensitivity: a leaf lies in ``floor(log2 T) + 1 = ceil(log2(T + 1))`` released nodes, so
  one participation has ``sens^2 = ceil(log2(T + 1))`` (Kairouz et al. 2021, Thm. 4.1 and
  App. B.1). :meth:`TreeAggregation.encoder` gives the 0/1 node-by-leaf matrix, from which
  :func:`~confide.privacy.ftrl_matrix.sensitivities` computes it exactly, for any pattern.
* Restarts: with ``restart_every = P`` the tree starts afresh every ``P`` rounds and the new
  tree's estimates are added to the last prefix sum of the previous one (Kairouz et al. 2021,
  Sec. 4, "restarting the tree"; App. D). With ``P <= min_separation`` a client is in at most
  one leaf per tree, the trees' nodes are disjoint, and ``k`` participations have
  ``sens^2 = sum`` of ``k`` trees' leaf depths.
* Honaker's estimator (Honaker 2015, "Efficient use of differentially private binary trees";
  Kairouz et al. 2021, App. B.2): the noisy value of a node and the sum of its two children's
  estimates are two unbiased estimates of the same block sum; their inverse-variance
  combination, computed bottom-up, is the best linear unbiased estimate of a block from the
  nodes in its subtree. A prefix sum's decomposition blocks are disjoint subtrees and no
  released node outside them covers their leaves, so summing the blocks' estimates is the
  BLUE of the prefix sum from the released nodes — with the same privacy (post-processing)
  and lower variance ``sum_{h in bits(τ)} v_h σ²``, ``v_0 = 1``, ``v_h = 2 v_{h-1} / (1 + 2
  v_{h-1})``.
"""

from __future__ import annotations

import numpy as np

from confide.exceptions import PrivacyError
from confide.privacy.ftrl_matrix import CorrelatedNoise

__all__ = ["TreeAggregation", "honaker_variances"]


def honaker_variances(levels: int) -> np.ndarray:
    """``v_h`` (in units of ``σ²``): the variance of Honaker's estimate of a height-``h`` node."""
    v = np.ones(max(1, levels))
    for h in range(1, len(v)):
        v[h] = 2 * v[h - 1] / (1 + 2 * v[h - 1])
    return v


def _trailing_zeros(n: int) -> int:
    return (n & -n).bit_length() - 1


class TreeAggregation(CorrelatedNoise):
    """Online binary-tree prefix sums, with optional restarts and Honaker's estimator."""

    name = "tree"

    def __init__(self, *, restart_every: int | None = None, honaker: bool = True) -> None:
        super().__init__()
        if restart_every is not None and (int(restart_every) != restart_every
                                          or restart_every < 1):
            raise PrivacyError(f"tree restart = {restart_every!r} must be a whole number >= 1")
        self.restart_every = None if restart_every is None else int(restart_every)
        self.honaker = bool(honaker)
        self._weights = honaker_variances(64)  # w_h = v_h (inverse-variance weight, σ² = 1)
        self._last: dict[int, np.ndarray] = {}
        self._offset: np.ndarray | None = None
        self._previous: np.ndarray | None = None

    def describe(self) -> dict[str, object]:  # noqa: D102
        return {"mechanism": self.name, "tree_restart": self.restart_every,
                "tree_estimator": "honaker" if self.honaker else "vanilla"}

    def _position(self, t: int) -> tuple[int, int]:
        """(tree index, leaf index τ >= 1 in that tree) of round ``t``."""
        if self.restart_every is None:
            return 0, t
        return (t - 1) // self.restart_every, (t - 1) % self.restart_every + 1

    def encoder(self, rounds: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: D102
        rows: list[np.ndarray] = []
        released: list[int] = []
        period = rounds if self.restart_every is None else self.restart_every
        for start in range(0, rounds, period):
            length = min(period, rounds - start)
            height = 0
            while (1 << height) <= length:
                size = 1 << height
                for p in range(1, length // size + 1):
                    row = np.zeros(rounds)
                    row[start + (p - 1) * size:start + p * size] = 1.0
                    rows.append(row)
                    released.append(start + p * size)
                height += 1
        return np.array(rows), np.array(released)

    def _reset(self) -> None:
        self._last = {}
        self._offset = np.zeros(self.dim)
        self._previous = np.zeros(self.dim)

    def _node(self, tree: int, height: int, position: int) -> np.ndarray:
        if not (tree < 2 ** 24 and height < 64 and position < 2 ** 34):
            raise PrivacyError("the DP-FTRL tree is too large")
        return self._normal(1, (tree << 40) | (height << 34) | position)

    def step(self) -> np.ndarray:  # noqa: D102
        if self._offset is None or self._previous is None:
            raise PrivacyError("the DP-FTRL noise was used before it was started")
        self.rounds_done += 1
        tree, tau = self._position(self.rounds_done)
        if tau == 1 and tree > 0:
            # Restart: the new tree estimates the sum since the restart, on top of the last
            # released prefix sum (Kairouz et al. 2021, Sec. 4).
            self._offset = self._previous.copy()
            self._last = {}
        # The nodes completed by leaf τ: heights 0 .. trailing_zeros(τ), bottom-up.
        estimate = self._node(tree, 0, tau)
        for height in range(1, _trailing_zeros(tau) + 1):
            raw = self._node(tree, height, tau >> height)
            if self.honaker:
                # Left child: completed at τ - 2^(height-1) and kept in self._last since (no
                # leaf in between completes a node that high); right child: just estimated.
                w = self._weights[height]
                estimate = w * raw + (1 - w) * (self._last[height - 1] + estimate)
            else:
                estimate = raw
        self._last[_trailing_zeros(tau)] = estimate
        total = self._offset.copy()
        for height in range(tau.bit_length()):
            if (tau >> height) & 1:
                total += self._last[height]
        increment = total - self._previous
        self._previous = total
        return increment

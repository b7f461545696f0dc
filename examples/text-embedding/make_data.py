"""Write ``text.npz``: short token-id "documents" on four topics, from six sites.

Each topic has its own 20 keyword ids; a document mixes 4-9 keywords of its topic with common
words and is padded with 0 to 12 tokens. Labels are topic names (strings: Confide numbers them
and saves the mapping as the run's ``label_map.json``); ``client_id`` names the site a document
comes from (a natural partition), each site leaning towards two topics::

    python make_data.py            # writes text.npz next to this file
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
SEQ_LEN = 12
TOPICS = ["science", "sports", "politics", "music"]
SITES = ["site-a", "site-b", "site-c", "site-d", "site-e", "site-f"]


def make(n: int = 1200, seed: int = 0) -> dict[str, np.ndarray]:
    """The arrays of ``text.npz``."""
    rng = np.random.default_rng(seed)
    keywords = {t: 1 + 20 * i + np.arange(20) for i, t in enumerate(TOPICS)}  # ids 1..80
    common = np.arange(100, VOCAB_SIZE)
    x = np.zeros((n, SEQ_LEN), dtype=np.int64)
    site = rng.choice(len(SITES), size=n)
    # Each site favours two topics (label skew across clients).
    favoured = [(s % 4, (s + 1) % 4) for s in range(len(SITES))]
    topic = np.array([rng.choice(favoured[s]) if rng.random() < 0.8 else rng.integers(4)
                      for s in site])
    for i in range(n):
        length = rng.integers(6, SEQ_LEN + 1)
        k = rng.integers(4, min(9, length) + 1)
        words = np.concatenate([rng.choice(keywords[TOPICS[topic[i]]], size=k),
                                rng.choice(common, size=length - k)])
        x[i, :length] = rng.permutation(words)
    return {"x": x, "y": np.array([TOPICS[t] for t in topic]),
            "client_id": np.array([SITES[s] for s in site])}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("text.npz")
    np.savez(out, **make())
    print(f"wrote {out}")

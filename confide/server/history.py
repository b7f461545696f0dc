"""The run folder's record: ``history.json``, ``history.csv``, ``timings.csv`` and plots.

``history.json`` holds only values that are a function of the config and seed, so two runs
with the same seed produce identical files; wall-clock times go to ``timings.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["write_history", "write_timings", "plot_history", "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history.json`` and ``history.csv``."""
    rows = [{k: _clean(v) for k, v in rec.items()} for rec in history]
    atomic_write_text(run_dir / "history.json", json.dumps(rows, indent=2) + "\n")
    keys: list[str] = []
    for rec in rows:
        keys += [k for k in rec if k not in keys]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for rec in rows:
        writer.writerow({k: "" if rec.get(k) is None else rec.get(k) for k in keys})
    atomic_write_text(run_dir / "history.csv", buf.getvalue())


def write_timings(run_dir: Path, timings: list[dict[str, Any]]) -> None:
    """Write ``timings.csv`` (seconds per round, by phase)."""
    if not timings:
        return
    keys = list(timings[0])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(timings)
    atomic_write_text(run_dir / "timings.csv", buf.getvalue())


def plot_history(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
    """``plots/accuracy.png``: test accuracy and loss per round (and against epsilon)."""
    evaluated = [r for r in history if r.get("test_accuracy") is not None]
    if not evaluated:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in evaluated]
    with_eps = [r for r in evaluated if r.get("epsilon") is not None]
    ncols = 3 if with_eps else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 3.6))
    axes[0].plot(rounds, [r["test_accuracy"] for r in evaluated], marker=".")
    axes[0].set(xlabel="round", ylabel="test accuracy", title="Accuracy")
    axes[0].grid(alpha=0.3)
    axes[1].plot(rounds, [r["test_loss"] for r in evaluated], marker=".", color="tab:red")
    axes[1].set(xlabel="round", ylabel="test loss", title="Loss")
    axes[1].grid(alpha=0.3)
    if with_eps:
        axes[2].plot([r["epsilon"] for r in with_eps], [r["test_accuracy"] for r in with_eps],
                     marker=".", color="tab:green")
        axes[2].set(xlabel="epsilon spent", ylabel="test accuracy", title="Accuracy vs ε")
        axes[2].grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    path = out / "accuracy.png"
    tmp = out / ".accuracy.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path

"""The run folder's record: ``history.json``, ``history.csv``, ``timings.csv`` and plots.

Plots: ``plots/accuracy.png`` (accuracy, train and test loss, accuracy against ε under DP)
and ``plots/partition.png`` (samples and labels per client, written when a run starts).

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

__all__ = ["write_history", "write_timings", "plot_history", "plot_partition", "diverged",
           "atomic_write_text"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


#: a train loss this many times the first round's (and above DIVERGED_FLOOR) is divergence
DIVERGED_FACTOR = 10.0
DIVERGED_FLOOR = 10.0
#: a mean cross-entropy above this is divergence outright: a classifier at chance level
#: scores ln(classes), under 7 even for 1000 classes, so logits are in the hundreds
DIVERGED_LOSS = 50.0


def diverged(record: dict[str, Any], first: dict[str, Any] | None = None) -> str | None:
    """Why ``record``'s round looks diverged (NaN/inf or exploding loss), else None."""
    for key in ("train_loss", "test_loss"):
        v = record.get(key)
        if isinstance(v, float) and not math.isfinite(v):
            return f"{key} is {v}"
    loss, base = record.get("train_loss"), (first or {}).get("train_loss")
    if isinstance(loss, int | float) and loss > DIVERGED_LOSS:
        return f"train_loss {loss:.3g} is over {DIVERGED_LOSS:g}"
    if (isinstance(loss, int | float) and isinstance(base, int | float) and base > 0
            and loss > DIVERGED_FLOOR and loss > DIVERGED_FACTOR * base):
        return f"train_loss {loss:.3g} is over {DIVERGED_FACTOR:g}x round 1's {base:.3g}"
    return None


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Write ``history.json`` and ``history.csv`` (a diverged round gets ``diverged: true``)."""
    rows = []
    for rec in history:
        row = {k: _clean(v) for k, v in rec.items()}
        if diverged(rec, history[0] if history else None):
            row["diverged"] = True
        rows.append(row)
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


def _run_title(run_dir: Path) -> str:
    """"run name — dataset, strategy (privacy)" from the run folder's config.toml."""
    title = run_dir.name
    try:
        import tomllib

        cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return title
    data, strategy = cfg.get("data", {}), cfg.get("strategy", {})
    dataset = Path(data["path"]).stem if data.get("path") else data.get("dataset", "?")
    parts = [f"{dataset} ({data.get('num_clients', '?')} clients, "
             f"{data.get('partition', '?')})", str(strategy.get("name", "fedavg"))]
    mode = cfg.get("privacy", {}).get("mode", "off")
    if mode != "off":
        parts.append(f"DP {mode}")
    if cfg.get("secure_aggregation", {}).get("enabled"):
        parts.append("SecAgg")
    return f"{title}\n{', '.join(parts)}"


def _delta(run_dir: Path) -> str:
    try:
        import tomllib

        cfg = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
        return f"{float(cfg['privacy']['delta']):g}"
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _save(fig: Any, run_dir: Path, name: str) -> Path:
    import matplotlib.pyplot as plt

    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    path = out / name
    tmp = out / f".{path.stem}.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(run_dir: Path, history: list[dict[str, Any]]) -> Path | None:
    """``plots/accuracy.png``: test accuracy, train and test loss per round, accuracy vs ε.

    The accuracy axis starts at 0 (it never zooms onto noise); a diverged round is marked.
    """
    evaluated = [r for r in history if r.get("test_accuracy") is not None]
    if not evaluated:
        return None
    plt = _pyplot()
    rounds = [r["round"] for r in evaluated]
    with_eps = [r for r in evaluated if r.get("epsilon") is not None]
    ncols = 3 if with_eps else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.8 * ncols, 4.0))
    acc = [r["test_accuracy"] for r in evaluated]
    axes[0].plot(rounds, acc, marker=".", label="test")
    axes[0].set(xlabel="round", ylabel="test accuracy", title="Accuracy",
                ylim=(0.0, 1.02))
    axes[0].set_title(f"Accuracy (final {acc[-1]:.3f}, best {max(acc):.3f})")
    trained = [r for r in history if _finite(r.get("train_loss"))]
    axes[1].plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
                 marker=".", color="tab:orange", label="train (clients' mean)")
    tested = [r for r in evaluated if _finite(r.get("test_loss"))]
    axes[1].plot([r["round"] for r in tested], [r["test_loss"] for r in tested], marker=".",
                 color="tab:red", label="test")
    axes[1].set(xlabel="round", ylabel="cross-entropy", title="Loss")
    axes[1].set_ylim(bottom=0.0)
    axes[1].legend(fontsize=8)
    bad = [r["round"] for r in history if diverged(r, history[0])]
    from matplotlib.ticker import MaxNLocator

    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if bad:
            ax.axvspan(min(bad) - 0.5, max(bad) + 0.5, color="tab:red", alpha=0.12,
                       label="diverged")
    if with_eps:
        axes[2].plot([r["epsilon"] for r in with_eps], [r["test_accuracy"] for r in with_eps],
                     marker=".", color="tab:green")
        axes[2].set(xlabel=f"ε spent (δ = {_delta(run_dir)})", ylabel="test accuracy",
                    title="Accuracy vs ε",
                    ylim=(0.0, 1.02))
        axes[2].set_xlim(left=0.0)
        axes[2].grid(alpha=0.3)
    fig.suptitle(_run_title(run_dir), fontsize=10)
    fig.tight_layout()
    return _save(fig, run_dir, "accuracy.png")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def plot_partition(run_dir: Path, partitions: list[Any], labels: Any, num_classes: int, *,
                   client_names: list[str] | None = None,
                   label_names: list[str] | None = None) -> Path:
    """``plots/partition.png``: samples per client, stacked by label (written at start)."""
    import numpy as np

    plt = _pyplot()
    y = np.asarray(labels)
    counts = np.stack([np.bincount(y[np.asarray(p, dtype=np.int64)], minlength=num_classes)
                       for p in partitions]) if partitions else np.zeros((0, num_classes))
    n = len(partitions)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.28 * n + 2.5)), 4.2))
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    bottom = np.zeros(n)
    xs = np.arange(n)
    for c in range(num_classes):
        name = label_names[c] if label_names and c < len(label_names) else str(c)
        ax.bar(xs, counts[:, c], bottom=bottom, color=cmap(c % cmap.N), width=0.85,
               label=name if num_classes <= 20 else None)
        bottom += counts[:, c]
    held = (counts > 0).sum(axis=1)
    ax.set(xlabel="client", ylabel="training samples",
           title=f"Samples and labels per client ({int(counts.sum())} samples; "
                 f"{int(held.min()) if n else 0}-{int(held.max()) if n else 0} labels per "
                 "client)")
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.05) if n else 1.0)
    fig.suptitle(_run_title(run_dir), fontsize=10)
    if client_names and len(client_names) == n and n <= 30:
        ax.set_xticks(xs, client_names, rotation=45, ha="right", fontsize=8)
    elif n <= 40:
        ax.set_xticks(xs)
    if num_classes <= 20:
        ax.legend(title="label", fontsize=7, title_fontsize=8, ncols=2 if num_classes > 10
                  else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, run_dir, "partition.png")

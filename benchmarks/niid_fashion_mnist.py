"""NIID-Bench Fashion-MNIST FedAvg (Dirichlet 0.5) against the published 88.4%.

Runs ``examples/fashion-mnist.toml`` (10 clients, lenet, 10 local epochs, batch 64, SGD momentum
0.9, 50 rounds) with the chosen executor and device, and writes
``benchmarks/results/niid_fashion_mnist[-<executor>].json`` and ``.md``.

    python benchmarks/niid_fashion_mnist.py [--executor sequential|vectorized] [--device cuda]

``--run-dir DIR`` keeps the run folder; the same command again resumes it from its last
checkpoint (for time-limited machines). ``train_seconds`` is the time spent in rounds over every
session; ``wall_seconds`` this process's whole time (start-up and evaluation included).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from _resumable import run_or_resume, write_atomic

from confide.app.simulate import summarize

PUBLISHED = 0.884  # REFERENCES.md: NIID-Bench as reproduced in Flower's baselines, FedAvg Dir(0.5)
HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--executor", default="sequential")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra section.key=value")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="keep the run folder here; resume it when it has a checkpoint")
    args = ap.parse_args()
    overrides = [f"simulation.executor={json.dumps(args.executor)}",
                 f"client.device={json.dumps(args.device)}", f"run.rounds={args.rounds}",
                 f"run.seed={args.seed}", *args.set]
    start = time.perf_counter()
    history, train_seconds, resumed_after = run_or_resume(
        HERE.parent / "examples" / "fashion-mnist.toml", overrides, args.run_dir,
        lambda r: print(f"round {r['round']}: acc {r['test_accuracy']:.4f} "
                        f"({time.perf_counter() - start:.0f} s)", flush=True))
    seconds = time.perf_counter() - start
    s = summarize(history)
    result = {
        "benchmark": "NIID-Bench Fashion-MNIST, FedAvg, Dirichlet(0.5), 10 clients, lenet",
        "executor": args.executor, "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "host": platform.node(), "torch": torch.__version__, "rounds": args.rounds,
        "seed": args.seed,
        "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
        "published_accuracy": PUBLISHED,
        "difference_points": None if s["final_accuracy"] is None
        else round(100 * (s["final_accuracy"] - PUBLISHED), 2),
        "train_seconds": train_seconds, "wall_seconds": round(seconds, 1),
        "resumed_after_round": resumed_after,
        "accuracy_per_round": [r["test_accuracy"] for r in history],
    }
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "niid_fashion_mnist" + ("" if args.executor == "sequential" else f"-{args.executor}")
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    write_atomic(out / f"{stem}.md",
        "| executor | device | rounds | final acc | best acc | published | diff (pts) | "
        "s in rounds |\n|---|---|---|---|---|---|---|---|\n"
        f"| {args.executor} | {result['gpu'] or 'cpu'} | {args.rounds} | "
        f"{s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} | {PUBLISHED} | "
        f"{result['difference_points']} | {train_seconds} |\n")
    print(json.dumps({k: v for k, v in result.items() if k != "accuracy_per_round"}, indent=2))


if __name__ == "__main__":
    main()

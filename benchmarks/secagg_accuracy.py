"""Accuracy with secure aggregation on vs off, same seed (issue 5, acceptance 4).

Each job runs twice from the same seed, once summing in the clear and once through SecAgg+
(the real protocol: quantisation to Z_{2^32}, masks, key agreement), and reports the final
test accuracy of both. Quantisation is the only numeric difference, so the two should agree
within 0.5 points.

Jobs:

* ``digits`` — the default job (20 clients, Dirichlet(0.5), MLP, 30 rounds);
* ``fmnist-mlp`` — Fashion-MNIST, 100 clients, Dirichlet(0.5), 20 per round, MLP, 40 rounds
  (CPU friendly);
* ``fmnist-niid`` — ``examples/fashion-mnist.toml``, the NIID-Bench setting (10 clients, LeNet,
  10 local epochs, 50 rounds; use a GPU: ``--device cuda``).

Writes ``benchmarks/results/secagg_accuracy.json`` and ``.md``::

    python benchmarks/secagg_accuracy.py                          # digits + fmnist-mlp
    python benchmarks/secagg_accuracy.py --jobs fmnist-niid --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from confide.app.simulate import run_simulation, summarize

HERE = Path(__file__).resolve().parent
JOBS: dict[str, tuple[Path | None, list[str]]] = {
    "digits": (None, ["run.rounds=30"]),
    "fmnist-mlp": (None, [
        "data.dataset='fashion-mnist'", "data.num_clients=100", "data.partition='dirichlet'",
        "data.alpha=0.5", "cohort.size=20", "model.name='mlp'", "client.epochs=1",
        "client.batch_size=32", "client.lr=0.05", "run.rounds=40", "run.eval_every=5"]),
    "fmnist-niid": (HERE.parent / "examples" / "fashion-mnist.toml", []),
}


def run(job: str, secure: bool, device: str, out: Path) -> dict[str, Any]:
    config, overrides = JOBS[job]
    overrides = [*overrides, f"client.device='{device}'",
                 f"secure_aggregation.enabled={'true' if secure else 'false'}"]
    t0 = time.perf_counter()
    _, history = run_simulation(config, overrides=overrides,
                                output=out / f"{job}-{'secure' if secure else 'plain'}")
    s = summarize(history)
    row = {"job": job, "secure_aggregation": secure, "final_accuracy": s["final_accuracy"],
           "best_accuracy": s["best_accuracy"], "rounds": s["rounds"],
           "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"{job} secure={secure}: final accuracy {row['final_accuracy']:.4f} "
          f"({row['wall_s']} s)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", nargs="+", default=["digits", "fmnist-mlp"], choices=list(JOBS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--output", default=str(HERE / "results" / "secagg_accuracy"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for job in args.jobs:
            plain, secure = (run(job, flag, args.device, Path(tmp)) for flag in (False, True))
            diff = 100 * (secure["final_accuracy"] - plain["final_accuracy"])
            rows.append({"job": job, "plain": plain, "secure": secure,
                         "difference_points": round(diff, 3),
                         "within_half_point": abs(diff) <= 0.5})
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(
        {"benchmark": "accuracy with SecAgg+ on vs off (same seed)", "device": args.device,
         "platform": platform.platform(), "rows": rows}, indent=2) + "\n")
    lines = ["# Accuracy with secure aggregation on vs off (same seed)", "",
             "SecAgg+ with its defaults (32-bit field, clipping range 8, max weight 1000; "
             "degree and threshold from the cohort size).", "",
             "| job | plain | SecAgg+ | difference (points) | within 0.5 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['job']} | {r['plain']['final_accuracy']:.4f} | "
                     f"{r['secure']['final_accuracy']:.4f} | {r['difference_points']:+.3f} | "
                     f"{'yes' if r['within_half_point'] else 'NO'} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

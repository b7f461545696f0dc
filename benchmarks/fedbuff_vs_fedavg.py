"""FedBuff against synchronous FedAvg in virtual (simulated wall-clock) time, to 80% accuracy.

Setting (issue 14, acceptance 1): Fashion-MNIST, 1000 clients with Dirichlet(0.5) label skew,
100 clients at work at once, the latency model's defaults (``[simulation] latency*``; a
heavy-tailed client speed, so a synchronous round waits for its slowest of 100). FedAvg samples
100 clients per round and waits for all of them; FedBuff (Nguyen et al. 2022) keeps 100 in
flight and updates the model every K = 10 arrivals. Both use the same model and local
training. Reported: the virtual time and the round at which each first reaches the target
test accuracy, and the accuracies at the end.

Writes ``benchmarks/results/fedbuff_vs_fedavg[-TAG].json`` and ``.md``::

    python benchmarks/fedbuff_vs_fedavg.py --device cuda --executor vectorized
    python benchmarks/fedbuff_vs_fedavg.py --quick            # CPU smoke test (-quick files)
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

from confide.app.simulate import run_simulation

HERE = Path(__file__).resolve().parent

COMMON = [
    "data.dataset='fashion-mnist'",
    "data.num_clients=1000",
    "data.partition='dirichlet'",
    "data.alpha=0.5",
    "data.min_samples_per_client=2",
    "model.name='lenet'",
    "client.epochs=2",
    "client.batch_size=16",
    "client.lr=0.05",
    "client.momentum=0.0",
]


def first_reaching(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluated round at or above ``target`` (None if never)."""
    for row in history:
        acc = row.get("test_accuracy")
        if acc is not None and acc >= target:
            return row
    return None


def run(name: str, overrides: list[str], out: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_dir, history = run_simulation(None, overrides=overrides, output=out / name)
    evaluated = [r for r in history if r.get("test_accuracy") is not None]
    return {"name": name, "overrides": overrides, "run_dir": str(run_dir),
            "wall_s": round(time.perf_counter() - t0, 1), "history": history,
            "final_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
            "final_virtual_time_s": history[-1]["virtual_time_s"] if history else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executor", default="sequential")
    ap.add_argument("--target", type=float, default=0.80)
    ap.add_argument("--fedavg-rounds", type=int, default=60)
    ap.add_argument("--fedbuff-updates", type=int, default=600)
    ap.add_argument("--buffer-size", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=100)
    ap.add_argument("--fedbuff-eval-every", type=int, default=0,
                    help="server updates between evaluations (0: about 4 per FedAvg round)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (digits)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    common = [*COMMON, f"client.device='{args.device}'",
              f"simulation.executor='{args.executor}'", f"run.seed={args.seed}"]
    fedavg_rounds, fedbuff_updates = args.fedavg_rounds, args.fedbuff_updates
    if args.quick:
        common = [f"client.device='{args.device}'", "data.num_clients=50",
                  "client.epochs=1", f"run.seed={args.seed}"]
        fedavg_rounds, fedbuff_updates = 3, 10
    fedavg = [*common, "strategy.name='fedavg'", f"cohort.size={args.concurrency}",
              f"run.rounds={fedavg_rounds}", "run.eval_every=1"]
    every = args.fedbuff_eval_every or max(1, args.concurrency // (4 * args.buffer_size))
    fedbuff = [*common, "strategy.name='fedbuff'", f"strategy.buffer_size={args.buffer_size}",
               f"simulation.concurrency={args.concurrency}", f"cohort.size={args.concurrency}",
               f"run.rounds={fedbuff_updates}", f"run.eval_every={every}"]
    if args.quick:
        fedavg = [*common, "strategy.name='fedavg'", "cohort.size=10",
                  f"run.rounds={fedavg_rounds}"]
        fedbuff = [*common, "strategy.name='fedbuff'", "strategy.buffer_size=3",
                   "simulation.concurrency=10", "cohort.size=10", f"run.rounds={fedbuff_updates}"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("fedavg", fedavg), ("fedbuff", fedbuff)):
            res = run(name, overrides, Path(tmp))
            hit = first_reaching(res["history"], args.target)
            res["reached"] = None if hit is None else {
                "round": hit["round"], "virtual_time_s": hit["virtual_time_s"],
                "test_accuracy": hit["test_accuracy"]}
            print(f"{name}: final acc {res['final_accuracy']}, reached {args.target}: "
                  f"{res['reached']}, wall {res['wall_s']} s", flush=True)
            rows.append(res)
    times = [r["reached"]["virtual_time_s"] if r["reached"] else None for r in rows]
    ratio = (times[1] / times[0]) if all(t is not None for t in times) else None
    summary = {"target": args.target, "fedbuff_over_fedavg_virtual_time": ratio,
               "device": args.device, "executor": args.executor,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "host": platform.node(), "torch": torch.__version__, "runs": rows}
    suffix = "-quick" if args.quick else (f"-{args.tag}" if args.tag else "")
    res_dir = HERE / "results"
    res_dir.mkdir(exist_ok=True)
    (res_dir / f"fedbuff_vs_fedavg{suffix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# FedBuff vs FedAvg in virtual time (target {args.target:.0%})", "",
             "| strategy | rounds / server updates | reached target at (virtual s) | round "
             "| final accuracy | final virtual s | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        hit = r["reached"] or {}
        lines.append(f"| {r['name']} | {len(r['history'])} | {hit.get('virtual_time_s', '-')} "
                     f"| {hit.get('round', '-')} | {r['final_accuracy']} | "
                     f"{r['final_virtual_time_s']} | {r['wall_s']} |")
    lines += ["", f"FedBuff / FedAvg virtual time to target: {ratio}",
              f"device {args.device}, executor {args.executor}, {summary['gpu'] or 'CPU'}"]
    (res_dir / f"fedbuff_vs_fedavg{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

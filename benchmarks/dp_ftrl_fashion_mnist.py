"""DP-FTRL vs DP-FedAvg vs no DP on Fashion-MNIST at epsilon 8 (issue 15, acceptance 3).

Setting: 1000 clients (Dirichlet(0.5) label skew), 100 per round, delta = 1e-5, target
epsilon 8 over ``--rounds`` rounds, the same model, local training (1 epoch, batch 16, SGD lr
0.05), server update (FedAvg, server lr 1) and fixed clip norm ``--clip-norm`` for both DP runs:

* ``dp-ftrl-eps8`` — ``privacy.mode = "dp-ftrl"``: clients in a *fixed cyclic order*
  (``cohort.sampling = "cyclic"``: 10 groups of 100, each client every 10 rounds), no
  amplification by sampling; banded matrix-factorisation noise with band = separation = 10
  (Choquette-Choo et al. 2023; ``--mechanism tree`` for tree aggregation with restarts every
  10 rounds, Kairouz et al. 2021), its multiplier calibrated for epsilon 8 under that exact
  participation pattern;
* ``dp-fedavg-eps8`` — ``privacy.mode = "central"``: Poisson sampling with q = 0.1, the
  multiplier calibrated for epsilon 8 by the same accountant (``--accountant``);
* ``no-dp`` — plain FedAvg on the same cyclic order.

Resumable: with ``--run-dir DIR`` the three run folders are kept under ``DIR`` and the same
command again continues them from their last checkpoints (benchmarks/_resumable.py). Writes
``benchmarks/results/dp_ftrl_fashion_mnist[-<executor>][-quick].json`` and ``.md``::

    python benchmarks/dp_ftrl_fashion_mnist.py --device cuda --executor vectorized \\
        --run-dir /tmp/ftrl-runs                             # 300 rounds
    python benchmarks/dp_ftrl_fashion_mnist.py --rounds 2 --quick   # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from _resumable import run_or_resume, write_atomic

HERE = Path(__file__).resolve().parent
CLIENTS, PER_ROUND, DELTA, EPSILON = 1000, 100, 1e-5, 8.0
SEPARATION = CLIENTS // PER_ROUND  # rounds between a client's turns in the cyclic order


def settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """The overrides of the three runs."""
    common = [
        "data.dataset='fashion-mnist'", f"data.num_clients={CLIENTS}",
        "data.partition='dirichlet'", "data.alpha=0.5", "data.min_samples_per_client=2",
        f"cohort.size={PER_ROUND}", "client.epochs=1", "client.batch_size=16", "client.lr=0.05",
        "client.momentum=0.0", "strategy.name='fedavg'", f"model.name='{args.model}'",
        f"run.rounds={args.rounds}", f"run.eval_every={args.eval_every}",
        f"run.seed={args.seed}", f"client.device='{args.device}'",
        f"simulation.executor='{args.executor}'",
    ]
    dp = [f"privacy.target_epsilon={EPSILON}", f"privacy.delta={DELTA}",
          f"privacy.accountant='{args.accountant}'", f"privacy.clip_norm={args.clip_norm}"]
    # A band (or tree) longer than the run is refused: the smoke test's 2 rounds need band 2.
    span = min(SEPARATION, args.rounds)
    mechanism = (["privacy.ftrl_mechanism='banded'", f"privacy.band={span}"]
                 if args.mechanism == "banded" else
                 ["privacy.ftrl_mechanism='tree'", f"privacy.tree_restart={span}"])
    return {
        "no-dp": [*common, "cohort.sampling='cyclic'"],
        "dp-ftrl-eps8": [*common, "cohort.sampling='cyclic'", "privacy.mode='dp-ftrl'",
                         "privacy.participation='cyclic'",
                         f"privacy.min_separation={SEPARATION}", *mechanism, *dp],
        "dp-fedavg-eps8": [*common, "cohort.sampling='poisson'", "privacy.mode='central'", *dp],
    }


def run(name: str, overrides: list[str], run_dir: Path | None) -> dict[str, Any]:
    """One run (or its continuation); its summary row."""
    t0 = time.perf_counter()
    history, round_s, resumed_after = run_or_resume(None, overrides, run_dir, lambda r: None)
    wall = time.perf_counter() - t0
    accs = [(r["round"], r["test_accuracy"]) for r in history if r.get("test_accuracy") is not None]
    row: dict[str, Any] = {
        "run": name, "rounds": len(history), "final_accuracy": accs[-1][1] if accs else None,
        "best_accuracy": max(a for _, a in accs) if accs else None,
        "epsilon": history[-1].get("epsilon") if history else None,
        "refused_clients": sum(int(r.get("refused_clients") or 0) for r in history),
        "round_seconds": round_s, "wall_s": round(wall, 1), "resumed_after": resumed_after,
        "accuracy_curve": accs,
    }
    ledger = None if run_dir is None else run_dir / "privacy_ledger.json"
    if ledger is not None and ledger.is_file():
        data = json.loads(ledger.read_text())
        row["accountant"] = data["accountant"]
        row["ledger_settings"] = data["settings"]
    print(f"{name}: final accuracy {row['final_accuracy']}, epsilon {row['epsilon']}, "
          f"{wall:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="client.device (cpu, cuda, auto)")
    ap.add_argument("--executor", default="sequential", help="simulation.executor")
    ap.add_argument("--accountant", default="rdp", choices=["rdp", "prv", "pld"])
    ap.add_argument("--mechanism", default="banded", choices=["banded", "tree"])
    ap.add_argument("--clip-norm", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--run-dir", type=Path, default=None,
                    help="keep the three run folders here; the same command again resumes them")
    ap.add_argument("--only", choices=["no-dp", "dp-ftrl-eps8", "dp-fedavg-eps8"], action="append",
                    help="run only these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="write the -quick result files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    runs = settings(args)
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.run_dir if args.run_dir is not None else Path(tmp)
        for name, overrides in runs.items():
            if args.only and name not in args.only:
                continue
            rows.append(run(name, overrides, root / name))
    by_name = {r["run"]: r for r in rows}
    ftrl, fedavg = by_name.get("dp-ftrl-eps8"), by_name.get("dp-fedavg-eps8")
    gap = (None if not (ftrl and fedavg and ftrl["final_accuracy"] is not None
                        and fedavg["final_accuracy"] is not None)
           else round(100 * (ftrl["final_accuracy"] - fedavg["final_accuracy"]), 2))
    result = {
        "benchmark": "dp_ftrl_fashion_mnist",
        "setting": {"clients": CLIENTS, "clients_per_round": PER_ROUND, "rounds": args.rounds,
                    "model": args.model, "target_epsilon": EPSILON, "delta": DELTA,
                    "accountant": args.accountant, "mechanism": args.mechanism,
                    "clip_norm": args.clip_norm, "seed": args.seed, "overrides": runs},
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": args.threads, "device": args.device, "executor": args.executor,
                    "gpu": (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else None)},
        "runs": rows,
        "dp_ftrl_minus_dp_fedavg_points": gap,
    }
    stem = ("dp_ftrl_fashion_mnist" + ("" if args.executor == "sequential"
                                       else f"-{args.executor}")
            + ("-quick" if args.quick else ""))
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
    md = [
        "# DP-FTRL vs DP-FedAvg vs no DP on Fashion-MNIST (epsilon 8, delta 1e-5)", "",
        f"1000 clients, Dirichlet(0.5), 100 per round, {args.rounds} rounds, model "
        f"`{args.model}`, FedAvg (server lr 1), 1 local epoch, batch 16, lr 0.05, clip norm "
        f"{args.clip_norm}; accountant {args.accountant.upper()}. DP-FTRL: fixed cyclic order "
        f"(separation {SEPARATION}), {args.mechanism} noise, no sampling; DP-FedAvg: Poisson "
        f"q = 0.1. Executor {args.executor}, device {args.device}; seed {args.seed}.", "",
        "| run | final acc. | best acc. | epsilon | effective z | refused | s in rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        s = r.get("ledger_settings") or {}
        z = s.get("effective_noise_multiplier", s.get("noise_multiplier"))
        zs = "-" if z is None else f"{z:.4f}"
        acc = "-" if r["final_accuracy"] is None else f"{r['final_accuracy']:.4f}"
        best = "-" if r["best_accuracy"] is None else f"{r['best_accuracy']:.4f}"
        md.append(f"| {r['run']} | {acc} | {best} | {eps} | {zs} | {r['refused_clients']} | "
                  f"{r['round_seconds']} |")
    md += ["", f"DP-FTRL minus DP-FedAvg: {gap} points" if gap is not None else "", ""]
    write_atomic(out / f"{stem}.md", "\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

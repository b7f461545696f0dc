"""DP-SGD inside each hospital (Fed-Heart-Disease), with each hospital's own epsilon.

The FLamby Fed-Heart-Disease silos (``examples/heart-disease.toml``: 4 hospitals, natural
partition, logistic regression, 2 local epochs, batch 8, SGD lr 0.05 momentum 0.9, 30% of each
hospital's patients held out for the pooled test set) trained three ways:

* ``no-dp`` — FedAvg, no privacy;
* ``dp-sgd-z1`` — Opacus DP-SGD in every hospital, noise multiplier 1.0, per-sample clip 1.0;
  each hospital's epsilon then depends on its size (a smaller hospital samples a larger
  fraction per step);
* ``dp-sgd-eps3`` — each hospital calibrates its own multiplier for epsilon 3 after all rounds.

Epsilons are at delta = 1e-5 (RDP, Opacus), counting every round a hospital trained in
(no amplification from cohort sampling: every hospital takes part in every round).
FLamby's reference (REFERENCES.md): pooled training 0.776, FedAvg 0.654 (100 local steps).

Writes ``benchmarks/results/dp_heart_disease.json`` and ``.md``::

    python benchmarks/dp_heart_disease.py              # 30 rounds
    python benchmarks/dp_heart_disease.py --rounds 2 --quick
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
from confide.simulations.datasets import load_dataset

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "examples" / "heart-disease.toml"

RUNS: dict[str, list[str]] = {
    "no-dp": [],
    "dp-sgd-z1": ["privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0",
                  "privacy.clip_norm=1.0", "privacy.delta=1e-5"],
    "dp-sgd-eps3": ["privacy.mode='dp-sgd'", "privacy.target_epsilon=3.0",
                    "privacy.clip_norm=1.0", "privacy.delta=1e-5"],
}


def run(name: str, overrides: list[str], out: Path, names: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    run_dir, history = run_simulation(CONFIG, overrides=overrides, output=out / name)
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {"run": name, **summarize(history), "wall_s": round(wall, 1),
                           "epsilon_max": history[-1].get("epsilon")}
    ledger = run_dir / "privacy_ledger.json"
    if ledger.is_file():
        data = json.loads(ledger.read_text())
        row["hospitals"] = {
            names[int(key.split(":")[1])]: {
                "epsilon": entries[-1]["epsilon"],
                "noise_multiplier": entries[-1]["noise_multiplier"],
                "sample_rate": entries[-1]["sample_rate"],
                "steps_per_round": entries[-1]["steps"],
                "rounds": len(entries)}
            for key, entries in sorted(data["accounts"].items())}
    print(f"{name}: final accuracy {row['final_accuracy']:.4f}, epsilon {row['epsilon_max']}, "
          f"{wall:.0f} s", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="write the -quick result files")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("heart-disease", seed=args.seed, test_fraction=0.3)
    names = list(data.client_names or [])
    sizes = {names[k]: int((data.natural_clients == k).sum()) for k in range(len(names))}
    common = [f"run.rounds={args.rounds}", f"run.seed={args.seed}", "client.device='cpu'"]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, [*common, *extra], Path(tmp), names) for name, extra in RUNS.items()]
    base = rows[0]["final_accuracy"]
    for r in rows:
        r["accuracy_ratio_vs_no_dp"] = r["final_accuracy"] / base if base else None
    result = {"benchmark": "dp_heart_disease", "rounds": args.rounds, "seed": args.seed,
              "training_samples": sizes, "config": str(CONFIG.relative_to(HERE.parent)),
              "machine": {"platform": platform.platform(), "torch": torch.__version__},
              "runs": rows}
    stem = "dp_heart_disease" + ("-quick" if args.quick else "")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# DP-SGD in each hospital: Fed-Heart-Disease", "",
          f"{args.rounds} rounds, `examples/heart-disease.toml`, delta 1e-5 (RDP), seed "
          f"{args.seed}. Training samples: "
          + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".", "",
          "| run | final acc. | vs no DP | max epsilon | "
          + " | ".join(f"ε {n}" for n in names) + " |",
          "|---|---|---|---|" + "---|" * len(names)]
    for r in rows:
        hosp = r.get("hospitals", {})
        eps = [f"{hosp[n]['epsilon']:.3f} (z {hosp[n]['noise_multiplier']:.3f})" if n in hosp
               else "-" for n in names]
        mx = "-" if r["epsilon_max"] is None else f"{r['epsilon_max']:.3f}"
        md.append(f"| {r['run']} | {r['final_accuracy']:.4f} | "
                  f"{r['accuracy_ratio_vs_no_dp']:.3f} | {mx} | " + " | ".join(eps) + " |")
    md.append("")
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

"""Where a round's time goes: the coordinator's round under cProfile, beside the executor's.

LeNet on Fashion-MNIST (60 samples per client, batch 10, 1 epoch), ``--clients`` clients per
round, the chosen executor; optionally with secure aggregation on (issue 11, acceptance 5:
the whole-round time with and without it, and where the remaining time goes). For each
setting: seconds per round, the executor's share (``run_cohort``), and the functions with the
most own time in the rest of the round.

Writes ``benchmarks/results/round_profile[-TAG].json`` and ``.md``::

    python benchmarks/round_profile.py --device cuda --executor vectorized --clients 1000 \
        --secure-aggregation both
    python benchmarks/round_profile.py --quick
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import time
from pathlib import Path
from typing import Any

import torch

from confide.app.simulate import build_simulation
from confide.config import load_config

HERE = Path(__file__).resolve().parent


def _profile_rounds(overrides: list[str], rounds: int, device: str) -> dict[str, Any]:
    sim = build_simulation(load_config(None, overrides))
    coord = sim.coordinator
    inner = coord.executor
    executor_s = [0.0]
    original = inner.run_cohort

    def timed(tasks):  # type: ignore[no-untyped-def]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = original(tasks)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        executor_s[0] += time.perf_counter() - t
        return out

    inner.run_cohort = timed  # type: ignore[method-assign]
    coord.strategy.initialize(coord.params)
    coord.run_round(1)  # warm-up: compilation, CUDA graphs, allocator
    executor_s[0] = 0.0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for rnd in range(2, rounds + 2):
        coord.run_round(rnd)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    prof.disable()
    total = time.perf_counter() - t0
    inner.close()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({fn})", "calls": nc,
                     "own_s": tt / rounds, "cumulative_s": ct / rounds})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(25)
    per_round = total / rounds
    ex = executor_s[0] / rounds
    return {"s_per_round": per_round, "executor_s": ex, "outside_s": per_round - ex,
            "outside_share": (per_round - ex) / per_round, "top_own_time": rows[:25],
            "cumulative_text": text.getvalue()[-6000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--executor", default="vectorized")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--bf16-graphs", action="store_true",
                    help="vectorized: bf16 autocast and CUDA graphs")
    ap.add_argument("--secure-aggregation", choices=["off", "on", "both"], default="off")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run (digits)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    base = [f"client.device='{args.device}'", f"simulation.executor='{args.executor}'",
            "run.eval_every=1000", "run.rounds=1000", "run.seed=0"]
    if args.quick:
        base += ["data.num_clients=20", "cohort.size=1.0"]
    else:
        base += ["data.dataset='fashion-mnist'", "model.name='lenet'", "data.partition='iid'",
                 f"data.num_clients={args.clients}", "cohort.size=1.0", "client.epochs=1",
                 "client.batch_size=10", "client.lr=0.05", "client.momentum=0.9"]
    if args.bf16_graphs:
        base += ["simulation.mixed_precision='bf16'", "simulation.compile='cuda-graphs'"]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.secure_aggregation]
    results = []
    for secagg in modes:
        extra = ["secure_aggregation.enabled=true"] if secagg else []
        print(f"-- secure aggregation {'on' if secagg else 'off'}", flush=True)
        res = _profile_rounds([*base, *extra], args.rounds, args.device)
        res["secure_aggregation"] = secagg
        print(f"   {res['s_per_round']:.3f} s/round, executor {res['executor_s']:.3f} s, "
              f"outside {res['outside_s']:.3f} s ({res['outside_share']:.0%})", flush=True)
        for row in res["top_own_time"][:12]:
            print(f"   {row['own_s']:.4f} s  {row['calls']:>7}  {row['function']}")
        results.append(res)
    summary = {"clients": args.clients, "device": args.device, "executor": args.executor,
               "bf16_graphs": args.bf16_graphs, "rounds_timed": args.rounds,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "host": platform.node(), "torch": torch.__version__, "results": results}
    suffix = "-quick" if args.quick else (f"-{args.tag}" if args.tag else "")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / f"round_profile{suffix}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Where a round's time goes ({args.clients} clients, {args.executor}, "
             f"{summary['gpu'] or 'CPU'})", ""]
    for r in results:
        lines += [f"## secure aggregation {'on' if r['secure_aggregation'] else 'off'}: "
                  f"{r['s_per_round']:.3f} s/round, executor {r['executor_s']:.3f} s, outside "
                  f"{r['outside_s']:.3f} s ({r['outside_share']:.0%})", "",
                  "| own s/round | calls/round | function |", "|---|---|---|"]
        lines += [f"| {row['own_s']:.4f} | {row['calls'] // args.rounds} | `{row['function']}` |"
                  for row in r["top_own_time"][:15]]
        lines.append("")
    (out / f"round_profile{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

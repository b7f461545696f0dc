"""Secure aggregation cost: Confide's SecAgg+ against Flower 1.41's SecAgg+, same workload.

For each cohort size n and dropout rate, one round over vectors of ``--dim`` entries
(100,000 by default): every client's time in the protocol (all four stages, quantisation and
masking included), the coordinator's time (everything else), and the bytes each client sends
and receives. Dropped clients leave right after sharing their keys, the case that costs the
coordinator most (it must regenerate their pairwise masks; Bonawitz et al. 2017, §6).

Both protocols get the same graph: Confide's degree k and threshold t (from
``graph_parameters`` at the dropout rate), Flower ``num_shares = k + 1`` (its neighbourhood
counts the client itself) and ``reconstruction_threshold = t``. Flower runs its real
``SecAggPlusWorkflow`` and ``secaggplus_mod`` in process (``secagg_flower_driver.py``), with
each message serialised as over the wire.

    python benchmarks/secagg_bench.py                       # n = 100, 500; 0/10/30% dropout
    python benchmarks/secagg_bench.py --sizes 100 --no-flower

Writes ``benchmarks/results/secagg.json`` and ``secagg.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from confide.privacy.secagg import Contribution, SecAggClient, SecAggServer
from confide.privacy.secagg.graph import graph_parameters
from confide.privacy.secagg.quantisation import Quantiser
from confide.privacy.secagg.transport import InProcessMessagePath, run_secure_aggregation

HERE = Path(__file__).resolve().parent
TARGETS = {"client_seconds": 0.1, "coordinator_seconds": 2.0, "upload_expansion": 1.2}


class TimedPath(InProcessMessagePath):
    """In-process path that times each client's handlers (CPU and wall)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds: dict[int, float] = {}
        self.wall: dict[int, float] = {}

    def exchange(self, stage, requests):
        replies = {}
        for cid, request in requests.items():
            c0, w0 = time.process_time(), time.perf_counter()
            replies.update(super().exchange(stage, {cid: request}))
            self.seconds[cid] = self.seconds.get(cid, 0.0) + time.process_time() - c0
            self.wall[cid] = self.wall.get(cid, 0.0) + time.perf_counter() - w0
        return replies


def workload(n: int, dim: int, seed: int) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    rng = np.random.default_rng(seed)
    updates = {cid: (rng.normal(size=dim) * 0.01).astype(np.float32) for cid in range(1, n + 1)}
    weights = {cid: int(rng.integers(20, 200)) for cid in updates}
    return updates, weights


def run_confide(updates, weights, dropped, *, k, t, bits, dim):
    n = len(updates)
    q = Quantiser(bits=bits, clipping_range=8.0, max_weight=1000, cohort_size=n)
    server = SecAggServer(cohort=list(updates), server_round=1, bits=bits,
                          vector_length=q.vector_length(dim, 0), degree=k, threshold=t,
                          max_weight=1000, clipping_range=8.0)
    clients = {c: SecAggClient(c, server_round=1) for c in updates}
    contributions = {c: Contribution(update=updates[c], weight=weights[c]) for c in updates}
    path = TimedPath(clients, contributions, {c: "share_keys" for c in dropped})
    c0, w0 = time.process_time(), time.perf_counter()
    result = run_secure_aggregation(server, path)
    total, wall = time.process_time() - c0, time.perf_counter() - w0
    client = np.array(list(path.seconds.values()))
    # sanity: the decoded weighted mean is the plaintext one (to quantisation accuracy)
    update_sum, weight_sum, _ = q.decode(result.words, dim=dim, num_aux=0)
    alive = result.included
    want = sum(weights[c] * updates[c].astype(np.float64) for c in alive)
    error = float(np.abs(update_sum / weight_sum - want / sum(weights[c] for c in alive)).max())
    up = np.array([result.bytes_sent[c] for c in updates])
    down = np.array([result.bytes_received[c] for c in updates])
    survivors = [c for c in updates if c not in dropped]
    return {
        "client_seconds_mean": float(client.mean()), "client_seconds_max": float(client.max()),
        "coordinator_seconds": total - float(client.sum()),
        "coordinator_wall_seconds": wall - sum(path.wall.values()),
        "client_wall_seconds_mean": float(np.mean(list(path.wall.values()))),
        "bytes_up_per_client": float(np.mean([result.bytes_sent[c] for c in survivors])),
        "bytes_down_per_client": float(down.mean()),
        "upload_expansion": float(np.mean([result.bytes_sent[c] for c in survivors]))
        / (4 * dim),
        "bytes_up_all_mean": float(up.mean()),
        "summed": len(alive), "max_abs_error_of_mean": error,
    }


def run_flower(updates, weights, dropped, *, k, t, dim):
    sys.path.insert(0, str(HERE))
    from secagg_flower_driver import run_flower_secaggplus

    t0 = time.perf_counter()
    out = run_flower_secaggplus(updates, weights, num_shares=k + 1, threshold=t,
                                drop_after={c: "share_keys" for c in dropped})
    wall = time.perf_counter() - t0
    client = np.array(list(out["client_seconds"].values()))
    survivors = [c for c in updates if c not in dropped]
    up = float(np.mean([out["bytes_up"][c] for c in survivors]))
    return {
        "client_seconds_mean": float(client.mean()), "client_seconds_max": float(client.max()),
        "coordinator_seconds": float(out["coordinator_seconds"]),
        "coordinator_wall_seconds": float(out["coordinator_wall_seconds"]),
        "client_wall_seconds_mean": float(np.mean(list(out["client_wall"].values()))),
        "bytes_up_per_client": up,
        "bytes_down_per_client": float(np.mean(list(out["bytes_down"].values()))),
        "upload_expansion": up / (4 * dim), "summed": int(out["survivors"]),
        "wall_seconds": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--dim", type=int, default=100_000)
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--output", default=str(HERE / "results" / "secagg"))
    args = ap.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    rows = []
    for n in args.sizes:
        updates, weights = workload(n, args.dim, args.seed)
        for rate in args.dropouts:
            k, t = graph_parameters(n, dropout_rate=max(rate, 0.1), corrupt_rate=0.05)
            rng = np.random.default_rng(args.seed + n)
            dropped = {int(c) for c in rng.choice(list(updates), size=int(round(rate * n)),
                                                  replace=False)}
            row = {"n": n, "dim": args.dim, "dropout": rate, "degree": k, "threshold": t,
                   "bits": args.bits}
            row["confide"] = run_confide(updates, weights, dropped, k=k, t=t, bits=args.bits,
                                         dim=args.dim)
            c = row["confide"]
            print(f"n={n} dropout={rate:.0%} k={k} t={t} | confide: client "
                  f"{c['client_seconds_mean']*1e3:.1f} ms (max {c['client_seconds_max']*1e3:.1f}),"
                  f" coordinator {c['coordinator_seconds']:.2f} s, upload "
                  f"{c['upload_expansion']:.3f}x", flush=True)
            if not args.no_flower:
                row["flower"] = run_flower(updates, weights, dropped, k=k, t=t, dim=args.dim)
                f = row["flower"]
                row["ratio_flower_over_confide"] = {
                    key: f[key] / c[key] for key in
                    ("client_seconds_mean", "coordinator_seconds", "bytes_up_per_client")}
                print(f"{'':>30} flower: client {f['client_seconds_mean']*1e3:.1f} ms, "
                      f"coordinator {f['coordinator_seconds']:.2f} s, upload "
                      f"{f['upload_expansion']:.3f}x", flush=True)
            rows.append(row)
    write(rows, args)


def write(rows, args) -> None:
    import cryptography
    import flwr

    meta = {
        "benchmark": "SecAgg+ one round: Confide vs Flower 1.41 (same graph, same workload)",
        "dropped_after": "share_keys", "targets": TARGETS,
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "cryptography": cryptography.__version__, "flwr": flwr.__version__,
        "load_average": os.getloadavg(),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Secure aggregation: Confide SecAgg+ vs Flower 1.41 SecAgg+", "",
        f"One round, vectors of {args.dim:,} entries, {args.bits}-bit field for Confide (Flower:"
        " its defaults, 2^32 modulus, int64 arrays). Dropped clients leave after sharing keys."
        f" Host: {meta['cpus']} CPUs, load average {meta['load_average'][0]:.1f} at the end"
        " (a shared machine: absolute times are noisy, the ratios less so).", "",
        "Times are CPU seconds (process time), which a busy shared machine inflates far less "
        "than wall time (the JSON has both). Client: one client's CPU time over all four "
        "stages (mean). Coordinator: the server's CPU time for the whole round. Upload: bytes "
        "a surviving client sends over all stages / a float32 update (4 bytes per entry).", "",
        "| n | dropout | k | t | Confide client (ms) | Confide coord. (s) | Confide upload |"
        " Flower client (ms) | Flower coord. (s) | Flower upload | client ratio |"
        " coord. ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c, f = r["confide"], r.get("flower")
        cells = [str(r["n"]), f"{r['dropout']:.0%}", str(r["degree"]), str(r["threshold"]),
                 f"{c['client_seconds_mean']*1e3:.1f}", f"{c['coordinator_seconds']:.2f}",
                 f"{c['upload_expansion']:.3f}x"]
        if f:
            ratio = r["ratio_flower_over_confide"]
            cells += [f"{f['client_seconds_mean']*1e3:.1f}", f"{f['coordinator_seconds']:.2f}",
                      f"{f['upload_expansion']:.3f}x",
                      f"{ratio['client_seconds_mean']:.1f}x",
                      f"{ratio['coordinator_seconds']:.1f}x"]
        else:
            cells += ["-"] * 5
        lines.append("| " + " | ".join(cells) + " |")
    target = [r for r in rows if r["n"] == 500 and r["dropout"] == 0.1]
    if target:
        c = target[0]["confide"]
        lines += ["", "Targets at n = 500, 10% dropout: client "
                  f"{c['client_seconds_mean']*1e3:.1f} ms (target < 100 ms), coordinator "
                  f"{c['coordinator_seconds']:.2f} s (target < 2 s), upload "
                  f"{c['upload_expansion']:.3f}x (target < 1.2x)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()

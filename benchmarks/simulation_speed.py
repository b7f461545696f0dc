"""Simulation speed: the same workload through ``sequential``, ``vectorized`` and Flower's engine.

Workloads (issue 7):

* ``lenet`` — Fashion-MNIST, NIID-Bench's LeNet, ``--clients`` clients (default 1000) of 60
  samples, batch 10, 1 local epoch, every client in every round. Real Fashion-MNIST when it is
  installed (the first 60 x clients training images), otherwise synthetic data of the same
  shape (the results say which).
* ``femnist`` — LEAF's FEMNIST CNN (``femnist_cnn``, 6.6M parameters), 224 samples per client,
  batch 32, 1 local epoch, SGD without momentum (LEAF's setting), ``--femnist-cohort`` clients
  per round. Synthetic 28x28 images with 62 classes (FEMNIST itself is not available offline).

Every executor runs the same rounds from the same seed (round 1 is the warm-up: CUDA start-up,
cuDNN autotuning, graph capture; rounds 2.. are timed). Reported per executor:

* ``s/round`` and clients/s of the whole round (coordinator included: sampling, the finite
  check, aggregation of the result batch, server update);
* clients/s of the executor alone (``run_cohort`` until its result batch is ready on the
  device: the benchmark waits for the device after it, which costs the round nothing, since
  the coordinator's finite check waits there next);
* the time outside the executor (the coordinator's own work) and its share of the round;
* clients/s and TFLOP/s of the training computation alone: the vectorized executor's device
  time (CUDA events); for ``sequential`` the executor time is the computation;
* with ``--world-size N``: the bytes rank 0 exchanges with the other ranks per round (global
  weights out, sums or rows back; the task table apart), the seconds of that exchange and its
  share of the round;
* peak GPU memory; the relative difference of the final weights from ``sequential``'s.

FLOPs are counted with ``torch.utils.flop_counter`` on one local step of the model (forward +
backward, the conv input gradient of the first layer not computed), times the samples trained.
A second table times each convolution under ``vmap`` as grouped convolution and as unfold +
batched matmul (what ``simulation.conv_lowering = "auto"`` chooses between).

Needs only torch and numpy beside this repository (no opacus, flwr or cryptography); Flower's
engine is run when ``confide.app.flower_sim`` and ``flwr`` import, and skipped with a note
otherwise. Writes ``benchmarks/results/simulation_speed.{json,md}`` (``--quick``:
``simulation_speed_quick.*``)::

    python benchmarks/simulation_speed.py --device cuda              # both workloads
    python benchmarks/simulation_speed.py --device cuda --compile    # + torch.compile variant
    python benchmarks/simulation_speed.py --workloads lenet --clients 2000 --world-size 2
    python benchmarks/simulation_speed.py --workloads lenet --clients 16000 \
        --executors vectorized,"vectorized bf16 + CUDA graphs"   # a 16,000-client cohort
    python benchmarks/simulation_speed.py --quick                    # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from confide.app.simulate import build_simulation  # noqa: E402
from confide.config import load_config  # noqa: E402
from confide.models import build_model  # noqa: E402
from confide.simulations.datasets import FASHION_MNIST_DIR, load_dataset  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


# --------------------------------------------------------------------------- data


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray, x_test: np.ndarray,
               y_test: np.ndarray) -> Path:
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.int64),
             x_test=x_test.astype(np.float32), y_test=y_test.astype(np.int64))
    return path


def _synthetic(n: int, n_test: int, classes: int, seed: int) -> tuple[np.ndarray, ...]:
    """Images with a class-dependent pattern, so training makes progress (shapes 1x28x28)."""
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(classes, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, classes, size=n + n_test)
    x = 0.5 * protos[y] + rng.normal(size=(n + n_test, 1, 28, 28)).astype(np.float32)
    return x[:n], y[:n], x[n:], y[n:]


def lenet_data(folder: Path, clients: int) -> tuple[Path, str]:
    """60 samples per client: real Fashion-MNIST when installed, else synthetic."""
    n = 60 * clients
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        data = load_dataset("fashion-mnist", seed=0)
        reps = math.ceil(n / len(data.y_train))
        x = np.concatenate([data.x_train] * reps)[:n]
        y = np.concatenate([data.y_train] * reps)[:n]
        source = "Fashion-MNIST" + (f" (training set repeated {reps}x)" if reps > 1 else "")
        return _write_npz(folder / "lenet.npz", x, y, data.x_test, data.y_test), source
    x, y, xt, yt = _synthetic(n, 10_000, 10, seed=1)
    return (_write_npz(folder / "lenet.npz", x, y, xt, yt),
            "synthetic (Fashion-MNIST not installed), 1x28x28, 10 classes")


def femnist_data(folder: Path, clients: int) -> tuple[Path, str]:
    """224 samples per client, synthetic FEMNIST-shaped data (62 classes)."""
    x, y, xt, yt = _synthetic(224 * clients, 2_000, 62, seed=2)
    return (_write_npz(folder / "femnist.npz", x, y, xt, yt),
            "synthetic FEMNIST-shaped (LEAF FEMNIST is not available offline), 1x28x28, "
            "62 classes")


# --------------------------------------------------------------------------- workloads


def workload_overrides(name: str, data: Path, clients: int, cohort: int, device: str,
                       rounds: int) -> list[str]:
    common = [f"data.path='{data}'", "data.partition='iid'", f"data.num_clients={clients}",
              f"cohort.size={cohort}", "client.epochs=1", f"client.device='{device}'",
              f"run.rounds={rounds}", f"run.eval_every={rounds}", "run.seed=0"]
    if name == "lenet":
        return [*common, "model.name='lenet'", "client.batch_size=10", "client.lr=0.05",
                "client.momentum=0.9"]
    return [*common, "model.name='femnist_cnn'", "client.batch_size=32", "client.lr=0.01",
            "client.momentum=0.0"]


def flops_per_sample(model_name: str, data: Path, batch: int, device: torch.device) -> float:
    """Training FLOPs of one sample: forward + backward of one local step, per sample."""
    from torch.utils.flop_counter import FlopCounterMode

    with np.load(data) as npz:
        x = torch.as_tensor(npz["x"][:batch], device=device)
        y = torch.as_tensor(npz["y"][:batch], device=device)
        classes = int(npz["y"].max()) + 1
    model = build_model(model_name, input_shape=tuple(x.shape[1:]),
                        num_classes=max(classes, 10 if model_name == "lenet" else 62)).to(device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


def variants(device: str, include_compile: bool, world_size: int,
             unfold: bool = False) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = [("sequential", ["simulation.executor='sequential'"])]
    vec = ["simulation.executor='vectorized'"]
    eager = [*vec, "simulation.compile='off'"]
    out.append(("vectorized", eager))
    if device.startswith("cuda"):
        out.append(("vectorized + CUDA graphs", [*vec, "simulation.compile='cuda-graphs'"]))
        out.append(("vectorized bf16", [*eager, "simulation.mixed_precision='bf16'"]))
        bf16 = [*vec, "simulation.mixed_precision='bf16'"]
        out.append(("vectorized bf16 + CUDA graphs", [*bf16, "simulation.compile='cuda-graphs'"]))
        if include_compile:
            out.append(("vectorized bf16 + torch.compile",
                        [*bf16, "simulation.compile='torch-compile'"]))
    if world_size > 1:
        out.append((f"vectorized x{world_size} ranks",
                    [*eager, f"simulation.world_size={world_size}"]))
        if device.startswith("cuda"):
            out.append((f"vectorized bf16 + CUDA graphs x{world_size} ranks",
                        [*bf16, "simulation.compile='cuda-graphs'",
                         f"simulation.world_size={world_size}"]))
    if unfold:  # the same vectorized variants with every convolution as unfold + bmm
        out += [(f"{label} [unfold]", [*extra, "simulation.conv_lowering='unfold'"])
                for label, extra in list(out) if label.startswith("vectorized")]
    out.append(("flower", ["simulation.executor='flower'"]))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_executor(executor: Any, device: torch.device) -> list[float]:
    """Wall seconds of each ``run_cohort`` until its batch is ready on the device."""
    real = executor.run_cohort
    seconds: list[float] = []

    def run_cohort(tasks: Any) -> Any:
        t = time.perf_counter()
        out = real(tasks)
        _sync(device)  # the coordinator's finite check would wait here next
        seconds.append(time.perf_counter() - t)
        return out

    executor.run_cohort = run_cohort
    return seconds


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def run_variant(label: str, overrides: list[str], device: torch.device, flops: float,
                samples_per_client: int) -> dict[str, Any]:
    """Build the simulation, run every round, time rounds 2.. ."""
    row: dict[str, Any] = {"executor": label}
    if label == "flower":
        try:
            import flwr  # noqa: F401

            import confide.app.flower_sim  # noqa: F401
        except ImportError as exc:
            row["skipped"] = f"Flower's engine is not available here ({exc})"
            return row
    _peak_reset(device)
    cfg = load_config(None, overrides)
    t0 = time.perf_counter()
    sim = build_simulation(cfg)
    row["build_s"] = time.perf_counter() - t0
    coord = sim.coordinator
    executor = coord.executor
    executor_wall = _time_executor(executor, device)
    # evaluation is not part of a round's speed: done once, after the last round
    evaluator, coord.evaluator = coord.evaluator, None
    rounds_wall = []
    t_start = time.perf_counter()
    coord.strategy.initialize(coord.params)  # what Coordinator.run does before round 1
    try:
        for rnd in range(1, cfg.run.rounds + 1):
            t = time.perf_counter()
            coord.run_round(rnd)
            _sync(device)
            rounds_wall.append(time.perf_counter() - t)
    finally:
        executor.close()
    row["total_s"] = time.perf_counter() - t_start
    timed = list(range(1, len(rounds_wall))) or [0]
    clients = coord.history[-1]["num_sampled"]
    round_s = float(np.mean([rounds_wall[i] for i in timed]))
    train_s = float(np.mean([executor_wall[i] for i in timed]))
    round_flops = flops * samples_per_client * clients
    row.update({
        "rounds": len(rounds_wall), "timed_rounds": len(timed), "clients_per_round": clients,
        "first_round_s": rounds_wall[0], "s_per_round": round_s,
        "clients_per_s_round": clients / round_s,
        "executor_s": train_s, "clients_per_s_executor": clients / train_s,
        "outside_executor_s": round_s - train_s,
        "outside_executor_share": (round_s - train_s) / round_s,
        "tflops_executor": round_flops / train_s / 1e12,
        "peak_gpu_gib": _peak(device),
        "fallback": getattr(executor, "fallback_reason", None),
        "final_accuracy": evaluator(coord.params)["accuracy"] if evaluator else None,
    })
    stats = getattr(executor, "stats", None)
    options = getattr(executor, "options", None)
    if stats and options is not None and getattr(executor, "trainer", None) is not None:
        compute = float(np.mean([stats[i]["compute_s"] for i in timed]))
        label_ranks = " (rank 0)" if options.world_size > 1 else ""
        row["compute_s"] = compute
        row["compute_note"] = f"device time{label_ranks}"
        if options.world_size == 1:
            row["clients_per_s_compute"] = clients / compute
            row["tflops_compute"] = round_flops / compute / 1e12
        row["conv_unfolded"] = list(executor.trainer.layout.unfolded)
        if options.world_size > 1:
            exchange = float(np.mean([stats[i]["rank_exchange_s"] for i in timed]))
            row.update({
                "rank_bytes_per_round": float(np.mean([stats[i]["rank_bytes"]
                                                       for i in timed])),
                "task_bytes_per_round": float(np.mean([stats[i]["task_bytes"]
                                                       for i in timed])),
                "rank_exchange_s": exchange, "rank_exchange_share": exchange / round_s,
                "rank_exchange": "rows" if executor.rows_reason else "sums",
                "rank_rows_reason": executor.rows_reason})
    elif label == "sequential":
        row["compute_s"] = train_s  # one client at a time: the executor is the computation
        row["clients_per_s_compute"] = clients / train_s
        row["tflops_compute"] = round_flops / train_s / 1e12
    row["params"] = coord.params.detach().double().cpu()
    del sim, coord, executor
    gc.collect()
    return row


def conv_table(model_name: str, data: Path, device: torch.device, clients: int, batch: int,
               mixed_precision: str) -> list[dict[str, Any]]:
    from confide.simulations.vectorized import conv_lowering_costs

    with np.load(data) as npz:
        sample = torch.as_tensor(npz["x"][:batch], device=device)
    model = build_model(model_name, input_shape=tuple(sample.shape[1:]),
                        num_classes=10 if model_name == "lenet" else 62).to(device)
    rows = conv_lowering_costs(model, sample, clients=clients, batch=batch,
                               mixed_precision=mixed_precision)
    for r in rows:
        r["precision"] = mixed_precision
        for k in ("grouped", "unfold"):
            s = r[f"{k}_s"]
            r[f"{k}_tflops"] = r["flops"] / s / 1e12 if s and math.isfinite(s) else None
    return rows


# --------------------------------------------------------------------------- report


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = ["# Simulation speed: sequential vs vectorized vs Flower", "",
             f"Device: {env['device_name']} ({env['device']}), torch {env['torch']}, "
             f"Python {env['python']}, {env['cpus']} CPU cores. Command: "
             f"`{report['command']}`.", ""]
    for w in report["workloads"]:
        lines += [f"## {w['name']}: {w['description']}", "",
                  f"Data: {w['data']}. FLOPs per trained sample (fwd+bwd): "
                  f"{w['flops_per_sample'] / 1e6:.1f} MFLOP; per client per round: "
                  f"{w['flops_per_sample'] * w['samples_per_client'] / 1e9:.2f} GFLOP.", "",
                  "| executor | clients/round | s/round | clients/s (round) | clients/s "
                  "(executor) | outside executor s (share) | clients/s (training) "
                  "| TFLOP/s (training) | TFLOP/s (executor) | x sequential (round / executor "
                  "/ training) | peak GPU GiB | rel. diff of weights vs sequential "
                  "| first round s | accuracy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in w["results"]:
            if "skipped" in r or "error" in r:
                lines.append(f"| {r['executor']} | {r.get('skipped') or r.get('error')} "
                             + "| " * 12 + "|")
                continue
            ratio = (f"{_fmt(r.get('speedup_round'), 1)} / "
                     f"{_fmt(r.get('speedup_executor'), 1)} / "
                     f"{_fmt(r.get('speedup_compute'), 1)}")
            lines.append(
                f"| {r['executor']} | {r['clients_per_round']} | {_fmt(r['s_per_round'], 3)} "
                f"| {_fmt(r['clients_per_s_round'], 0)} "
                f"| {_fmt(r['clients_per_s_executor'], 0)} "
                f"| {_fmt(r['outside_executor_s'], 3)} "
                f"({100 * r['outside_executor_share']:.0f}%) "
                f"| {_fmt(r.get('clients_per_s_compute'), 0)} "
                f"| {_fmt(r.get('tflops_compute'))} | {_fmt(r['tflops_executor'])} | {ratio} "
                f"| {_fmt(r['peak_gpu_gib'])} | {_fmt(r.get('rel_diff_vs_sequential'))} "
                f"| {_fmt(r['first_round_s'], 1)} | {_fmt(r['final_accuracy'], 4)} |")
        notes = [f"- {r['executor']}: fell back to sequential ({r['fallback']})"
                 for r in w["results"] if r.get("fallback")]
        notes += [f"- {r['executor']}: ranks exchange {r['rank_exchange']}: "
                  f"{r['rank_bytes_per_round'] / 2**20:.3f} MiB per round (+ task table "
                  f"{r['task_bytes_per_round'] / 2**10:.1f} KiB), "
                  f"{_fmt(r['rank_exchange_s'], 4)} s = "
                  f"{100 * r['rank_exchange_share']:.1f}% of the round"
                  + (f" (rows because {r['rank_rows_reason']})" if r["rank_rows_reason"]
                     else "")
                  for r in w["results"] if "rank_bytes_per_round" in r]
        notes += [f"- {r['executor']}: convolutions run as unfold + bmm: "
                  f"{', '.join(r['conv_unfolded']) or 'none (grouped convolution)'}"
                  for r in w["results"] if "conv_unfolded" in r]
        if notes:
            lines += ["", *notes]
        if w.get("conv"):
            lines += ["", "Convolutions under `vmap` with per-client weights (forward + "
                      "backward):", "",
                      "| layer | input | clients x batch | precision | grouped ms | grouped "
                      "TFLOP/s | unfold+bmm ms | unfold+bmm TFLOP/s |",
                      "|---|---|---|---|---|---|---|---|"]
            for c in w["conv"]:
                lines.append(
                    f"| {c['layer']} | {'x'.join(map(str, c['input']))} | {c['clients']} x "
                    f"{c['batch']} | {c['precision']} | {_fmt(1e3 * c['grouped_s'])} "
                    f"| {_fmt(c['grouped_tflops'])} | {_fmt(1e3 * c['unfold_s'])} "
                    f"| {_fmt(c['unfold_tflops'])} |")
        lines.append("")
    lines += ["Columns: *round* = the coordinator's whole round (sampling, training, the "
              "finite check, aggregation of the result batch, server update); *executor* "
              "= `run_cohort` until its result batch is ready on the device; *outside "
              "executor* = round - executor (the coordinator's own work); *training* = the "
              "vectorized executor's device time for the local training (CUDA events; rank 0 "
              "alone with several ranks) — for `sequential` the executor time. Round 1 "
              "(warm-up) is not timed unless it is the only round.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clients", type=int, default=1000, help="lenet clients (all per round)")
    ap.add_argument("--femnist-clients", type=int, default=None,
                    help="FEMNIST population (default: the cohort)")
    ap.add_argument("--femnist-cohort", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per executor (1 warm-up)")
    ap.add_argument("--workloads", default="lenet,femnist")
    ap.add_argument("--executors", default=None,
                    help="comma-separated subset of executor labels (default: all)")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile variant")
    ap.add_argument("--world-size", type=int, default=1,
                    help="also run the vectorized executor over this many GPUs")
    ap.add_argument("--no-conv-table", action="store_true")
    ap.add_argument("--unfold", action="store_true",
                    help="add each vectorized variant with simulation.conv_lowering='unfold'")
    ap.add_argument("--quick", action="store_true", help="tiny CPU smoke run")
    ap.add_argument("--out", default=None, help="results path without suffix")
    args = ap.parse_args(argv)
    if args.quick:
        args.device = "cpu"
        args.clients = min(args.clients, 20)
        args.femnist_cohort = min(args.femnist_cohort, 4)
        args.rounds = min(args.rounds, 2)
    # INFO: the vectorized executor logs its chunk sizes, conv lowering and any fallback
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    out = Path(args.out) if args.out else RESULTS / (
        "simulation_speed_quick" if args.quick else "simulation_speed")
    env = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
           "cpus": os.cpu_count(),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else platform.processor() or "CPU",
           "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    report: dict[str, Any] = {"environment": env, "command": " ".join(sys.argv),
                              "workloads": []}
    wanted = None if args.executors is None else {e.strip() for e in args.executors.split(",")}
    with tempfile.TemporaryDirectory(prefix="confide-speed-") as tmp:
        folder = Path(tmp)
        for name in [w.strip() for w in args.workloads.split(",") if w.strip()]:
            if name == "lenet":
                population = cohort = args.clients
                data, source = lenet_data(folder, population)
                samples, batch, model = 60, 10, "lenet"
                desc = (f"LeNet, {cohort} clients x 60 samples, batch 10, 1 epoch, SGD "
                        "momentum 0.9")
            elif name == "femnist":
                cohort = args.femnist_cohort
                population = args.femnist_clients or cohort
                data, source = femnist_data(folder, population)
                samples, batch, model = 224, 32, "femnist_cnn"
                desc = (f"LEAF FEMNIST CNN (6.6M parameters), {cohort} clients per round x "
                        "224 samples, batch 32, 1 epoch, SGD")
            else:
                raise SystemExit(f"unknown workload {name!r}; choose lenet, femnist")
            print(f"== {name}: {desc}; data: {source}", flush=True)
            fps = flops_per_sample(model, data, batch, device)
            w: dict[str, Any] = {"name": name, "description": desc, "data": source,
                                 "flops_per_sample": fps, "samples_per_client": samples,
                                 "results": []}
            base = workload_overrides(name, data, population, cohort, args.device, args.rounds)
            for label, extra in variants(args.device, args.compile, args.world_size,
                                          args.unfold):
                if wanted is not None and label not in wanted:
                    continue
                print(f"-- {label}", flush=True)
                try:
                    row = run_variant(label, [*base, *extra], device, fps, samples)
                except Exception as exc:  # a failing variant is reported, the rest still run
                    traceback.print_exc()
                    row = {"executor": label, "error": f"{type(exc).__name__}: {exc}"[:300]}
                w["results"].append(row)
                print({k: v for k, v in row.items() if k != "params"}, flush=True)
            seq = next((r for r in w["results"] if r["executor"] == "sequential"
                        and "params" in r), None)
            ref = seq["params"] if seq is not None else None
            for r in w["results"]:
                p = r.pop("params", None)
                if seq is None or p is None:
                    continue
                if r is not seq:
                    r["rel_diff_vs_sequential"] = float((p - ref).norm() / ref.norm())
                for key, col in (("speedup_round", "clients_per_s_round"),
                                 ("speedup_executor", "clients_per_s_executor"),
                                 ("speedup_compute", "clients_per_s_compute")):
                    if r.get(col) and seq.get(col):
                        r[key] = r[col] / seq[col]
            if not args.no_conv_table:
                chunk = min(cohort, 64 if name == "lenet" else 32)
                precisions = ["off", "bf16"] if device.type == "cuda" else []
                w["conv"] = []
                for precision in precisions:
                    try:
                        w["conv"] += conv_table(model, data, device, chunk, batch, precision)
                    except Exception as exc:
                        print(f"conv table ({precision}) failed: {exc}", flush=True)
            report["workloads"].append(w)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

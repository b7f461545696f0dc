"""``simulation.executor = "flower"``: Flower's simulation engine gives the sequential result.

The runs happen in a child process: Ray leaves file handles and helper processes to the
garbage collector, which pytest (warnings as errors) would report against unrelated tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
from confide.config import load_config
from confide.app.simulate import build_simulation
overrides = ["run.rounds=2", "data.num_clients=4", "data.partition='iid'", "client.epochs=1",
             "client.device='cpu'", "cohort.size=3"]
out = {}
for executor in ("sequential", "flower"):
    sim = build_simulation(load_config(None, [*overrides, f"simulation.executor='{executor}'"]))
    history = sim.coordinator.run()
    out[executor] = {"params": sim.coordinator.params.tolist(),
                     "accuracy": [r["test_accuracy"] for r in history],
                     "clients": [r["num_clients"] for r in history]}
json.dump(out, sys.stdout)
"""


def test_flower_engine_matches_sequential(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    env.pop("FLWR_HOME", None)  # the executor must keep Flower state out of $HOME itself
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    seq, flw = out["sequential"], out["flower"]
    # Ray actors use other thread counts, so float sums may differ in the last bits.
    diff = max(abs(a - b) for a, b in zip(seq["params"], flw["params"], strict=True))
    assert diff < 1e-5
    assert seq["accuracy"] == flw["accuracy"]
    assert flw["clients"] == [3, 3]
    assert list(Path(home).iterdir()) == []  # no Flower or Ray state in $HOME

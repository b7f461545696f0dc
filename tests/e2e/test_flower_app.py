"""Confide as a Flower App: Flower's own ``flwr run`` on a local SuperLink and SuperNodes.

The test starts a real ``flower-superlink`` and one ``flower-supernode`` per client (both
``--insecure``, on free loopback ports, Flower state in a temporary ``FLWR_HOME``), submits
``examples/flower-app`` with ``flwr run``, and compares the run folder the ServerApp writes
with ``confide simulate`` (sequential executor) for the same config and seed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from deploy_testing import child_env, free_port, port_open, processes, wait_for

from confide.app.simulate import run_simulation

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "flower-app"
#: the job, as Flower run-config keys; the same keys are confide simulate's --set
JOB = {"run.rounds": 2, "run.seed": 3, "data.num_clients": 3, "cohort.size": 2,
       "data.partition": "iid", "client.epochs": 1, "client.device": "cpu"}
NUM_NODES = JOB["data.num_clients"]


def _literal(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower() \
        if isinstance(value, bool) else str(value)


def _flower_env(tmp_path: Path) -> dict[str, str]:
    # Insecure (no TLS) on purpose: loopback only, inside this test.
    home = tmp_path / "flwr-home"
    home.mkdir(exist_ok=True)
    return {**child_env(), "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_flwr_run_matches_confide_simulate(tmp_path):
    env = _flower_env(tmp_path)
    # Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTP port.
    port = free_port()
    (Path(env["FLWR_HOME"]) / "config.toml").write_text(
        '[superlink]\ndefault = "confide-local"\n\n[superlink.confide-local]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    out = tmp_path / "flower-run"
    with processes(tmp_path) as procs:
        procs.spawn("superlink", [
            "flower-superlink", "--insecure", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1", "--port", str(port),
            "--database", str(tmp_path / "state.db")], env=env)
        wait_for(lambda: port_open(port), 60, "the SuperLink")
        for i in range(NUM_NODES):
            procs.spawn(f"supernode{i}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={i} num-partitions={NUM_NODES}"], env=env)
        run_config = " ".join(f"{k}={_literal(v)}" for k, v in
                              {**JOB, "output-dir": str(out)}.items())
        flwr = subprocess.run(  # noqa: S603
            ["flwr", "run", str(app), "confide-local", "--run-config", run_config,
             "--stream"], env=env, capture_output=True, text=True, timeout=600,
            cwd=tmp_path, check=False)
        assert flwr.returncode == 0, flwr.stdout[-3000:] + flwr.stderr[-3000:]
        wait_for(lambda: (out / "model.pt").is_file(), 120, "the ServerApp's model.pt")

    sim_dir, _ = run_simulation(None, output=tmp_path / "simulate",
                                overrides=[*(f"{k}={_literal(v)}" for k, v in JOB.items()),
                                           "simulation.executor='sequential'"])
    flower_history = json.loads((out / "history.json").read_text())
    sim_history = json.loads((sim_dir / "history.json").read_text())
    assert len(flower_history) == len(sim_history) == JOB["run.rounds"]
    for f, s in zip(flower_history, sim_history, strict=True):
        assert f["num_clients"] == s["num_clients"] == JOB["cohort.size"]
        assert f["test_accuracy"] == pytest.approx(s["test_accuracy"], abs=1e-9)
        assert f["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
    flower_model = torch.load(out / "model.pt")
    sim_model = torch.load(sim_dir / "model.pt")
    assert flower_model.keys() == sim_model.keys()
    for name, tensor in sim_model.items():
        torch.testing.assert_close(flower_model[name], tensor, atol=1e-5, rtol=0)

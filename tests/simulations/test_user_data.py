"""A user's own data: token ids stay integers, labels mapped and saved, clients inferred."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from confide.app.simulate import build_simulation, run_simulation
from confide.client.data import read_data_file
from confide.config import load_config
from confide.simulations.datasets import load_dataset

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "text-embedding"


def test_integer_inputs_stay_integers(tmp_path):
    path = tmp_path / "tokens.npz"
    np.savez(path, x=np.arange(60, dtype=np.int32).reshape(20, 3), y=np.arange(20) % 2)
    data = load_dataset("ignored", seed=0, path=str(path))
    assert data.x_train.dtype == np.int64 and data.x_test.dtype == np.int64
    assert read_data_file(path)[0].dtype == np.int64  # a deployed client reads the same
    # uint8 is read as pixel values, floats stay floats
    np.savez(path, x=np.ones((20, 3), dtype=np.uint8), y=np.arange(20) % 2)
    assert load_dataset("ignored", seed=0, path=str(path)).x_train.dtype == np.float32


def test_standardize_and_the_raw_feature_warning(tmp_path, caplog):
    rng = np.random.default_rng(0)
    path = tmp_path / "raw.npz"
    np.savez(path, x=rng.normal(500.0, 80.0, size=(60, 4)), y=np.arange(60) % 3)
    data = load_dataset("ignored", seed=0, path=str(path))
    assert np.allclose(data.x_train.mean(0), 0, atol=1e-5)
    assert np.allclose(data.x_train.std(0), 1, atol=1e-4)
    assert data.scaling is not None and len(data.scaling["mean"]) == 4
    caplog.set_level(logging.WARNING, logger="confide")
    raw = load_dataset("ignored", seed=0, path=str(path), standardize=False)
    assert raw.x_train.max() > 100
    assert any("data.standardize = true" in r.message for r in caplog.records)


def _text_npz(tmp_path):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data
    finally:
        sys.path.remove(str(EXAMPLE))
    path = tmp_path / "text.npz"
    np.savez(path, **make_data.make(n=600, seed=1))
    return path, make_data


def test_label_map_and_natural_client_count(tmp_path):
    path, make_data = _text_npz(tmp_path)
    over = [f"data.path='{path}'", "data.partition='natural'", "run.rounds=1",
            "model.name='logreg'", "client.device='cpu'"]
    sim = build_simulation(load_config(None, over))
    assert sim.config.data.num_clients == len(make_data.SITES)  # no data.num_clients given
    assert len(sim.partitions) == len(make_data.SITES)


@pytest.mark.slow
def test_embedding_model_trains_on_token_ids(tmp_path, monkeypatch):
    path, make_data = _text_npz(tmp_path)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    run_dir, history = run_simulation(
        EXAMPLE / "job.toml", output=tmp_path / "run",
        overrides=[f"data.path='{path}'", "run.rounds=6", "client.device='cpu'"])
    assert history[-1]["test_accuracy"] > 0.8  # chance is about 0.25
    mapping = json.loads((run_dir / "label_map.json").read_text())["class_index_to_label"]
    assert sorted(mapping.values()) == sorted(make_data.TOPICS)
    assert mapping == {str(i): t for i, t in enumerate(sorted(make_data.TOPICS))}
    assert (run_dir / "plots" / "partition.png").is_file()
    saved = (run_dir / "config.toml").read_text()
    assert f"num_clients = {len(make_data.SITES)}" in saved  # resumable with the same clients
    weights = torch.load(run_dir / "model.pt")
    assert weights["embed.weight"].shape[0] == 256


@pytest.mark.slow
def test_a_diverging_run_is_flagged_in_log_and_history(tmp_path, caplog):
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()  # raw features up to ~4000
    path = tmp_path / "raw.npz"
    np.savez(path, x=bunch.data, y=bunch.target)
    caplog.set_level(logging.WARNING, logger="confide")
    run_dir, _ = run_simulation(None, output=tmp_path / "r", overrides=[
        f"data.path='{path}'", "data.standardize=false", "run.rounds=2", "data.num_clients=4",
        "client.epochs=1", "client.lr=0.001", "model.name='logreg'", "client.device='cpu'"])
    messages = [r.getMessage() for r in caplog.records]
    assert any("training diverges" in m and "data.standardize = true" in m for m in messages)
    saved = json.loads((run_dir / "history.json").read_text())
    assert saved[0].get("diverged") is True

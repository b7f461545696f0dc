"""Shared fixtures: keep Flower/Ray state and run folders out of the user's home."""

from __future__ import annotations

import logging
import os

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path_factory.mktemp("flwr_home")
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path_factory.getbasetemp() / "ray"))
    yield
    # The CLI configures the "confide" logger for a terminal (own handler, no propagation);
    # undo that after in-process CLI tests so later tests' caplog sees log records again.
    logger = logging.getLogger("confide")
    logger.handlers.clear()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)

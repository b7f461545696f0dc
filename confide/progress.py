"""Progress inside a round: clients done out of the cohort, and the current local epoch.

An executor calls :meth:`RoundProgress.start_round` when it gets a cohort,
:meth:`~RoundProgress.epoch` as a client starts each local epoch and
:meth:`~RoundProgress.client_done` as each client finishes; the run calls
:meth:`~RoundProgress.end_round` with the round's record. Two displays:

* :class:`LogRoundProgress` — plain lines through the ``confide`` logger, at most one every
  ``interval_s`` seconds (``CONFIDE_PROGRESS_INTERVAL``, default 5) plus one at the end of
  every round: what a log file or a CI job shows when stderr is not a terminal;
* :class:`RichRoundProgress` — a live "clients" bar beside the CLI's rounds bar, for a terminal.

Torch-free, so the CLI can import it before torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["RoundProgress", "LogRoundProgress", "RichRoundProgress", "progress_interval"]

log = logging.getLogger("confide")


def progress_interval(default: float = 5.0) -> float:
    """Seconds between plain progress lines (``CONFIDE_PROGRESS_INTERVAL`` overrides)."""
    text = os.environ.get("CONFIDE_PROGRESS_INTERVAL", "").strip()
    try:
        return max(0.0, float(text)) if text else default
    except ValueError:
        return default


class RoundProgress:
    """Receives in-round progress; every hook is a no-op here."""

    def start_round(self, rnd: int, cohort: int) -> None:
        """A round's training starts with ``cohort`` clients."""

    def epoch(self, epoch: int, epochs: int) -> None:
        """The client being trained starts local epoch ``epoch`` (1-based) of ``epochs``."""

    def client_done(self, n: int = 1) -> None:
        """``n`` more clients finished (or dropped out)."""

    def end_round(self, record: Mapping[str, Any] | None = None) -> None:
        """The round is recorded (``record`` is its history row)."""


class LogRoundProgress(RoundProgress):
    """Plain periodic lines through a logger (stderr that is not a terminal)."""

    def __init__(self, *, logger: logging.Logger | None = None, interval_s: float | None = None,
                 rounds: int | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.logger = logger or log
        self.interval_s = progress_interval() if interval_s is None else interval_s
        self.rounds = rounds
        self.clock = clock
        self.rnd = 0
        self.cohort = 0
        self.done = 0
        self.current_epoch: tuple[int, int] | None = None
        self._t0 = self._last = clock()

    def _round_name(self) -> str:
        return f"round {self.rnd}/{self.rounds}" if self.rounds else f"round {self.rnd}"

    def _maybe_emit(self) -> None:
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        line = f"{self._round_name()}: {self.done}/{self.cohort} clients done"
        if self.current_epoch is not None and self.done < self.cohort:
            line += f", client {self.done + 1} in epoch {self.current_epoch[0]}/" \
                    f"{self.current_epoch[1]}"
        self.logger.info("%s (%.0f s)", line, now - self._t0)

    def start_round(self, rnd: int, cohort: int) -> None:  # noqa: D102
        self.rnd, self.cohort, self.done = rnd, cohort, 0
        self.current_epoch = None
        self._t0 = self._last = self.clock()

    def epoch(self, epoch: int, epochs: int) -> None:  # noqa: D102
        self.current_epoch = (epoch, epochs)
        self._maybe_emit()

    def client_done(self, n: int = 1) -> None:  # noqa: D102
        self.done += n
        self.current_epoch = None
        self._maybe_emit()

    def end_round(self, record: Mapping[str, Any] | None = None) -> None:  # noqa: D102
        record = record or {}
        rnd = record.get("round", self.rnd)
        if rnd != self.rnd:  # the executor did not report this round (no hooks there)
            self.rnd, self.cohort = int(rnd), int(record.get("num_sampled", 0))
        parts = [f"{self._round_name()} done: {record.get('num_clients', self.done)}/"
                 f"{record.get('num_sampled', self.cohort)} clients"]
        if record.get("train_loss") is not None:
            parts.append(f"train loss {record['train_loss']:.4f}")
        if record.get("test_accuracy") is not None:
            parts.append(f"test accuracy {record['test_accuracy']:.4f}")
        if record.get("epsilon") is not None:
            parts.append(f"ε {record['epsilon']:.3f}")
        self.logger.info("%s (%.1f s)", ", ".join(parts), self.clock() - self._t0)
        self._last = self.clock()


class RichRoundProgress(RoundProgress):
    """A "clients" bar (with the current epoch) in a ``rich.progress.Progress``.

    The progress's columns may show ``{task.fields[status]}``; this sets it.
    """

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None
        self._label = ""

    def start_round(self, rnd: int, cohort: int) -> None:  # noqa: D102
        self._label = f"round {rnd}: clients"
        if self.task is None:
            self.task = self.progress.add_task("clients", total=cohort, status=self._label)
        self.progress.reset(self.task, total=cohort, completed=0, status=self._label)

    def epoch(self, epoch: int, epochs: int) -> None:  # noqa: D102
        if self.task is not None:
            self.progress.update(self.task, status=f"{self._label}, epoch {epoch}/{epochs}")

    def client_done(self, n: int = 1) -> None:  # noqa: D102
        if self.task is not None:
            self.progress.update(self.task, advance=n, status=self._label)

"""The privacy ledger: what each protected party has spent, persisted in the run folder.

``run_dir/privacy_ledger.json`` is written atomically at step 8 of every round, *before*
the round's model is evaluated, written to ``history.json`` or checkpointed (DESIGN.md, data
flow). It holds one *account* per protected party:

* ``population`` — client-level DP (central or distributed DP-FedAvg): one event per round;
* ``client:<id>`` — sample-level DP-SGD: the events of each client's own local training.

Every entry is ``{round, noise_multiplier, sample_rate, steps, epsilon}``, ``epsilon`` being the
cumulative epsilon after it, from an Opacus accountant (:mod:`confide.privacy.accounting`).
Entries are only ever appended; a reported epsilon never decreases. ``accountant`` (also
written as ``enforced_accountant``) is the one whose epsilon the budget is enforced with;
:meth:`PrivacyLedger.epsilon_by_accountant` (``confide privacy ledger RUN_DIR``) reports the
same history under every accountant (RDP, PRV, PLD) beside it.

On resume the checkpoint's copy and the file are reconciled: the file may hold a round that
was accounted but never checkpointed (the process stopped in between). Such a round may
already have been released (``history.json`` is written before the checkpoint), so it stays
counted and a re-run of the round is counted again — conservative, never optimistic.

:class:`LedgeredPrivacy` implements the coordinator's budget, accounting and state hooks on
top of the ledger; a DP mode subclasses it and only says which events a round produces
(:meth:`LedgeredPrivacy.planned_events`, :meth:`LedgeredPrivacy.stage_event`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confide.exceptions import PrivacyBudgetExceeded, PrivacyError
from confide.files import atomic_write_text
from confide.privacy.accounting import (
    ACCOUNTANTS,
    PrivacyEvent,
    check_accountant,
    check_delta,
    epsilon_of,
)
from confide.privacy.base import RoundPrivacy

if TYPE_CHECKING:
    from confide.config import Config

__all__ = ["cohort_sampling", "LEDGER_NAME", "LEDGER_FORMAT", "PrivacyAccount", "PrivacyLedger",
           "LedgeredPrivacy", "load_ledger"]

log = logging.getLogger("confide")

LEDGER_NAME = "privacy_ledger.json"
LEDGER_FORMAT = 1
POPULATION = "population"


def _same_event(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return (int(a["round"]) == int(b["round"]) and int(a["steps"]) == int(b["steps"])
            and math.isclose(float(a["noise_multiplier"]), float(b["noise_multiplier"]),
                             rel_tol=1e-12)
            and math.isclose(float(a["sample_rate"]), float(b["sample_rate"]), rel_tol=1e-12))


@dataclass
class PrivacyAccount:
    """The append-only event list of one protected party."""

    entries: list[dict[str, Any]] = field(default_factory=list)

    def events(self) -> list[PrivacyEvent]:
        """The ``(noise_multiplier, sample_rate, steps)`` history, oldest first."""
        return [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
                for e in self.entries]

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (0 before the first event)."""
        return float(self.entries[-1]["epsilon"]) if self.entries else 0.0

    def epsilon_after(self, event: PrivacyEvent, *, delta: float, accountant: str) -> float:
        """Epsilon if ``event`` were added (monotone: never below what is spent)."""
        return max(self.epsilon, epsilon_of([*self.events(), event], delta=delta,
                                             accountant=accountant))

    def record(self, server_round: int, event: PrivacyEvent, *, delta: float,
               accountant: str) -> float:
        """Append ``event``; returns the new cumulative epsilon."""
        eps = self.epsilon_after(event, delta=delta, accountant=accountant)
        z, q, steps = event
        self.entries.append({"round": int(server_round), "noise_multiplier": float(z),
                             "sample_rate": float(q), "steps": int(steps), "epsilon": eps})
        return eps


@dataclass
class PrivacyLedger:
    """Every account of a run, with the settings the epsilons were computed under."""

    mode: str
    accountant: str
    delta: float
    target_epsilon: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    accounts: dict[str, PrivacyAccount] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_accountant(self.accountant)
        check_delta(self.delta)

    # ------------------------------------------------------------------ queries
    @property
    def epsilon(self) -> float:
        """The largest epsilon any party has spent (0 before any event)."""
        return max((a.epsilon for a in self.accounts.values()), default=0.0)

    @property
    def num_events(self) -> int:
        """Number of entries over all accounts."""
        return sum(len(a.entries) for a in self.accounts.values())

    def epsilon_by_accountant(self, key: str | None = None,
                              accountants: tuple[str, ...] = ACCOUNTANTS) -> dict[str, float]:
        """Epsilon of account ``key`` (default: the one that spent most) under each accountant.

        Only the enforced accountant's epsilon stops a run; the others are for comparison
        (each is an upper bound on the same mechanism's privacy loss).
        """
        if key is None:
            key = max(self.accounts, key=lambda k: self.accounts[k].epsilon, default=None)
        events = [] if key is None else self.accounts[key].events()
        return {name: epsilon_of(events, delta=self.delta, accountant=name)
                for name in accountants}

    def account(self, key: str) -> PrivacyAccount:
        """The account ``key`` (created empty on first use)."""
        return self.accounts.setdefault(key, PrivacyAccount())

    def epsilon_after(self, key: str, event: PrivacyEvent) -> float:
        """Epsilon of account ``key`` if ``event`` were added."""
        acc = self.accounts.get(key, PrivacyAccount())
        return acc.epsilon_after(event, delta=self.delta, accountant=self.accountant)

    def record(self, key: str, server_round: int, event: PrivacyEvent) -> float:
        """Append ``event`` to account ``key``; returns that account's epsilon."""
        return self.account(key).record(server_round, event, delta=self.delta,
                                        accountant=self.accountant)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON- and ``torch.load(weights_only=True)``-safe dict."""
        return {
            "format": LEDGER_FORMAT,
            "mode": self.mode,
            "accountant": self.accountant,
            "enforced_accountant": self.accountant,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon,
            "settings": dict(self.settings),
            "accounts": {k: [dict(e) for e in a.entries] for k, a in self.accounts.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "privacy ledger"
                  ) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; a malformed ledger raises PrivacyError."""
        try:
            if int(data["format"]) != LEDGER_FORMAT:
                raise PrivacyError(f"{source} has format {data['format']!r}; this version "
                                   f"reads format {LEDGER_FORMAT}")
            accounts = {
                str(k): PrivacyAccount([
                    {"round": int(e["round"]), "noise_multiplier": float(e["noise_multiplier"]),
                     "sample_rate": float(e["sample_rate"]), "steps": int(e["steps"]),
                     "epsilon": float(e["epsilon"])} for e in entries])
                for k, entries in dict(data["accounts"]).items()}
            target = data.get("target_epsilon")
            return cls(mode=str(data["mode"]), accountant=str(data["accountant"]),
                       delta=float(data["delta"]),
                       target_epsilon=None if target is None else float(target),
                       settings=dict(data.get("settings", {})), accounts=accounts)
        except PrivacyError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PrivacyError(f"{source} is malformed ({type(exc).__name__}: {exc})") from None

    def save(self, run_dir: Path) -> Path:
        """Atomically write ``run_dir/privacy_ledger.json``."""
        path = Path(run_dir) / LEDGER_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    # ------------------------------------------------------------------ resume
    def reconcile(self, other: PrivacyLedger, *, source: str) -> bool:
        """Merge ``other`` (the file) into this ledger (the checkpoint's copy).

        Returns True when this ledger changed. An account of one must extend the other's;
        anything else means the two records disagree and the run must not go on.
        """
        if (other.mode, other.accountant) != (self.mode, self.accountant) or not math.isclose(
                other.delta, self.delta, rel_tol=1e-12):
            raise PrivacyError(
                f"{source} was written for mode {other.mode!r}, accountant "
                f"{other.accountant!r}, delta {other.delta:g}; this run uses {self.mode!r}, "
                f"{self.accountant!r}, {self.delta:g}")
        changed = False
        for key in sorted(set(self.accounts) | set(other.accounts)):
            mine = self.accounts.get(key, PrivacyAccount()).entries
            theirs = other.accounts.get(key, PrivacyAccount()).entries
            short, long_ = (mine, theirs) if len(mine) <= len(theirs) else (theirs, mine)
            if not all(_same_event(a, b) for a, b in zip(short, long_, strict=False)):
                raise PrivacyError(f"{source} does not match this run's checkpoint (account "
                                   f"{key!r}); refusing to continue with an inconsistent "
                                   "privacy record")
            if len(theirs) > len(mine):
                log.warning("%s holds %d event(s) of account %r beyond the checkpoint (a round "
                            "accounted before an interruption); they stay counted", source,
                            len(theirs) - len(mine), key)
                self.accounts[key] = PrivacyAccount([dict(e) for e in theirs])
                changed = True
        return changed


def load_ledger(run_dir: Path) -> PrivacyLedger | None:
    """Read ``run_dir/privacy_ledger.json`` (None if the run has none)."""
    path = Path(run_dir) / LEDGER_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrivacyError(f"privacy ledger {str(path)!r} is unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise PrivacyError(f"privacy ledger {str(path)!r} is malformed")
    return PrivacyLedger.from_dict(data, source=f"privacy ledger {str(path)!r}")


class LedgeredPrivacy(RoundPrivacy):
    """Budget checks, accounting and checkpoint state on top of a :class:`PrivacyLedger`.

    A DP mode (central, DP-SGD, distributed) subclasses this and

    * implements :meth:`planned_events` (what the next round would spend, per account), and
    * calls :meth:`stage_event` once the round's privatised output exists (e.g. in
      ``process_aggregate``), so that :meth:`account` records it.

    Subclasses put their own mechanism state (adaptive clip norm, pinned noise multiplier) in
    ``state_dict``/``load_state_dict`` and call ``super()``.
    """

    def __init__(self, *, mode: str, accountant: str, delta: float,
                 target_epsilon: float | None, settings: Mapping[str, Any]) -> None:
        self.ledger = PrivacyLedger(mode=mode, accountant=accountant, delta=delta,
                                    target_epsilon=target_epsilon, settings=dict(settings))
        self.target_epsilon = target_epsilon
        self.run_dir: Path | None = None
        self._pending: dict[str, PrivacyEvent] = {}

    # ------------------------------------------------------------------ for subclasses
    def planned_events(self, server_round: int, num_sampled_expected: int
                       ) -> dict[str, PrivacyEvent]:
        """Events the next round would add, by account (used by :meth:`check_budget`)."""
        return {}

    def stage_event(self, key: str, event: PrivacyEvent) -> None:
        """Declare that this round spent ``event`` on account ``key``."""
        self._pending[key] = event

    # ------------------------------------------------------------------ coordinator hooks
    def attach_run_dir(self, run_dir: Path) -> None:  # noqa: D102
        self.run_dir = Path(run_dir)
        on_disk = load_ledger(self.run_dir)
        source = f"privacy ledger {str(self.run_dir / LEDGER_NAME)!r}"
        if on_disk is None or on_disk.num_events < self.ledger.num_events:
            if on_disk is not None:
                self.ledger.reconcile(on_disk, source=source)  # raises if inconsistent
            self.ledger.save(self.run_dir)
            return
        self.ledger.reconcile(on_disk, source=source)

    def check_budget(self, server_round: int, num_sampled_expected: int) -> None:  # noqa: D102
        self._pending.clear()
        target = self.target_epsilon
        if target is None:
            return
        where = (f" (ledger {str(self.run_dir / LEDGER_NAME)!r})"
                 if self.run_dir is not None else "")
        spent = self.ledger.epsilon
        if spent > target:
            raise PrivacyBudgetExceeded(
                f"privacy budget exhausted: epsilon spent is already {spent:.3f} > "
                f"privacy.target_epsilon = {target:g}{where}; the run cannot continue")
        for key, event in sorted(self.planned_events(server_round,
                                                     num_sampled_expected).items()):
            after = self.ledger.epsilon_after(key, event)
            if after > target:
                who = "" if key == POPULATION else f" for {key.replace(':', ' ')}"
                raise PrivacyBudgetExceeded(
                    f"privacy budget: round {server_round} would raise epsilon{who} from "
                    f"{self.ledger.accounts.get(key, PrivacyAccount()).epsilon:.3f} to "
                    f"{after:.3f}, above privacy.target_epsilon = {target:g}; the run stops "
                    f"after round {server_round - 1}{where}")

    def account(self, server_round: int, run_dir: Path | None) -> float | None:  # noqa: D102
        if run_dir is not None and self.run_dir is None:
            self.attach_run_dir(run_dir)
        for key, event in sorted(self._pending.items()):
            self.ledger.record(key, server_round, event)
        self._pending.clear()
        if run_dir is not None:
            self.ledger.save(Path(run_dir))
        return self.ledger.epsilon

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"ledger": self.ledger.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: D102
        if "ledger" not in state:
            raise PrivacyError("the checkpoint holds no privacy ledger, but this run has "
                               f"privacy.mode = {self.ledger.mode!r}; it was written with "
                               "privacy off and cannot be resumed with privacy on")
        loaded = PrivacyLedger.from_dict(state["ledger"], source="the checkpoint's ledger")
        if (loaded.mode, loaded.accountant) != (self.ledger.mode, self.ledger.accountant):
            raise PrivacyError(f"the checkpoint's ledger is for mode {loaded.mode!r} with the "
                               f"{loaded.accountant!r} accountant; this run uses "
                               f"{self.ledger.mode!r} with {self.ledger.accountant!r}")
        self.ledger.accounts = loaded.accounts
        self.ledger.settings = {**self.ledger.settings, **loaded.settings}


def cohort_sampling(config: Config, num_clients: int) -> tuple[float, float]:
    """The expected contributors per aggregate and the sampling rate the accountant may use.

    Synchronous rounds sample a Poisson cohort (rate q = size / N; McMahan et al. 2018,
    Alg. 1). An asynchronous strategy's aggregate holds whoever finished first, not a random
    sample: no amplification by sampling is claimed (q = 1), and the denominator is the
    fixed buffer size (Nguyen et al. 2022, Alg. 1).
    """
    from confide.strategies.registry import get_strategy

    strategy = get_strategy(config.strategy.name)
    if getattr(strategy, "asynchronous", False):
        k = config.strategy.options.get("buffer_size",
                                        strategy.Params().buffer_size)  # type: ignore[attr-defined]
        return float(k), 1.0
    expected = config.cohort_size()
    return float(expected), expected / num_clients

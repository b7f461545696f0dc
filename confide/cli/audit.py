"""``confide audit``: an empirical lower bound on epsilon beside the accountant's epsilon.

Runs the job's federation with canaries inserted — canary clients for client-level DP
(``central``, ``distributed``, ``dp-ftrl``), canary examples with Dirac gradients for
``dp-sgd`` (see :mod:`confide.app.audit` and :mod:`confide.privacy.audit`) — and prints the
lower bound (Steinke et al. 2023) and the Gaussian-fit estimate (Andrew et al. 2024) next to
the epsilon the accountant claims, and which mechanism was audited. A lower bound above the
accountant's epsilon means the implementation leaks more than it accounts for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register", "audit_command"]


def audit_command(
    config: Annotated[Path | None, typer.Argument(
        help="Job file (TOML) with privacy.mode = 'central', 'distributed', 'dp-ftrl' or "
        "'dp-sgd'.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a key: section.key=value (repeatable).")] = None,
    canaries: Annotated[int, typer.Option(
        "--canaries", "-m", min=1,
        help="Canaries (clients, or DP-SGD examples), each included with probability 1/2.")
    ] = 1000,
    confidence: Annotated[float, typer.Option(
        help="Confidence of the lower bound.")] = 0.95,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the result as JSON to this file.")] = None,
) -> None:
    """Audit a DP mechanism empirically with canaries (one training run)."""
    from confide.app.audit import run_canary_audit
    from confide.cli.main import console
    from confide.config import load_config
    from confide.files import atomic_write_text

    cfg = load_config(config, set_ or [])
    result = run_canary_audit(cfg, canaries=canaries, confidence=confidence)
    acct = result.epsilon_accountant
    console.print(f"audited: privacy.mode = {result.mechanism!r}, {result.description}; "
                  f"{result.canary_kind} canaries", highlight=False, soft_wrap=True)
    console.print(
        f"accountant ε = {acct:.3f}" if acct != float("inf") else "accountant ε = inf (no noise)",
        highlight=False, soft_wrap=True)
    console.print(
        f"empirical ε lower bound = {result.epsilon_lower_bound:.3f}  ({result.confidence:.0%} "
        f"confidence; {result.correct} of {result.guesses} guesses right, {result.canaries} "
        f"canaries, {result.included} included; Steinke et al. 2023)",
        highlight=False, soft_wrap=True)
    console.print(
        f"empirical ε estimate = {result.epsilon_estimate:.3f}  (Gaussian fit, Andrew et al. "
        f"2024; an estimate, not a bound)", highlight=False, soft_wrap=True)
    console.print(f"δ = {result.delta:g}, z = {result.noise_multiplier:g}, q = "
                  f"{result.sample_rate:g}, {result.rounds} rounds", highlight=False,
                  soft_wrap=True)
    if output is not None:
        atomic_write_text(output, json.dumps(result.to_dict(), indent=2) + "\n")


def register(app: typer.Typer) -> None:
    """Add ``confide audit`` to ``app``."""
    app.command("audit")(audit_command)

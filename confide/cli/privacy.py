"""``confide privacy``: plan a DP run before spending a GPU hour.

``confide privacy epsilon --noise-multiplier Z --sample-rate Q --rounds T --delta D`` prints the
epsilon of ``T`` sampled-Gaussian rounds (``--accountant rdp|prv``: Opacus; ``pld``: Google's
``dp_accounting`` privacy-loss-distribution accountant);
``--target-epsilon E`` instead of ``--noise-multiplier`` prints the multiplier that reaches
``E`` (rounded *up* to 3 decimals, so the printed value never overspends). Rates and deltas
may be written as fractions: ``--sample-rate 100/3400 --delta 1/3400``.

``confide privacy ledger RUN_DIR`` prints the epsilon a run's ``privacy_ledger.json`` has
spent under every accountant, and which one the run enforced its budget with.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Annotated

import typer

from confide.exceptions import PrivacyError

__all__ = ["register", "parse_fraction"]


def parse_fraction(text: str, *, name: str) -> float:
    """``0.004``, ``1e-5`` or ``100/3400`` as a float; anything else is a PrivacyError."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise PrivacyError(f"{name} = {text!r} is not a number or a fraction like 100/3400"
                           ) from None
    if not math.isfinite(value):
        raise PrivacyError(f"{name} = {text!r} must be finite")
    return value


def epsilon_command(
    sample_rate: Annotated[str, typer.Option(
        "--sample-rate", "-q", help="Poisson sampling rate per round, e.g. 0.01 or 100/3400.")],
    rounds: Annotated[int, typer.Option("--rounds", "-T", min=1,
                                        help="Rounds (steps of the mechanism).")],
    delta: Annotated[str, typer.Option("--delta", "-d", help="Target delta, e.g. 1e-5.")],
    noise_multiplier: Annotated[float | None, typer.Option(
        "--noise-multiplier", "-z", help="Noise std / clip norm; prints epsilon.")] = None,
    target_epsilon: Annotated[float | None, typer.Option(
        "--target-epsilon", "-e", help="Prints the noise multiplier that reaches it.")] = None,
    accountant: Annotated[str, typer.Option(
        "--accountant", "-a", help="rdp or prv (Opacus), or pld (dp_accounting).")] = "rdp",
) -> None:
    """Epsilon of T rounds at noise multiplier Z, or the multiplier for a target epsilon."""
    from confide.cli.main import console
    from confide.privacy.accounting import (
        ACCOUNTANTS,
        calibrate_noise_multiplier,
        check_delta,
        check_sample_rate,
        compute_epsilon,
    )

    q = check_sample_rate(parse_fraction(sample_rate, name="--sample-rate"))
    d = check_delta(parse_fraction(delta, name="--delta"))
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"--accountant {accountant!r} is not available; choose one of: "
                           + ", ".join(ACCOUNTANTS))
    if (noise_multiplier is None) == (target_epsilon is None):
        raise PrivacyError("give exactly one of --noise-multiplier (prints epsilon) and "
                           "--target-epsilon (prints the noise multiplier)")
    where = f"{accountant.upper()}; q = {q:.6g}, {rounds} rounds, δ = {d:.6g}"
    if noise_multiplier is not None:
        eps = compute_epsilon(noise_multiplier=noise_multiplier, sample_rate=q, steps=rounds,
                              delta=d, accountant=accountant)
        console.print(f"ε = {eps:.3f}  ({where}, z = {noise_multiplier:g})",
                      highlight=False, soft_wrap=True)
        return
    z = calibrate_noise_multiplier(target_epsilon=float(target_epsilon),  # type: ignore[arg-type]
                                   sample_rate=q, steps=rounds, delta=d, accountant=accountant)
    shown = math.ceil(z * 1000 - 1e-9) / 1000  # rounded up: using it never overspends
    console.print(f"z = {shown:.3f}  ({where}, target ε = {target_epsilon:g}; exact "
                  f"{z:.6f})", highlight=False, soft_wrap=True)


def ledger_command(
    run_dir: Annotated[str, typer.Argument(help="A run folder with privacy_ledger.json.")],
) -> None:
    """Epsilon of a run's privacy ledger under RDP, PRV and PLD; marks the enforced one."""
    from pathlib import Path

    from confide.cli.main import console
    from confide.privacy.ledger import LEDGER_NAME, load_ledger

    ledger = load_ledger(Path(run_dir))
    if ledger is None:
        raise PrivacyError(f"{run_dir!r} holds no {LEDGER_NAME}")
    for key in sorted(ledger.accounts, key=lambda k: -ledger.accounts[k].epsilon)[:1]:
        by_name = ledger.epsilon_by_accountant(key)
        shown = ", ".join(f"{name.upper()} ε = {eps:.3f}"
                          + (" (enforced)" if name == ledger.accountant else "")
                          for name, eps in by_name.items())
        console.print(f"{key}: {shown}  (mode {ledger.mode}, δ = {ledger.delta:.6g}, "
                      f"{len(ledger.accounts[key].entries)} events)", highlight=False,
                      soft_wrap=True)
    if not ledger.accounts:
        console.print(f"no privacy spent yet (mode {ledger.mode}, enforced accountant "
                      f"{ledger.accountant.upper()})", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``privacy`` command group to ``app``."""
    group = typer.Typer(name="privacy", rich_markup_mode=None,
                        help="Differential privacy: accounting and planning.",
                        no_args_is_help=True)
    group.command("epsilon")(epsilon_command)
    group.command("ledger")(ledger_command)
    app.add_typer(group, name="privacy")

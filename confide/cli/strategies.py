"""``confide strategies``: the registered strategies, their origin and their parameters."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

__all__ = ["register", "strategies_app"]

strategies_app = typer.Typer(
    rich_markup_mode=None,
    name="strategies",
    help="List the federated optimisation strategies (built-in and plugins).",
    no_args_is_help=True,
    add_completion=False,
)


def _secagg(cls: type) -> str:
    if getattr(cls, "requires_individual_updates", False):
        return "no (needs individual updates)"
    return "yes"


@strategies_app.command("list")
def list_strategies() -> None:
    """Every strategy with its origin and whether it works under secure aggregation."""
    from confide.strategies import available_strategies, broken_plugins, strategy_origin

    strategies = available_strategies()
    rows = [(name, strategy_origin(name), _secagg(cls), cls.citation or "-")
            for name, cls in strategies.items()]
    header = ("name", "origin", "secure aggregation", "reference")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
                   + "  " + row[3])
    for name, why in broken_plugins().items():
        typer.echo(f"{name}: BROKEN - {why}")


@strategies_app.command("show")
def show_strategy(
    name: Annotated[str, typer.Argument(help="A registered name or 'package.module:Class'.")],
) -> None:
    """A strategy's ``[strategy]`` keys with their defaults and allowed ranges."""
    from confide.strategies import get_strategy, strategy_origin

    cls = get_strategy(name)
    summary = (cls.__doc__ or "").strip().splitlines()
    typer.echo(f"{name}: {summary[0] if summary else cls.__name__}")
    typer.echo(f"  origin: {strategy_origin(name)}")
    typer.echo(f"  reference: {cls.citation or '-'}")
    typer.echo(f"  secure aggregation: {_secagg(cls)}")
    fields = dataclasses.fields(cls.Params)
    if not fields:
        typer.echo("  parameters: none")
        return
    typer.echo("  parameters ([strategy] keys):")
    for f in fields:
        meta: dict[str, Any] = dict(f.metadata or {})
        bounds = ", ".join(f"{sym} {meta[k]}" for k, sym in
                           (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                           if meta.get(k) is not None)
        default = f.default if f.default is not dataclasses.MISSING else "(required)"
        help_text = meta.get("help") or ""
        typer.echo(f"    {f.name} = {default!r}" + (f"  [{bounds}]" if bounds else "")
                   + (f"  {help_text}" if help_text else ""))


def register(app: typer.Typer) -> None:
    """Attach ``confide strategies`` to the main ``app`` (once, however often called)."""
    if any(group.typer_instance is strategies_app for group in app.registered_groups):
        return
    app.add_typer(strategies_app, name="strategies")

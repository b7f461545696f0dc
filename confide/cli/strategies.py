"""``confide strategies``: the registered strategies, their origin and their parameters."""

from __future__ import annotations

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


def _secagg(info: dict[str, Any]) -> str:
    return "yes" if info["secure_aggregation"] else "no (needs individual updates)"


@strategies_app.command("list")
def list_strategies() -> None:
    """Every strategy with its origin and whether it works under secure aggregation."""
    from confide.cli.strategy_catalog import strategy_infos

    infos, broken = strategy_infos()
    rows = [(name, info["origin"], _secagg(info), info["citation"] or "-")
            for name, info in infos.items()]
    header = ("name", "origin", "secure aggregation", "reference")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True))
                   + "  " + row[3])
    for name, why in broken.items():
        typer.echo(f"{name}: BROKEN - {why}")


@strategies_app.command("show")
def show_strategy(
    name: Annotated[str, typer.Argument(help="A registered name or 'package.module:Class'.")],
) -> None:
    """A strategy's ``[strategy]`` keys with their defaults and allowed ranges."""
    from confide.cli.strategy_catalog import strategy_info

    info = strategy_info(name)
    typer.echo(f"{name}: {info['summary']}")
    typer.echo(f"  origin: {info['origin']}")
    typer.echo(f"  reference: {info['citation'] or '-'}")
    typer.echo(f"  secure aggregation: {_secagg(info)}")
    if not info["params"]:
        typer.echo("  parameters: none")
        return
    typer.echo("  parameters ([strategy] keys):")
    for p in info["params"]:
        bounds = ", ".join(f"{sym} {p[k]}" for k, sym in
                           (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                           if p.get(k) is not None)
        default = repr(p["default"]) if "default" in p else "(required)"
        typer.echo(f"    {p['name']} = {default}" + (f"  [{bounds}]" if bounds else "")
                   + (f"  {p['help']}" if p["help"] else ""))


def register(app: typer.Typer) -> None:
    """Attach ``confide strategies`` to the main ``app`` (once, however often called)."""
    if any(group.typer_instance is strategies_app for group in app.registered_groups):
        return
    app.add_typer(strategies_app, name="strategies")

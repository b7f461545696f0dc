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
    """Secure-aggregation support, from the class and its aux-vector declaration."""
    if not info["secure_aggregation"]:
        return "no (needs individual updates)"
    aux = info.get("aux_vectors", [])
    fixed = [a["name"] for a in aux if a["length"] != "model"]
    if fixed:
        return f"no (aux {', '.join(fixed)}: not model length)"
    return f"yes (+ aux {', '.join(a['name'] for a in aux)})" if aux else "yes"


def _aux_line(aux: dict[str, Any]) -> str:
    length = "model length" if aux["length"] == "model" else f"length {aux['length']}"
    if aux["bound"] is None:
        bound = ("no declared bound: under secure aggregation entries beyond "
                 "secure_aggregation.clipping_range are clipped, with a warning")
    else:
        bound = (f"|entry| <= {aux['bound']:g} (secure aggregation needs "
                 f"clipping_range >= {aux['bound']:g})")
    return f"    {aux['name']}: {length}, summed unweighted (mean in mean_aux); {bound}"


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
    if info.get("aux_vectors"):
        typer.echo("  aux vectors (confide.strategies.aux_vectors):")
        for aux in info["aux_vectors"]:
            typer.echo(_aux_line(aux))
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

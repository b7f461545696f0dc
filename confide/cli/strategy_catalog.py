"""What ``confide strategies list|show`` prints, without importing torch.

Every strategy module imports torch, which costs seconds. The built-ins' metadata (summary,
citation, secure-aggregation support, ``[strategy]`` keys with defaults, bounds and help) is
therefore kept as plain data in :mod:`confide.cli._builtin_strategies`, generated from the real
classes by ``python scripts/strategy_catalog.py``; a test fails when it differs from what the
registry says. Plugins and ``package.module:Class`` paths are always read from the real classes
(the registry loads them), so what is printed is what a run would use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ENTRY_POINT_GROUP", "describe", "strategy_infos", "strategy_info"]

#: the same group as ``confide.strategies.registry.ENTRY_POINT_GROUP`` (a test checks)
ENTRY_POINT_GROUP = "confide.strategies"

_BOUNDS = ("gt", "ge", "lt", "le")


def describe(cls: Any) -> dict[str, Any]:
    """A strategy class's metadata as plain data (what the catalog stores for a built-in)."""
    doc = (cls.__doc__ or "").strip().splitlines()
    params: list[dict[str, Any]] = []
    for f in dataclasses.fields(cls.Params):
        meta = dict(f.metadata or {})
        entry: dict[str, Any] = {"name": f.name}
        if f.default is not dataclasses.MISSING:
            entry["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            entry["default"] = f.default_factory()
        entry.update({k: meta[k] for k in _BOUNDS if meta.get(k) is not None})
        entry["help"] = meta.get("help") or ""
        params.append(entry)
    from confide.strategies.aux_vectors import describe_aux  # the class is loaded: torch is

    return {
        "summary": doc[0] if doc else cls.__name__,
        "citation": cls.citation or "",
        "secure_aggregation": not getattr(cls, "requires_individual_updates", False),
        "params": params,
        "aux_vectors": describe_aux(cls),
    }


def _plugins_installed() -> bool:
    from importlib.metadata import entry_points

    return bool(entry_points(group=ENTRY_POINT_GROUP))


def strategy_infos() -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every strategy (name -> metadata with ``origin``) and the broken plugins (name -> why)."""
    if not _plugins_installed():
        from confide.cli._builtin_strategies import BUILTIN_STRATEGIES

        return ({name: {**info, "origin": "confide"}
                 for name, info in sorted(BUILTIN_STRATEGIES.items())}, {})
    # a plugin is installed: only importing it tells whether it works and what it declares
    from confide.strategies import available_strategies, broken_plugins, strategy_origin

    infos = {name: {**describe(cls), "origin": strategy_origin(name)}
             for name, cls in available_strategies().items()}
    return infos, broken_plugins()


def strategy_info(name: str) -> dict[str, Any]:
    """One strategy's metadata with ``origin``; unknown or broken names raise StrategyError."""
    if ":" not in name and not _plugins_installed():
        from confide.cli._builtin_strategies import BUILTIN_STRATEGIES

        if name in BUILTIN_STRATEGIES:
            return {**BUILTIN_STRATEGIES[name], "origin": "confide"}
    # unknown names, paths and plugins: the registry gives the real class or the real error
    from confide.strategies import get_strategy, strategy_origin

    return {**describe(get_strategy(name)), "origin": strategy_origin(name)}

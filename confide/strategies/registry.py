"""Named strategy registry; third-party plugins arrive through the ``confide.strategies``
entry-point group and land in the same registry."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from confide.exceptions import StrategyError
from confide.strategies.base import Strategy

__all__ = ["register_strategy", "get_strategy", "available_strategies", "strategy_origin"]

ENTRY_POINT_GROUP = "confide.strategies"

_REGISTRY: dict[str, type[Strategy]] = {}
_ORIGIN: dict[str, str] = {}
_plugins_loaded = False


def _check_contract(cls: object, where: str) -> type[Strategy]:
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise StrategyError(
            f"{where} is not a confide Strategy subclass (see confide.strategies.Strategy)"
        )
    return cls


def register_strategy(name: str, cls: type[Strategy], *, origin: str = "confide") -> None:
    """Register ``cls`` under ``name``; a duplicate name is an error."""
    _check_contract(cls, f"strategy {name!r}")
    if name in _REGISTRY:
        raise StrategyError(
            f"strategy name {name!r} is already registered (by {_ORIGIN[name]}); "
            "choose another name"
        )
    _REGISTRY[name] = cls
    _ORIGIN[name] = origin


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:
            raise StrategyError(
                f"strategy plugin {ep.name!r} ({ep.value}) failed to import: {exc}"
            ) from None
        dist = ep.dist.name if ep.dist is not None else "unknown package"
        register_strategy(ep.name, _check_contract(cls, f"plugin {ep.name!r} ({ep.value})"),
                          origin=f"plugin {dist}")


def available_strategies() -> dict[str, type[Strategy]]:
    """Every registered strategy, plugins included, by name."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def strategy_origin(name: str) -> str:
    """Where the strategy ``name`` came from (``confide`` or ``plugin <package>``)."""
    _load_plugins()
    return _ORIGIN.get(name, "import path")


def get_strategy(name: str) -> type[Strategy]:
    """Resolve a registered name or a ``package.module:Class`` path to a strategy class."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise StrategyError(f"strategy {name!r}: cannot import {module_name!r} ({exc})") \
                from None
        cls = getattr(module, attr, None)
        if cls is None:
            raise StrategyError(f"strategy {name!r}: module {module_name!r} has no {attr!r}")
        return _check_contract(cls, f"strategy {name!r}")
    _load_plugins()
    if name not in _REGISTRY:
        raise StrategyError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}, "
            "or a 'package.module:Class' path"
        )
    return _REGISTRY[name]

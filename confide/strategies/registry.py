"""Named strategy registry.

Built-ins register here when :mod:`confide.strategies` is imported; third-party plugins arrive
through the ``confide.strategies`` entry-point group and land in the same registry the first
time a strategy is looked up. A plugin that fails to import, does not implement the contract
or reuses a taken name does not break the other strategies: its name resolves to a one-line
error saying what is wrong, and ``confide strategies list`` shows it as broken.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from importlib.metadata import entry_points

from confide.exceptions import StrategyError
from confide.strategies.aux_vectors import check_aux_declaration
from confide.strategies.base import Strategy
from confide.validation import register_unknown_key_hint

__all__ = [
    "ENTRY_POINT_GROUP",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "strategy_origin",
    "broken_plugins",
]

ENTRY_POINT_GROUP = "confide.strategies"

_REGISTRY: dict[str, type[Strategy]] = {}
_ORIGIN: dict[str, str] = {}
#: plugin names that could not be registered, with the reason (raised when one is asked for)
_BROKEN: dict[str, str] = {}
_plugins_loaded = False


def _check_contract(cls: object, where: str) -> type[Strategy]:
    """``cls`` must be a Strategy subclass whose declarations have the contract's types."""
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise StrategyError(
            f"{where} is not a confide Strategy subclass (see confide.strategies.Strategy)"
        )
    if not dataclasses.is_dataclass(cls.Params) or not isinstance(cls.Params, type):
        raise StrategyError(f"{where}: {cls.__name__}.Params must be a dataclass of its "
                            "[strategy] keys")
    if not isinstance(cls.aux_names, tuple) or not all(isinstance(a, str)
                                                       for a in cls.aux_names):
        raise StrategyError(f"{where}: {cls.__name__}.aux_names must be a tuple of names")
    check_aux_declaration(cls, where)
    if (cls.requires_individual_updates
            and cls.aggregate_individual is Strategy.aggregate_individual):
        raise StrategyError(f"{where}: {cls.__name__} sets requires_individual_updates but "
                            "does not override aggregate_individual()")
    return cls


def register_strategy(name: str, cls: type[Strategy], *, origin: str = "confide") -> None:
    """Register ``cls`` under ``name``; a duplicate name is an error."""
    if not name or ":" in name or name != name.strip():
        raise StrategyError(f"strategy name {name!r} is not allowed (no ':' or spaces)")
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
        dist = ep.dist.name if ep.dist is not None else "an unknown package"
        where = f"strategy plugin {ep.name!r} ({ep.value}, from {dist})"
        try:
            cls = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            _BROKEN[ep.name] = f"{where} failed to import: {exc}"
            continue
        if ep.name in _REGISTRY:  # a duplicate name is an error, never a silent shadowing
            _BROKEN[ep.name] = (f"strategy name {ep.name!r} is claimed twice: by "
                                f"{_ORIGIN[ep.name]} and by {where}; uninstall one of them")
            continue
        try:
            register_strategy(ep.name, _check_contract(cls, where), origin=f"plugin {dist}")
        except StrategyError as exc:
            _BROKEN[ep.name] = str(exc)


def available_strategies() -> dict[str, type[Strategy]]:
    """Every registered strategy, plugins included, by name."""
    _load_plugins()
    return dict(sorted(_REGISTRY.items()))


def broken_plugins() -> dict[str, str]:
    """Plugins that could not be registered: name -> why."""
    _load_plugins()
    return dict(sorted(_BROKEN.items()))


def strategy_origin(name: str) -> str:
    """Where the strategy ``name`` came from (``confide`` or ``plugin <package>``)."""
    _load_plugins()
    return _ORIGIN.get(name, "import path")


def _import_path(name: str) -> type[Strategy]:
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise StrategyError(f"strategy {name!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import-time failure of user code is a strategy error
        raise StrategyError(f"strategy {name!r}: cannot import {module_name!r} ({exc})") \
            from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise StrategyError(f"strategy {name!r}: module {module_name!r} has no {attr!r}")
    return _check_contract(cls, f"strategy {name!r}")


def _unknown_key_hint(params: type, key: str) -> str:
    """``strategy.KEY`` is unknown to the strategy whose ``Params`` is ``params``: who takes it?"""
    _load_plugins()
    users = sorted(n for n, c in _REGISTRY.items() if c.Params is params)
    keys = sorted(f.name for f in dataclasses.fields(params))
    owners = sorted(n for n, c in _REGISTRY.items()
                    if key in {f.name for f in dataclasses.fields(c.Params)})
    # strategies without parameters share one Params class, so several names can match
    if keys:
        whose = f"{users[0]}'s" if len(users) == 1 else "this strategy's"
        own = f"allowed keys in [strategy]: {', '.join(keys)} ({whose})"
    elif users:
        own = (" and ".join(users) + (" take" if len(users) > 1 else " takes")
               + " no [strategy] keys")
    else:
        own = "this strategy takes no [strategy] keys"
    if owners:
        where = f"it belongs to: {', '.join(owners)}"
    else:
        every = {f.name for c in _REGISTRY.values() for f in dataclasses.fields(c.Params)}
        close = difflib.get_close_matches(key, sorted(every), n=1)
        where = (f"did you mean strategy.{close[0]}?" if close else
                 "no registered strategy takes it (see 'confide strategies show NAME')")
    return f"unknown key strategy.{key}; {own}; {where}"


register_unknown_key_hint("strategy.", _unknown_key_hint)


def get_strategy(name: str) -> type[Strategy]:
    """Resolve a registered name or a ``package.module:Class`` path to a strategy class."""
    if ":" in name:
        return _import_path(name)
    _load_plugins()
    if name in _BROKEN:
        raise StrategyError(_BROKEN[name])
    if name not in _REGISTRY:
        raise StrategyError(
            f"unknown strategy {name!r}; available: {', '.join(sorted(_REGISTRY))}, "
            "or a 'package.module:Class' path"
        )
    return _REGISTRY[name]

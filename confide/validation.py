"""Validation of typed frozen dataclasses: bounds, types and unknown keys, one-line errors.

The machinery behind :mod:`confide.config` and the strategies' ``Params``: a field made with
:func:`_c` carries its bounds and help text; :func:`validate_dataclass` builds the dataclass
from a mapping and raises :class:`~confide.exceptions.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any, Literal

from confide.exceptions import ConfigError

__all__ = ["register_unknown_key_hint", "validate_dataclass"]


def _c(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A dataclass field with numeric bounds checked by :func:`validate_dataclass`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help})



def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key} = {value!r} is not allowed; choose one of: "
                + ", ".join(repr(a) for a in allowed)
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # int | float: keep the int (a count) or the float (a fraction) as written
        for arg in args:
            if arg is int and isinstance(value, int) and not isinstance(value, bool):
                return value
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} = {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a list")
        item = typing.get_args(tp)[0]
        return tuple(dict.fromkeys(_coerce(v, item, key) for v in value))
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key} must be a table")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a number")
        value = float(value)
        if math.isnan(value):
            raise ConfigError(f"{key} must be a number, not NaN")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} has the wrong type; expected a string")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _check_bounds(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    checks = (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    )
    for name, ok, sym in checks:
        bound = meta.get(name)
        if bound is not None and not ok(value, bound):
            raise ConfigError(f"{key} = {value!r} is out of range; it must be {sym} {bound}")


#: ``prefix -> hint(cls, key)``: a message for an unknown key of a section whose dataclass a
#: higher floor owns (the strategy registry names the strategies that take a ``strategy.`` key)
_UNKNOWN_KEY_HINTS: dict[str, Callable[[type, str], str | None]] = {}


def register_unknown_key_hint(prefix: str, hint: Callable[[type, str], str | None]) -> None:
    """Explain unknown ``prefix`` keys with ``hint(dataclass, key)`` (None: the default text)."""
    _UNKNOWN_KEY_HINTS[prefix] = hint


def validate_dataclass(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``, raising ConfigError on any bad key or value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hint = _UNKNOWN_KEY_HINTS.get(prefix)
        message = hint(cls, unknown[0]) if hint is not None else None
        if message:
            raise ConfigError(message)
        section = prefix.rstrip(".")
        if not fields:
            raise ConfigError(f"unknown key {prefix}{unknown[0]}; [{section}] takes no keys")
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}"
            + (f" (did you mean {prefix}{close[0]}?)" if close else "")
            + f"; allowed keys in [{section}]: " + ", ".join(sorted(fields))
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        coerced = _coerce(value, hints[name], key)
        _check_bounds(coerced, fields[name].metadata, key)
        kwargs[name] = coerced
    return cls(**kwargs)

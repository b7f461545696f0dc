"""``confide config``: every configuration key with its default, allowed values and meaning.

The output is a TOML job file of the defaults, each key under a comment that says what it means
and what it accepts, so ``confide config > job.toml`` is a valid starting point. It is read from
the dataclasses in :mod:`confide.config` (and, for ``[strategy]``, from the strategy catalog),
so it cannot drift from what the loader accepts. No torch is imported.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Annotated, Any, Literal

import typer

__all__ = ["register", "config_reference"]

_BOUND_SYMBOLS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _accepts(tp: Any) -> str:
    """What a key of annotation ``tp`` accepts, in words."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(_toml_value(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        words = " or ".join(_accepts(a) for a in args)
        return words + (", or unset" if len(args) < len(typing.get_args(tp)) else "")
    if origin is tuple:
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return "a list of " + _accepts(item).replace("one of", "any of")
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _bounds(meta: typing.Mapping[str, Any]) -> str:
    return " and ".join(f"{sym} {meta[k]}" for k, sym in _BOUND_SYMBOLS
                        if meta.get(k) is not None)


def _section_lines(name: str, cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = [f"[{name}]"]
    for f in dataclasses.fields(cls):
        if name == "strategy" and f.name == "options":
            continue  # written as the strategy's own keys below
        meta = dict(f.metadata or {})
        accepts = _accepts(hints[f.name])
        optional = accepts.endswith(", or unset")
        accepts = accepts.removesuffix(", or unset")
        bounds = _bounds(meta)
        accepts += f" {bounds}" if bounds else ""
        accepts += ", or unset" if optional and f.default is not None else ""
        if meta.get("help"):
            lines.append(f"# {meta['help']}")
        if f.default is None:
            lines.append(f"# {f.name} = ...  # {accepts}; unset by default")
        else:
            lines.append(f"{f.name} = {_toml_value(f.default)}  # {accepts}")
    if name == "strategy":
        lines.extend(_strategy_key_lines())
    return lines


def _strategy_key_lines() -> list[str]:
    from confide.cli.strategy_catalog import strategy_infos

    infos, _ = strategy_infos()
    lines = ["# The strategy's own keys go in [strategy] too (confide strategies show NAME):"]
    for strategy, info in infos.items():
        if not info["params"]:
            lines.append(f"#   {strategy}: no keys")
            continue
        for p in info["params"]:
            bounds = _bounds(p).replace(" and ", ", ")
            default = _toml_value(p["default"]) if "default" in p else "(required)"
            lines.append(f"#   {strategy}: {p['name']} = {default}"
                         + (f"  [{bounds}]" if bounds else "")
                         + (f"  {p['help']}" if p["help"] else ""))
    return lines


def config_reference(section: str | None = None) -> str:
    """The reference text for every section (or only ``section``)."""
    from confide.config import Config
    from confide.exceptions import ConfigError

    hints = typing.get_type_hints(Config)
    names = [f.name for f in dataclasses.fields(Config)]
    if section is not None and section not in names:
        raise ConfigError(f"unknown section [{section}]; allowed sections: "
                          + ", ".join(sorted(names)))
    blocks = ["\n".join(_section_lines(name, hints[name]))
              for name in names if section in (None, name)]
    return "\n\n".join(blocks) + "\n"


def config_command(
    section: Annotated[str | None, typer.Argument(
        help="Only this section, e.g. privacy.")] = None,
) -> None:
    """Every config key with its default, allowed values and meaning (a TOML job file)."""
    typer.echo(config_reference(section), nl=False)


def register(app: typer.Typer) -> None:
    """Attach ``confide config`` to the main ``app`` (once, however often called)."""
    if any(cmd.name == "config" for cmd in app.registered_commands):
        return
    app.command("config")(config_command)

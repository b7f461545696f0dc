"""Typed, validated run configuration: one TOML file plus ``--set section.key=value`` overrides.

Every section is a frozen dataclass. Values are checked when the config is built; a bad key,
type or value raises :class:`~confide.exceptions.ConfigError` with a one-line message that
names the key and says what is allowed. ``[strategy]`` keys other than ``name`` are the
strategy's own parameters and are validated by the strategy (see ``confide.strategies``).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from confide.exceptions import ConfigError

__all__ = [
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "ClientConfig",
    "CohortConfig",
    "StrategyConfig",
    "SimulationConfig",
    "PrivacyConfig",
    "SecureAggregationConfig",
    "Config",
    "load_config",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
    "validate_dataclass",
]


def _c(default: Any, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, help: str = "") -> Any:
    """A dataclass field with numeric bounds checked by :func:`validate_dataclass`."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "help": help})


@dataclass(frozen=True)
class RunConfig:
    """``[run]``: seed, rounds and evaluation cadence."""

    seed: int = _c(0, ge=0)
    rounds: int = _c(30, ge=1)
    eval_every: int = _c(1, ge=1)


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: dataset, number of clients and how the data is partitioned."""

    dataset: str = "digits"
    num_clients: int = _c(20, ge=1)
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "dirichlet"
    alpha: float = _c(0.5, gt=0)
    classes_per_client: int = _c(2, ge=1)
    min_samples_per_client: int = _c(2, ge=1)
    test_fraction: float = _c(0.2, gt=0, lt=1)
    path: str | None = None
    client_column: str = "client_id"
    label_column: str = "label"


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a registered model name or a ``module:factory`` path."""

    name: str = "mlp"
    hidden_units: int = _c(128, ge=1)


@dataclass(frozen=True)
class ClientConfig:
    """``[client]``: the local trainer every client runs."""

    epochs: int = _c(2, ge=1)
    batch_size: int = _c(16, ge=1)
    lr: float = _c(0.05, gt=0)
    momentum: float = _c(0.9, ge=0, lt=1)
    weight_decay: float = _c(0.0, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: str = "auto"


@dataclass(frozen=True)
class CohortConfig:
    """``[cohort]``: who takes part in a round.

    ``size`` is a client count (an integer >= 1) or a fraction of all clients (a float in
    (0, 1]). ``sampling = "poisson"`` includes each client independently with probability
    size / num_clients, which is what the DP accountants assume.
    """

    size: int | float = 1.0
    min_clients: int = _c(1, ge=1)
    sampling: Literal["fixed", "poisson"] = "fixed"
    #: deployment: seconds a round waits for training replies before the missing clients
    #: count as dropped (None: ``confide server start --round-timeout``)
    train_timeout_s: float | None = _c(None, gt=0)


@dataclass(frozen=True)
class StrategyConfig:
    """``[strategy]``: ``name`` plus the strategy's own parameters (validated by it)."""

    name: str = "fedavg"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: executor and fault injection."""

    executor: str = "sequential"
    dropout_rate: float = _c(0.0, ge=0, lt=1)
    dropout_stage: str = "training"
    # The ``vectorized`` executor's knobs (confide.simulations.vectorized):
    #: clients trained at once per device; 0 sizes chunks to the free memory
    chunk_size: int = _c(0, ge=0)
    #: "bf16": forward and backward under bfloat16 autocast (opt-in; fp32 master weights)
    mixed_precision: Literal["off", "bf16"] = "off"
    #: "cuda-graphs" replays each local step as a CUDA graph; "torch-compile" compiles it;
    #: "auto": CUDA graphs on a GPU where they apply (SGD, no DP-SGD), else off
    compile: Literal["auto", "off", "cuda-graphs", "torch-compile"] = "auto"
    #: convolutions with per-client weights: grouped conv (vmap's own rule) or unfold + bmm
    conv_lowering: Literal["auto", "grouped", "unfold"] = "auto"
    #: processes, one GPU each, a cohort is split over (torch.distributed, NCCL or gloo)
    world_size: int = _c(1, ge=1)


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: differential privacy (see ``confide.privacy``)."""

    mode: Literal["off", "central", "dp-sgd", "distributed"] = "off"
    noise_multiplier: float | None = _c(None, ge=0)
    clip_norm: float = _c(1.0, gt=0)
    adaptive_clipping: bool = False
    target_quantile: float = _c(0.5, gt=0, lt=1)
    clip_learning_rate: float = _c(0.2, gt=0)
    target_epsilon: float | None = _c(None, gt=0)
    delta: float = _c(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"


@dataclass(frozen=True)
class SecureAggregationConfig:
    """``[secure_aggregation]``: SecAgg+ (see ``confide.privacy.secagg``)."""

    enabled: bool = False
    bits: int = _c(32, ge=8, le=62)
    neighbours: int | None = _c(None, ge=2)
    threshold: int | None = _c(None, ge=2)
    clipping_range: float = _c(8.0, gt=0)
    skip_pairwise_masks: bool = False
    #: largest client weight (example count) a client may claim; larger ones are capped
    max_weight: int = _c(1000, ge=1)
    #: fraction of a cohort the neighbourhood graph must tolerate dropping mid-protocol
    dropout_tolerance: float = _c(0.1, ge=0, lt=0.9)
    #: fraction of a cohort that may collude with the coordinator (sets the threshold)
    corruption_tolerance: float = _c(0.05, ge=0, lt=0.9)
    #: deployment: seconds the coordinator waits for one protocol stage's replies; clients
    #: still silent then have dropped out at that stage (no heartbeat expiry is awaited)
    stage_timeout_s: float = _c(20.0, gt=0)


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    cohort: CohortConfig = field(default_factory=CohortConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)

    def replace(self, **sections: Any) -> Config:
        """Return a copy with whole sections replaced (values are re-validated)."""
        return validate_config(config_to_dict(dataclasses.replace(self, **sections)))

    def cohort_size(self) -> int:
        """The (expected) number of clients sampled per round."""
        size = self.cohort.size
        if isinstance(size, float):
            return max(1, round(size * self.data.num_clients))
        return size


# --------------------------------------------------------------------------- validation


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


def validate_dataclass(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values``, raising ConfigError on any bad key or value."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed keys in [{prefix.rstrip('.')}]: "
            + ", ".join(sorted(fields))
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        coerced = _coerce(value, hints[name], key)
        _check_bounds(coerced, fields[name].metadata, key)
        kwargs[name] = coerced
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}  # type: ignore[misc]


def validate_config(raw: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a nested mapping, validating every key and value."""
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]; allowed sections: " + ", ".join(sorted(hints))
        )
    sections: dict[str, Any] = {}
    for name, section in raw.items():
        if not isinstance(section, Mapping):
            raise ConfigError(f"[{name}] must be a table of keys, got {section!r}")
        cls = hints[name]
        values = dict(section)
        if cls is StrategyConfig:
            options = dict(values.pop("options", {}) or {})
            options.update({k: v for k, v in values.items() if k != "name"})
            values = {"name": values.get("name", "fedavg"), "options": options}
        sections[name] = validate_dataclass(cls, values, f"{name}.")
    config = Config(**sections)
    _check_cross_field(config)
    return config


def _check_cross_field(config: Config) -> None:
    size = config.cohort.size
    n = config.data.num_clients
    if isinstance(size, float):
        if not 0 < size <= 1:
            raise ConfigError(
                f"cohort.size = {size} is out of range; a fraction must be in (0, 1], "
                "or give a whole number of clients"
            )
    elif size < 1 or size > n:
        raise ConfigError(
            f"cohort.size = {size} is out of range; it must be between 1 and "
            f"data.num_clients ({n})"
        )
    if config.cohort.min_clients > config.cohort_size():
        raise ConfigError(
            f"cohort.min_clients = {config.cohort.min_clients} is larger than the cohort "
            f"size ({config.cohort_size()}); lower it or raise cohort.size"
        )
    if config.privacy.target_epsilon is not None and config.privacy.mode == "off":
        raise ConfigError("privacy.target_epsilon is set but privacy.mode is 'off'")


# --------------------------------------------------------------------------- loading


def config_to_dict(config: Config) -> dict[str, Any]:
    """A nested plain dict of ``config`` (None values dropped, TOML-serialisable)."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        values = dataclasses.asdict(getattr(config, section.name))
        if section.name == "strategy":
            options = values.pop("options")
            values.update(options)
        out[section.name] = {k: v for k, v in values.items() if v is not None}
    return out


def dump_config(config: Config) -> str:
    """The resolved config as TOML text."""
    import tomli_w  # imported here: only writing a run folder needs it

    return tomli_w.dumps(config_to_dict(config))


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``section.key=value`` strings; values are TOML literals, else plain strings."""
    result: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, _, text = item.partition("=")
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. run.rounds=5")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        result.setdefault(parts[0], {})[parts[1]] = value
    return result


def _merge(base: dict[str, Any], extra: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for section, values in extra.items():
        target = merged.setdefault(section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"[{section}] must be a table")
        target.update(values)
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (or the defaults when None), apply ``--set`` overrides and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(p)!r} is not UTF-8 text") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    return validate_config(raw)

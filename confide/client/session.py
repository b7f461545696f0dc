"""A client's state between the messages of a job, and the registry of client-side stages.

Protocol stages (secure aggregation's ``query.secagg``, plugins' own) register a handler
``(content, session) -> reply``; the ClientApp (:mod:`confide.app.client_app`) routes
``query.<name>`` messages to them with the client's :class:`ClientSession`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confide.client.messages import JobSpec
from confide.config import Config
from confide.exceptions import ConfigError
from confide.round import ClientResult, ClientTask

if TYPE_CHECKING:
    from flwr.app import RecordDict

__all__ = ["ClientSession", "StageHandler", "register_client_stage", "client_stages",
           "ERROR_DROPPED", "ERROR_REFUSED"]

#: Flower Error codes Confide uses in replies (outside Flower's own 0-99 range)
ERROR_DROPPED = 1001
ERROR_REFUSED = 1002

StageHandler = Callable[["RecordDict", "ClientSession"], "RecordDict"]
_STAGES: dict[str, StageHandler] = {}


def register_client_stage(name: str, handler: StageHandler) -> None:
    """Register a client-side protocol stage answering ``query.<name>`` messages."""
    if not name.isidentifier() or name.startswith("confide_"):
        raise ConfigError(f"stage name {name!r} must be an identifier not starting 'confide_'")
    if name in _STAGES:
        raise ConfigError(f"client stage {name!r} is already registered")
    _STAGES[name] = handler


def client_stages() -> dict[str, StageHandler]:
    """Registered client stages."""
    return dict(_STAGES)


@dataclass
class ClientSession:
    """Per-client state kept between messages of a job (never sent as a whole)."""

    client_id: int | None = None
    job: JobSpec | None = None
    config: Config | None = None
    last_task: ClientTask | None = None
    last_result: ClientResult | None = None
    scratch: dict[str, Any] = field(default_factory=dict)

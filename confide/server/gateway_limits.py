"""What a gateway connection may cost before and after authentication, and its route table.

Kept apart from :mod:`confide.server.gateway`, which enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from confide.exceptions import ConfigError

__all__ = ["GatewayLimits", "Route", "FLEET_ROUTES", "ENROL_PATH", "CA_PATH", "route_table"]

#: Fleet API routes a Confide client node uses (Flower 1.41 paths).
FLEET_ROUTES = frozenset(f"/v1/fleet/{m}" for m in (
    "activate-node", "deactivate-node", "send-node-heartbeat", "pull-messages",
    "push-messages", "get-run", "push-object", "pull-object", "confirm-message-received"))
ENROL_PATH = "/confide/v1/enrol"
CA_PATH = "/confide/v1/ca"


@dataclass(frozen=True)
class GatewayLimits:
    """What a connection may cost the gateway, above all before it is authenticated.

    Every deadline is in seconds. A body's deadline grows with what arrives: it gets
    ``body_timeout_s`` plus one second per ``min_transfer_rate`` bytes received (the rule of
    Apache's ``mod_reqtimeout``), so a slow but steady upload of a large update succeeds and
    a body sent a byte at a time does not hold a connection; responses are written under the
    same rule with ``send_timeout_s``.
    """

    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0
    min_transfer_rate: int = 64 * 1024
    max_connections: int = 256
    max_header_bytes: int = 16 * 1024
    max_enrol_body_bytes: int = 64 * 1024
    max_fleet_body_bytes: int = 4 * 1024 * 1024
    max_body_bytes: int = 256 * 1024 * 1024
    linger_s: float = 1.0
    linger_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise ConfigError(f"gateway limit {name} must be positive, not {value!r}")


@dataclass(frozen=True)
class Route:
    """One path the gateway serves, its method and its body limit."""

    path: str
    method: str
    max_body: int
    fleet: bool  # forwarded to the SuperLink for an authorised client


#: Fleet routes whose bodies carry model objects; the others carry small protobufs.
_BULK_FLEET_ROUTES = frozenset({"/v1/fleet/push-object", "/v1/fleet/push-messages"})


def route_table(limits: GatewayLimits) -> dict[str, Route]:
    """Every path the gateway serves (any other answers 404), with its body limit."""
    routes = {CA_PATH: Route(CA_PATH, "GET", 0, fleet=False),
              ENROL_PATH: Route(ENROL_PATH, "POST", limits.max_enrol_body_bytes, fleet=False)}
    for path in FLEET_ROUTES:
        size = limits.max_body_bytes if path in _BULK_FLEET_ROUTES else limits.max_fleet_body_bytes
        routes[path] = Route(path, "POST", size, fleet=True)
    return routes

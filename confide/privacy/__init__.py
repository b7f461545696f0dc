"""Privacy: differential privacy mechanisms and accounting, and secure aggregation."""

from confide.privacy.base import RoundPrivacy

__all__ = ["RoundPrivacy"]


def build_round_privacy(config, *, num_clients: int, dataset_size: int) -> RoundPrivacy:  # type: ignore[no-untyped-def]
    """The privacy hooks for ``config.privacy`` (privacy off: the no-op base)."""
    from confide.exceptions import ConfigError

    if config.privacy.mode == "off":
        return RoundPrivacy()
    raise ConfigError(f"privacy.mode = {config.privacy.mode!r} is not available yet; use 'off'")


__all__ += ["build_round_privacy"]

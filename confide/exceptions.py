"""Confide's exception tree.

Every error a user can cause derives from :class:`ConfideError`, so the CLI can turn it into
one line on stderr and a stable exit code instead of a traceback::

    ConfideError                      exit 1
    ├── ConfigError                   exit 2   bad TOML, unknown key, wrong type, bad value
    ├── DataError                     exit 3   missing dataset, bad user data, bad partition
    ├── ModelError                    exit 3   unknown model, a factory that does not build
    ├── StrategyError                 exit 2   unknown strategy, bad plugin, bad combination
    ├── CheckpointError               exit 4   missing or corrupt run folder / checkpoint
    ├── RoundFailedError              exit 5   too few clients reported, a round cannot go on
    ├── PrivacyError                  exit 6   budget exceeded, bad privacy settings
    │   └── PrivacyBudgetExceeded
    ├── ProtocolError                 exit 7   a peer message that is malformed, oversized,
    │                                          tampered or replayed (secure aggregation)
    ├── DeviceError                   exit 8   a GPU that is not there
    └── SecurityError                 exit 9   TLS, enrolment, revoked or unknown clients

Third-party errors are converted at the boundary where they enter Confide.
"""

from __future__ import annotations


class ConfideError(Exception):
    """Root of every error a Confide user can cause or see."""

    exit_code = 1


class ConfigError(ConfideError):
    """The run configuration is invalid (unknown key, wrong type, impossible value)."""

    exit_code = 2


class DataError(ConfideError):
    """A dataset is missing, malformed or cannot be partitioned as asked."""

    exit_code = 3


class ModelError(ConfideError):
    """A model name or factory cannot be resolved or built."""

    exit_code = 3


class StrategyError(ConfideError):
    """A strategy cannot be found, loaded, configured or combined as asked."""

    exit_code = 2


class CheckpointError(ConfideError):
    """A run folder or checkpoint is missing, corrupt or does not match the run."""

    exit_code = 4


class RoundFailedError(ConfideError):
    """A round cannot complete, e.g. fewer than ``cohort.min_clients`` reported."""

    exit_code = 5


class PrivacyError(ConfideError):
    """Privacy settings are invalid or a privacy guarantee cannot be kept."""

    exit_code = 6


class PrivacyBudgetExceeded(PrivacyError):
    """Running another round would spend more than ``privacy.target_epsilon``."""


class ProtocolError(ConfideError):
    """A peer message is malformed, oversized, tampered with, replayed or out of order."""

    exit_code = 7


class DeviceError(ConfideError):
    """The requested compute device is not available."""

    exit_code = 8


class SecurityError(ConfideError):
    """A transport or enrolment check failed (TLS, unknown or revoked client, bad token)."""

    exit_code = 9


class ClientDropped(Exception):  # noqa: N818 - it is an event, not an error of the user
    """Raised inside a client to signal that it left the round (fault injection or real)."""

"""Privacy: differential privacy mechanisms and accounting, and secure aggregation.

``privacy.mode`` picks the :class:`RoundPrivacy` the coordinator calls
(:func:`build_round_privacy`):

* ``off`` — :class:`RoundPrivacy`, every hook a no-op;
* ``central`` — client-level DP-FedAvg with a trusted coordinator
  (:class:`confide.privacy.central.CentralDP`, fixed or adaptive clipping);
* ``dp-sgd`` — sample-level DP-SGD inside every client through Opacus
  (:class:`confide.privacy.dpsgd.DPSGDPrivacy`), each client's epsilon tracked;
* ``dp-ftrl`` — client-level DP-FTRL without sampling: tree aggregation or banded matrix
  factorisation noise on prefix sums (:class:`confide.privacy.ftrl.DPFTRL`);
* ``distributed`` — distributed DP under secure aggregation, built by
  ``confide.privacy.distributed.DistributedDP.from_config(config, *, num_clients, dim)``
  when that module is present.

Building blocks for any DP mode, distributed DP included:

* :mod:`confide.privacy.mechanisms` — ``l2_clip``, ``GaussianMechanism`` (``clip`` +
  ``add_noise``; ``privatize`` built from them), ``AdaptiveClipping``,
  ``split_noise_multiplier``;
* :mod:`confide.privacy.accounting` — Opacus RDP/PRV and dp_accounting PLD accountants:
  ``epsilon_of(events, delta=, accountant=)``, ``compute_epsilon``,
  ``calibrate_noise_multiplier`` (target epsilon -> z);
  an event is ``(noise_multiplier, sample_rate, steps)``;
* :mod:`confide.privacy.ledger` — ``PrivacyLedger`` (``run_dir/privacy_ledger.json``) and
  ``LedgeredPrivacy``, a :class:`RoundPrivacy` that implements ``attach_run_dir``,
  ``check_budget``, ``account``, ``state_dict`` and ``load_state_dict``. A DP mode subclasses
  it, returns the next round's events from ``planned_events(round, expected)`` and calls
  ``stage_event("population", (z, q, 1))`` once the round's noised sum exists (for distributed
  DP: ``z`` is the central-equivalent multiplier of the summed discrete noise). The ledger
  is written before the model is released, stops a run before it would exceed
  ``privacy.target_epsilon`` and continues across ``--resume``.
* :mod:`confide.privacy.ftrl_noise`, :mod:`confide.privacy.ftrl_tree`,
  :mod:`confide.privacy.ftrl_matrix` — DP-FTRL's keyed noise source, tree aggregation and
  banded matrix factorisation, with their exact sensitivities;
* :mod:`confide.privacy.audit` — an empirical lower bound on epsilon from canaries (the audit
  of each mode runs in :mod:`confide.app.audit`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from confide.privacy.base import RoundPrivacy

if TYPE_CHECKING:
    from confide.config import Config

__all__ = ["RoundPrivacy", "build_round_privacy"]

#: modes whose guarantee is about a client's whole update, computed on the *sum*
CLIENT_LEVEL_MODES = ("central", "distributed", "dp-ftrl")


def _refuse_robust_strategy(config: Config) -> None:
    from confide.exceptions import ConfigError
    from confide.strategies.registry import get_strategy

    strategy = get_strategy(config.strategy.name)
    if getattr(strategy, "requires_individual_updates", False):
        raise ConfigError(
            f"strategy {config.strategy.name!r} combines individual client updates, but "
            f"privacy.mode = {config.privacy.mode!r} protects only their noised sum; choose a "
            "sum-based strategy (fedavg, fedavgm, fedprox, fedadam, ...) or privacy.mode = "
            "'dp-sgd'")


def build_round_privacy(config: Config, *, num_clients: int, dataset_size: int,
                        dim: int | None = None) -> RoundPrivacy:
    """The privacy hooks for ``config.privacy`` (privacy off: the no-op base).

    ``dim`` is the flat parameter count (from the job builder: no data is loaded here).
    """
    from confide.exceptions import ConfigError

    mode = config.privacy.mode
    if mode == "off":
        return RoundPrivacy()
    if mode in CLIENT_LEVEL_MODES:
        _refuse_robust_strategy(config)
    if mode == "central":
        from confide.privacy.central import CentralDP

        return CentralDP.from_config(config, num_clients=num_clients)
    if mode == "dp-ftrl":
        from confide.privacy.ftrl import DPFTRL

        return DPFTRL.from_config(config, num_clients=num_clients)
    if mode == "dp-sgd":
        if config.privacy.accountant == "pld":
            raise ConfigError("privacy.accountant = 'pld' is not wired into DP-SGD's Opacus "
                              "engine yet; use 'rdp' or 'prv' with privacy.mode = 'dp-sgd'")
        from confide.privacy.dpsgd import DPSGDPrivacy

        return DPSGDPrivacy.from_config(config, num_clients=num_clients)
    if mode == "distributed":
        name = "confide.privacy.distributed"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            raise ConfigError("privacy.mode = 'distributed' is not available in this build; "
                              "use 'central' or 'dp-sgd'") from None
        if dim is None:
            raise ConfigError("privacy.mode = 'distributed' needs the model's parameter count "
                              "(build the job with confide.app.job.build_job)")
        return module.DistributedDP.from_config(config, num_clients=num_clients, dim=dim)
    raise ConfigError(f"privacy.mode = {mode!r} is not available; choose one of: 'off', "
                      "'central', 'dp-sgd', 'distributed', 'dp-ftrl'")

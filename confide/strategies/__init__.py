"""Federated optimisation strategies: the contract, the registry and the built-ins.

=============  ==========================================  =====================
name           algorithm                                   secure aggregation
=============  ==========================================  =====================
fedavg         FedAvg (McMahan et al. 2017)                yes
fedavgm        FedAvg + server momentum (Hsu et al. 2019)  yes
fedprox        FedProx (Li et al. 2020)                    yes
fedadagrad     FedAdagrad (Reddi et al. 2021)              yes
fedadam        FedAdam (Reddi et al. 2021)                 yes
fedyogi        FedYogi (Reddi et al. 2021)                 yes
scaffold       SCAFFOLD (Karimireddy et al. 2020)          yes (Δc is summed too)
fedmedian      coordinate-wise median (Yin et al. 2018)    no
trimmedmean    coordinate-wise trimmed mean (Yin et al.)   no
krum           (Multi-)Krum (Blanchard et al. 2017)        no
=============  ==========================================  =====================

Third-party strategies register through the ``confide.strategies`` entry-point group, or are
named by a ``package.module:Class`` path in ``strategy.name``.
"""

from confide.strategies.base import (
    AuxVector,
    ClientRule,
    NoParams,
    RoundInstructions,
    Strategy,
    effective_local_steps,
    param,
)
from confide.strategies.fedavg import FedAvg
from confide.strategies.fedavgm import FedAvgM
from confide.strategies.fedbuff import FedBuff
from confide.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from confide.strategies.fedprox import FedProx
from confide.strategies.registry import (
    available_strategies,
    broken_plugins,
    get_strategy,
    register_strategy,
    strategy_origin,
)
from confide.strategies.robust import FedMedian, Krum, TrimmedMean
from confide.strategies.scaffold import Scaffold

for _cls in (FedAvg, FedAvgM, FedBuff, FedProx, FedAdagrad, FedAdam, FedYogi, Scaffold, FedMedian,
             TrimmedMean, Krum):
    register_strategy(_cls.name, _cls)
del _cls

__all__ = [
    "Strategy",
    "ClientRule",
    "RoundInstructions",
    "NoParams",
    "param",
    "effective_local_steps",
    "AuxVector",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedProx",
    "FedAdagrad",
    "FedAdam",
    "FedYogi",
    "Scaffold",
    "FedMedian",
    "TrimmedMean",
    "Krum",
    "register_strategy",
    "get_strategy",
    "available_strategies",
    "strategy_origin",
    "broken_plugins",
]

"""The ``vectorized`` executor: a whole cohort trained at once with ``torch.func``.

Every sampled client runs exactly the local optimisation of
:meth:`confide.client.LocalTrainer.fit`, but the cohort's weights are stacked on a leading
client axis and one ``vmap(grad(loss))`` call computes every client's gradient of a local step
at once (DESIGN.md, "Runtimes"). Results equal ``sequential``'s up to floating-point rounding:
the same batches, the same optimizer, the same client logic after training (the strategy's
batched finalisation and the pipeline's batched stages), the same dropouts.

What it cannot vectorise falls back to ``sequential`` with a logged message saying why, never a
silent change of results (:mod:`.eligibility`).

The package, along its seams (lowest first; none imports a later one):

* :mod:`.options` — the ``[simulation]`` knobs and what they switch;
* :mod:`.eligibility` — what vectorises exactly, and the probe that checks a model;
* :mod:`.conv` — convolutions with per-client weights (grouped, or unfold + batched matmul);
* :mod:`.layout` — the flat-parameter layout (``confide.parameters.flat_layout``) and what
  trains;
* :mod:`.schedule` — client batches (plain and DP-SGD), chunks, shards over ranks;
* :mod:`.optimizers` — SGD / Adam and the strategy's client rule on stacked weights;
* :mod:`.device` — device time, out-of-memory detection, cuDNN autotuning;
* :mod:`.trainer` — the cohort trainer (chunks, memory, CUDA graphs, DP-SGD steps);
* :mod:`.results` — trained rows to the round's :class:`~confide.round.ResultBatch`;
* :mod:`.ranks` — several ranks through ``torch.distributed``, reducing sums;
* :mod:`.executor` — the executor itself.
"""

from __future__ import annotations

from confide.simulations.executors import register_executor
from confide.simulations.vectorized.conv import (
    UnfoldConv2d,
    conv_lowering_costs,
    lower_convolutions,
)
from confide.simulations.vectorized.eligibility import vectorization_blocker
from confide.simulations.vectorized.executor import VectorizedExecutor
from confide.simulations.vectorized.layout import ModelLayout
from confide.simulations.vectorized.options import DROP_MESSAGE, VectorizedOptions
from confide.simulations.vectorized.schedule import (
    Job,
    client_batches,
    dp_sgd_batches,
    num_local_steps,
    shard_jobs,
)
from confide.simulations.vectorized.trainer import CohortTrainer

__all__ = [
    "VectorizedExecutor",
    "VectorizedOptions",
    "CohortTrainer",
    "ModelLayout",
    "Job",
    "DROP_MESSAGE",
    "UnfoldConv2d",
    "vectorization_blocker",
    "lower_convolutions",
    "conv_lowering_costs",
    "client_batches",
    "dp_sgd_batches",
    "num_local_steps",
    "shard_jobs",
]

register_executor("vectorized", VectorizedExecutor)

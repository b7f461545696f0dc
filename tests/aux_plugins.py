"""Strategy plugins for the aux-vector contract tests (named by ``aux_plugins:Class``).

Each is a real Strategy subclass that runs in a simulation; the broken ones each break one
rule of :mod:`confide.strategies.aux_vectors`.
"""

from __future__ import annotations

import torch

from confide.strategies import AuxVector, Strategy


class OneElementAux(Strategy):
    """Sends a 1-element aux vector (its mean update norm): fine in the clear, not under SecAgg."""

    name = "one-element-aux"
    aux_vectors = (AuxVector("norm", length=1),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"norm": client_update.norm().reshape(1)}, dict(client_state)


class WideAux(Strategy):
    """Declares aux entries up to 100, beyond SecAgg's default clipping range of 8."""

    name = "wide-aux"
    aux_vectors = (AuxVector("scaled", bound=100.0),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"scaled": (50.0 * client_update).clamp(-100.0, 100.0)}, dict(client_state)


class LyingAux(Strategy):
    """Declares a model-length aux vector and sends a 1-element one."""

    name = "lying-aux"
    aux_vectors = (AuxVector("v"),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"v": client_update[:1]}, dict(client_state)


class NanAux(Strategy):
    """Sends non-finite aux entries."""

    name = "nan-aux"
    aux_vectors = (AuxVector("v", bound=1.0),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"v": torch.full_like(client_update, float("nan"))}, dict(client_state)


class OverBound(Strategy):
    """Declares entries within ±1 and sends 3s."""

    name = "over-bound"
    aux_vectors = (AuxVector("v", bound=1.0),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"v": torch.full_like(client_update, 3.0)}, dict(client_state)


class BadDeclaration(Strategy):
    """``aux_vectors`` of plain strings, not AuxVector."""

    name = "bad-declaration"
    aux_vectors = ("v",)  # type: ignore[assignment]


class LoudAux(Strategy):
    """No declared bound, and entries of 20: SecAgg's encoding clips them (with a warning)."""

    name = "loud-aux"
    aux_vectors = (AuxVector("v"),)

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"v": torch.full_like(client_update, 20.0)}, dict(client_state)


class MeanDrift(Strategy):
    """A conforming SCAFFOLD-like plugin: each client sends its update again as a bounded aux
    vector (entries within ±1, inside SecAgg's clipping range), and the server adds
    ``step`` times the clients' mean of it on top of FedAvg's step."""

    name = "mean-drift"
    aux_vectors = (AuxVector("drift", bound=1.0),)
    step = 0.5

    def client_finalize(self, instructions, client_state, client_update, *, num_steps, lr,
                        momentum=0.0):
        return {"drift": client_update.clamp(-1.0, 1.0)}, dict(client_state)

    def apply(self, global_params, mean_update, mean_aux, server_round, *, num_clients,
              total_clients):
        return global_params + mean_update + self.step * mean_aux["drift"]

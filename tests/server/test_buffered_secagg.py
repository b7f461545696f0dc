"""FedBuff under secure aggregation and client-level DP (issue 14, acceptance point 2).

Each buffer of ``K`` arrivals is one SecAgg+ instance over the clients that fill it (Huba et
al., "Papaya", MLSys 2022, Sec. 4). Clients leave inside a buffer at every stage the protocol
tolerates (Bonawitz et al. 2017, Sec. 4: after advertising keys, after sharing keys, after
sending the masked input); the unmasked sum must be exactly the modular sum of the
survivors' quantised contributions. Under client-level DP each buffer is one privacy event,
and the ledger's epsilon must be Opacus's RDP epsilon for the events it recorded.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from confide_testing import FAST, assert_one_line_error, run_cli
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from confide.app.simulate import build_simulation, run_simulation
from confide.config import load_config
from confide.privacy.secagg.aggregator import PROTOCOL_DROPOUT_STAGES, SecureAggregator
from confide.privacy.secagg.metadata import encode_meta
from confide.privacy.secagg.quantisation import Quantiser
from confide.seeding import derive_rng
from confide.server.buffered import BufferedCoordinator

#: each example is a whole run: no shrinking (minutes per step), the failing draw is printed
SLOW = dict(deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class _RecordingAggregator(SecureAggregator):
    """The real secure aggregator; it keeps each buffer's inputs and report, and makes the
    clients the test chooses leave after the protocol stage it chooses (fault injection in
    place of ``simulation.dropout_rate``, so the stages can differ within one buffer).
    """

    def __init__(self, config, choose_dropouts) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config)
        self.choose_dropouts = choose_dropouts
        self.buffers: list[dict] = []
        self._drops: dict[int, str] = {}

    def _protocol_dropouts(self, cohort, server_round):  # type: ignore[no-untyped-def]
        _, threshold = self.graph_for(len(cohort))
        self._drops = self.choose_dropouts(server_round, cohort, threshold)
        return dict(self._drops)

    def aggregate(self, batch, *, server_round, weighting):  # type: ignore[no-untyped-def]
        results = sorted(batch.results(), key=lambda r: r.client_id)
        aggregate = super().aggregate(batch, server_round=server_round, weighting=weighting)
        self.buffers.append({"round": server_round, "results": results, "weighting": weighting,
                             "drops": dict(self._drops), "report": self.last_report,
                             "aggregate": aggregate})
        return aggregate


def _plaintext_sum(config, buffer) -> tuple[list[int], np.ndarray]:  # type: ignore[no-untyped-def]
    """The survivors and the modular sum of their quantised contributions, in Python ints.

    A survivor is a client whose masked input reached the coordinator: it did not leave
    before the masked-input stage (one that leaves after it is unmasked by the others).
    """
    sa, rnd, results = config.secure_aggregation, buffer["round"], buffer["results"]
    early = set(PROTOCOL_DROPOUT_STAGES[:-1])  # advertise_keys, share_keys
    survivors = [r.client_id for r in results if buffer["drops"].get(r.client_id) not in early]
    quantiser = Quantiser(bits=sa.bits, clipping_range=sa.clipping_range,
                          max_weight=sa.max_weight, cohort_size=len(results))
    total: np.ndarray | None = None
    for r in results:
        if r.client_id not in survivors:
            continue
        w = (min(int(r.num_examples), sa.max_weight) if buffer["weighting"] == "examples"
             else 1)
        # the client's stochastic rounding stream (protocol.SecAggClient.rng): update, then meta
        rng = derive_rng(config.run.seed, "secagg-rounding", rnd, r.client_id)
        words = quantiser.encode(r.update.double().numpy(), w, [], rng)
        meta = encode_meta((float(r.num_examples), float(r.num_steps),
                            float(r.metrics.get("train_loss", 0.0))),
                           levels=quantiser.levels, max_weight=sa.max_weight, rng=rng)
        words = np.concatenate([words, quantiser.embed(meta)]).astype(object)
        total = words if total is None else total + words
    assert total is not None
    return survivors, total % (1 << sa.bits)


@settings(max_examples=20, **SLOW)
@given(data=st.data(), seed=st.integers(0, 2**16), k=st.integers(3, 6),
       extra=st.integers(0, 3), staleness=st.sampled_from(["polynomial", "constant"]),
       training_dropout=st.sampled_from([0.0, 0.2]))
def test_every_buffer_unmasks_exactly_the_survivors_plaintext_sum(data, seed, k, extra,
                                                                  staleness, training_dropout):
    config = load_config(None, [*FAST, "run.rounds=3", f"run.seed={seed}",
                                "strategy.name='fedbuff'", f"strategy.buffer_size={k}",
                                f"strategy.staleness='{staleness}'",
                                f"simulation.concurrency={k + extra}",
                                "secure_aggregation.enabled=true",
                                "simulation.dropout_stage='training'",
                                f"simulation.dropout_rate={training_dropout}"])

    def choose(rnd: int, cohort: list[int], threshold: int) -> dict[int, str]:
        # at most n - t clients leave: t survivors remain to unmask (protocol.py, stage 4)
        n_drop = data.draw(st.integers(0, len(cohort) - threshold), label=f"drops {rnd}")
        leavers = data.draw(st.permutations(cohort), label=f"order {rnd}")[:n_drop]
        return {cid: data.draw(st.sampled_from(PROTOCOL_DROPOUT_STAGES), label=f"stage {cid}")
                for cid in leavers}

    sim = build_simulation(config)
    coordinator = sim.coordinator
    assert isinstance(coordinator, BufferedCoordinator)
    recorder = _RecordingAggregator(sim.config, choose)
    coordinator.aggregator = recorder
    history = coordinator.run()

    assert [b["round"] for b in recorder.buffers] == [1, 2, 3]  # one SecAgg instance a buffer
    for buffer, row in zip(recorder.buffers, history, strict=True):
        report = buffer["report"]
        assert report.cohort == [r.client_id for r in buffer["results"]]
        assert len(set(report.cohort)) == k  # K distinct clients: each contributes once
        survivors, expected = _plaintext_sum(sim.config, buffer)
        assert sorted(report.included) == survivors
        assert report.sum_words is not None
        assert report.sum_words.astype(object).tolist() == expected.tolist()  # exact, in Z_2^b
        assert row["num_clients"] == len(survivors)
        # and the decoded sum is the survivors' weighted updates, up to stochastic rounding
        sa = sim.config.secure_aggregation
        quantiser = Quantiser(bits=sa.bits, clipping_range=sa.clipping_range,
                              max_weight=sa.max_weight, cohort_size=k)
        plain = sum(r.update.double() * (min(int(r.num_examples), sa.max_weight)
                                         if buffer["weighting"] == "examples" else 1)
                    for r in buffer["results"] if r.client_id in survivors)
        err = (buffer["aggregate"].update_sum.double() - plain).abs().max()
        assert float(err) <= len(survivors) / quantiser.update_scale


def _ledger_matches_opacus(run_dir, history) -> list[tuple[float, float, int]]:  # type: ignore[no-untyped-def]
    from opacus.accountants import RDPAccountant

    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    entries = ledger["accounts"]["population"]
    events = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
    assert [e["round"] for e in entries] == [r["round"] for r in history]  # one per buffer
    acc = RDPAccountant()
    acc.history = list(events)
    for i in range(1, len(events) + 1):  # after every recorded event, not only the last
        step = RDPAccountant()
        step.history = list(events[:i])
        assert entries[i - 1]["epsilon"] == pytest.approx(
            step.get_epsilon(delta=ledger["delta"]), rel=1e-9)
    assert ledger["epsilon"] == pytest.approx(acc.get_epsilon(delta=ledger["delta"]), rel=1e-9)
    assert history[-1]["epsilon"] == pytest.approx(ledger["epsilon"], rel=1e-12)
    return events


@settings(max_examples=4, **SLOW)
@given(z=st.floats(0.6, 3.0), k=st.integers(3, 5), rounds=st.integers(2, 4),
       stage=st.sampled_from(PROTOCOL_DROPOUT_STAGES))
def test_central_dp_under_fedbuff_and_secagg_ledger_matches_opacus(tmp_path_factory, z, k,
                                                                   rounds, stage):
    run_dir, history = run_simulation(None, overrides=[
        *FAST, f"run.rounds={rounds}", "strategy.name='fedbuff'", f"strategy.buffer_size={k}",
        f"simulation.concurrency={k + 2}", "secure_aggregation.enabled=true",
        f"simulation.dropout_stage='{stage}'", "simulation.dropout_rate=0.2",
        "privacy.mode='central'", f"privacy.noise_multiplier={z}", "privacy.clip_norm=1.0",
        "privacy.delta=1e-5"], output=tmp_path_factory.mktemp("dp") / "run")
    events = _ledger_matches_opacus(run_dir, history)
    # a buffer is whoever finished first, not a sample: no amplification is claimed
    assert events == [(pytest.approx(z), 1.0, 1)] * rounds
    assert any(r["num_clients"] < k for r in history) or stage == "masked_input"


def test_distributed_dp_under_fedbuff_is_sized_for_the_buffer(tmp_path):
    run_dir, history = run_simulation(None, overrides=[
        *FAST, "run.rounds=3", "strategy.name='fedbuff'", "strategy.buffer_size=4",
        "strategy.staleness='constant'", "simulation.concurrency=6",
        "secure_aggregation.enabled=true", "privacy.mode='distributed'",
        "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"], output=tmp_path / "run")
    ledger = json.loads((run_dir / "privacy_ledger.json").read_text())
    assert ledger["settings"]["expected_clients"] == 4.0  # the buffer, not the population
    assert ledger["settings"]["sample_rate"] == 1.0
    _ledger_matches_opacus(run_dir, history)


def test_distributed_dp_under_fedbuff_refuses_staleness_weights_in_one_line(tmp_path, capsys):
    # the update is encoded into Z_2^b by the client before its staleness is known
    code, _, err = run_cli(["simulate", *[a for o in [
        *FAST, "strategy.name='fedbuff'", "strategy.buffer_size=4", "simulation.concurrency=6",
        "secure_aggregation.enabled=true", "privacy.mode='distributed'",
        "privacy.noise_multiplier=1.0", "privacy.clip_norm=1.0"] for a in ("--set", o)],
        "-o", str(tmp_path / "x")], capsys)
    assert_one_line_error(code, err)
    assert "strategy.staleness = 'constant'" in err

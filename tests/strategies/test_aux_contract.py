"""The strategy aux-vector contract (confide.strategies.aux_vectors).

A plugin whose aux vectors break the contract is refused when the job starts, in one line
naming the plugin and the rule; a conforming one gives the same accuracy with and without
secure aggregation, with its aux vectors inside the masked vector.
"""

from __future__ import annotations

import logging

import pytest
import torch
from confide_testing import FAST, assert_one_line_error, run_cli

from confide.app.simulate import build_simulation
from confide.config import load_config
from confide.exceptions import RoundFailedError, StrategyError
from confide.privacy.secagg.metadata import META_FIELDS
from confide.strategies import get_strategy

SECAGG = "secure_aggregation.enabled=true"


def job(strategy: str, *extra: str, rounds: int = 2):
    return load_config(None, [*FAST, f"run.rounds={rounds}", f"strategy.name='{strategy}'",
                              *extra])


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_fixed_length_aux_runs_in_the_clear_and_is_refused_at_start_under_secagg():
    sim = build_simulation(job("aux_plugins:OneElementAux", rounds=1))
    assert sim.coordinator.run()[-1]["num_clients"] == 10  # summed in the clear: fine
    with pytest.raises(StrategyError) as exc:
        build_simulation(job("aux_plugins:OneElementAux", SECAGG))
    message = one_line(exc)
    assert "strategy 'one-element-aux'" in message
    assert "aux vector 'norm' has length 1" in message
    assert f"model's length ({sim.coordinator.params.numel()})" in message


def test_declared_bound_beyond_the_clipping_range_is_refused_at_start():
    with pytest.raises(StrategyError) as exc:
        build_simulation(job("aux_plugins:WideAux", SECAGG))
    message = one_line(exc)
    assert "strategy 'wide-aux'" in message and "up to 100" in message
    assert "secure_aggregation.clipping_range = 8" in message
    # within a range that holds it, the same plugin starts
    build_simulation(job("aux_plugins:WideAux", SECAGG, "secure_aggregation.clipping_range=128"))


def test_a_declaration_that_is_not_auxvectors_is_refused_by_name():
    with pytest.raises(StrategyError) as exc:
        get_strategy("aux_plugins:BadDeclaration")
    assert "aux_vectors must be a tuple of AuxVector" in one_line(exc)


@pytest.mark.parametrize(("plugin", "rule"), [
    ("LyingAux", "aux vector 'v' has shape (1,), declared"),
    ("OverBound", "aux vector 'v' has an entry of size 3, beyond its declared bound 1"),
])
def test_a_plugin_that_sends_other_aux_than_it_declared_is_stopped(plugin, rule):
    sim = build_simulation(job(f"aux_plugins:{plugin}", rounds=1))
    with pytest.raises(StrategyError) as exc:
        sim.coordinator.run()
    message = one_line(exc)
    assert "broke its aux-vector contract" in message and rule in message


def test_a_client_with_non_finite_aux_is_rejected_like_a_non_finite_update(caplog):
    sim = build_simulation(job("aux_plugins:NanAux", "cohort.min_clients=1", rounds=1))
    with caplog.at_level(logging.WARNING, logger="confide"), \
            pytest.raises(RoundFailedError, match="0 of 10 sampled clients reported"):
        sim.coordinator.run()  # every client's aux is NaN: none is averaged
    assert "client 0 sent a non-finite update or aux vector; it is excluded" in caplog.text


def test_the_cli_refuses_a_broken_plugin_in_one_line(capsys):
    code, out, err = run_cli(["simulate", "--set", "strategy.name='aux_plugins:OneElementAux'",
                              "--set", SECAGG, "--set", "run.rounds=1",
                              "--set", "client.device='cpu'"], capsys)
    assert_one_line_error(code, err)
    assert "one-element-aux" in err and "aux vector 'norm' has length 1" in err


def test_secagg_clipping_of_unbounded_aux_entries_is_reported(caplog):
    sim = build_simulation(job("aux_plugins:LoudAux", SECAGG, rounds=1))
    with caplog.at_level(logging.WARNING, logger="confide"):
        sim.coordinator.run()
    dim = sim.coordinator.params.numel()
    warnings = [r.getMessage() for r in caplog.records if "are clipped" in r.getMessage()]
    assert warnings, caplog.text
    assert f" {10 * dim} aux-vector entries" in warnings[0]  # every entry of all 10 clients


@pytest.mark.parametrize("strategy", ["scaffold", "aux_plugins:MeanDrift"])
def test_conforming_aux_gives_the_same_accuracy_with_and_without_secure_aggregation(strategy):
    runs = {}
    for secure in (False, True):
        sim = build_simulation(job(strategy, f"secure_aggregation.enabled={str(secure).lower()}",
                                   rounds=3))
        history = sim.coordinator.run()
        runs[secure] = (sim, [r["test_accuracy"] for r in history])
    (plain, plain_acc), (secure, secure_acc) = runs[False], runs[True]
    print(strategy, "accuracy in the clear", plain_acc, "under secure aggregation", secure_acc)
    assert plain_acc[-1] > 0.5  # it learns
    assert secure_acc == pytest.approx(plain_acc, abs=0.01)
    # SecAgg's fixed-point rounding (about 1e-6 a coordinate), carried through two more
    # rounds of training from the slightly different weights: a few 1e-4 at most
    torch.testing.assert_close(secure.coordinator.params, plain.coordinator.params,
                               atol=5e-4, rtol=0)
    # the aux vector travelled inside the masked vector: [w*update, aux, w] + metadata
    report = secure.coordinator.aggregator.last_report
    dim = plain.coordinator.params.numel()
    assert not report.insecure
    assert report.vector_length == 2 * dim + 1 + len(META_FIELDS)
    assert len(report.included) == 10
    if strategy == "scaffold":  # the server control variate c is built from the aux sums
        assert float(plain.coordinator.strategy.c.abs().max()) > 1e-3
        torch.testing.assert_close(secure.coordinator.strategy.c, plain.coordinator.strategy.c,
                                   atol=1e-5, rtol=0)


def test_strategies_show_prints_the_declaration(capsys):
    code, out, _ = run_cli(["strategies", "show", "aux_plugins:OneElementAux"], capsys)
    assert code == 0
    assert "secure aggregation: no (aux norm: not model length)" in out
    assert "norm: length 1, summed unweighted" in out
    code, out, _ = run_cli(["strategies", "show", "aux_plugins:WideAux"], capsys)
    assert "secure aggregation needs clipping_range >= 100" in out
    code, out, _ = run_cli(["strategies", "list"], capsys)
    assert code == 0 and "yes (+ aux delta_c)" in out  # scaffold

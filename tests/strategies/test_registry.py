"""The strategy registry, import paths, contract checks and parameter validation."""

import os
import subprocess
import sys
import textwrap

import pytest
from confide_testing import cli_command

from confide.exceptions import StrategyError
from confide.strategies import Strategy, available_strategies, get_strategy, register_strategy
from confide.strategies import registry as registry_module

BUILT_INS = {"fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad", "scaffold",
             "fedmedian", "trimmedmean", "krum"}


def test_every_built_in_is_registered_with_a_citation():
    strategies = available_strategies()
    assert BUILT_INS <= set(strategies)
    for name in BUILT_INS:
        cls = strategies[name]
        assert cls.name == name
        assert cls.citation, name
        assert registry_module.strategy_origin(name) == "confide"
    robust = {n for n in BUILT_INS if strategies[n].requires_individual_updates}
    assert robust == {"fedmedian", "trimmedmean", "krum"}


def test_duplicate_name_is_an_error():
    with pytest.raises(StrategyError, match="'fedavg' is already registered"):
        register_strategy("fedavg", Strategy)


def test_unknown_name_lists_what_is_available():
    with pytest.raises(StrategyError) as exc:
        get_strategy("fedsgd")
    message = str(exc.value)
    assert "unknown strategy 'fedsgd'" in message
    assert all(name in message for name in BUILT_INS)
    assert "package.module:Class" in message


def test_import_path(tmp_path, monkeypatch):
    (tmp_path / "my_strategies.py").write_text(textwrap.dedent("""
        from confide.strategies import Strategy

        class Mine(Strategy):
            name = "mine"

        class NotAStrategy:
            pass

        class BadParams(Strategy):
            Params = dict

        class Robustish(Strategy):
            requires_individual_updates = True
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_strategy("my_strategies:Mine").__name__ == "Mine"
    with pytest.raises(StrategyError, match="is not a confide Strategy subclass"):
        get_strategy("my_strategies:NotAStrategy")
    with pytest.raises(StrategyError, match="Params must be a dataclass"):
        get_strategy("my_strategies:BadParams")
    with pytest.raises(StrategyError, match="does not override aggregate_individual"):
        get_strategy("my_strategies:Robustish")
    with pytest.raises(StrategyError, match="has no 'Missing'"):
        get_strategy("my_strategies:Missing")
    with pytest.raises(StrategyError, match="cannot import 'no_such_module_xyz'"):
        get_strategy("no_such_module_xyz:Thing")


@pytest.mark.parametrize(("name", "options", "message"), [
    ("fedadam", {"server_lr": -0.1}, "strategy.server_lr = -0.1 is out of range; it must be > 0"),
    ("fedavgm", {"server_momentum": 1.0}, "strategy.server_momentum = 1.0 is out of range"),
    ("fedprox", {"mu": -1}, "strategy.mu = -1.0 is out of range; it must be >= 0"),
    ("trimmedmean", {"beta": 0.5}, "strategy.beta = 0.5 is out of range; it must be < 0.5"),
    ("krum", {"num_byzantine": 1.5}, "strategy.num_byzantine = 1.5 has the wrong type"),
    ("fedyogi", {"tau": 0}, "strategy.tau = 0.0 is out of range"),
    ("scaffold", {"lr": 1.0}, "unknown key strategy.lr; allowed keys in [strategy]: server_lr"),
    ("fedavg", {"mu": 0.1}, "unknown key strategy.mu"),
])
def test_parameters_are_validated(name, options, message):
    with pytest.raises(StrategyError) as exc:
        get_strategy(name).from_options(options)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_parameters_reach_the_strategy():
    s = get_strategy("fedadam").from_options({"server_lr": 0.5, "tau": 1e-4})
    assert (s.params.server_lr, s.params.tau, s.params.beta1) == (0.5, 1e-4, 0.9)
    assert s.describe() == "fedadam(server_lr=0.5, beta1=0.9, beta2=0.99, tau=0.0001)"


def _fake_dist(site, name, entry_points):
    """A real (if minimal) installed distribution: what pip would leave in site-packages."""
    info = site / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[confide.strategies]\n" + entry_points)


def test_broken_plugins_do_not_break_the_others(tmp_path):
    site = tmp_path / "site"
    (site / "broken_plugin.py").parent.mkdir(parents=True)
    (site / "broken_plugin.py").write_text("raise RuntimeError('boom at import')\n")
    (site / "odd_plugin.py").write_text("class NotAStrategy:\n    pass\n")
    _fake_dist(site, "broken-plugin", "broken = broken_plugin:Thing\n")
    _fake_dist(site, "odd-plugin", "odd = odd_plugin:NotAStrategy\n"
                                   "fedavg = odd_plugin:NotAStrategy\n")
    env_code = textwrap.dedent("""
        import sys
        from confide.exceptions import StrategyError
        from confide.strategies import broken_plugins, get_strategy
        for name in ("broken", "odd", "fedavg", "fedprox"):
            try:
                print(name, "ok", get_strategy(name).__name__)
            except StrategyError as exc:
                print(name, "error", exc)
        print(sorted(broken_plugins()))
    """)
    out = subprocess.run([sys.executable, "-c", env_code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)}, check=True)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("broken error strategy plugin 'broken' (broken_plugin:Thing, "
                               "from broken-plugin) failed to import: boom at import")
    assert lines[1].startswith("odd error strategy plugin 'odd'")
    assert "is not a confide Strategy subclass" in lines[1]
    # a plugin claiming a built-in's name: a duplicate is an error, never a silent shadowing
    assert lines[2].startswith("fedavg error strategy name 'fedavg' is claimed twice: by "
                               "confide and by strategy plugin 'fedavg'")
    assert lines[3] == "fedprox ok FedProx"
    assert lines[4] == "['broken', 'fedavg', 'odd']"
    listing = subprocess.run([*cli_command(), "strategies", "list"], capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(site)},
                             check=True).stdout
    assert "broken: BROKEN - strategy plugin 'broken'" in listing
    assert any(line.startswith("fedprox ") for line in listing.splitlines())

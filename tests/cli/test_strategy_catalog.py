"""The torch-free catalog ``confide strategies`` prints equals what the registry holds."""

import os
import subprocess
import sys

from confide_testing import ROOT, cli_command

from confide.cli import strategy_catalog
from confide.cli._builtin_strategies import BUILTIN_STRATEGIES
from confide.strategies import registry
from confide.strategies.registry import available_strategies, strategy_origin


def test_catalog_matches_the_registered_built_ins():
    real = {name: strategy_catalog.describe(cls) for name, cls in available_strategies().items()
            if strategy_origin(name) == "confide"}
    assert BUILTIN_STRATEGIES == real, (
        "confide/cli/_builtin_strategies.py is stale: run python scripts/strategy_catalog.py")


def test_generator_reproduces_the_committed_file():
    proc = subprocess.run([sys.executable, "-c",
                           "import sys; sys.path.insert(0, 'scripts'); import strategy_catalog;"
                           "print(strategy_catalog.render(), end='')"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    committed = (ROOT / "confide" / "cli" / "_builtin_strategies.py").read_text(encoding="utf-8")
    assert proc.stdout == committed


def test_entry_point_group_is_the_registry_s():
    assert strategy_catalog.ENTRY_POINT_GROUP == registry.ENTRY_POINT_GROUP


def test_installed_plugin_is_read_from_the_real_class(tmp_path):
    # an installed plugin makes `strategies list|show` ask the registry, which imports it
    dist = tmp_path / "confide_catalog_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: confide-catalog-probe\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[confide.strategies]\n"
                                           "probe = confide_catalog_probe:Probe\n")
    (tmp_path / "confide_catalog_probe.py").write_text(
        "from confide.strategies import Strategy\n\n"
        "class Probe(Strategy):\n"
        "    '''A probe strategy.'''\n"
        "    name = 'probe'\n"
        "    citation = 'nobody 2026'\n"
        "    requires_individual_updates = True\n"
        "    def aggregate_individual(self, updates, weights):\n"
        "        return updates[0]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    listing = subprocess.run([*cli_command(), "strategies", "list"], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    assert set(rows) == {"probe", *BUILTIN_STRATEGIES}
    assert rows["probe"].split()[1:5] == ["plugin", "confide-catalog-probe", "no", "(needs"]
    assert rows["probe"].endswith("nobody 2026")
    show = subprocess.run([*cli_command(), "strategies", "show", "probe"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert show.returncode == 0, show.stderr
    assert show.stdout.splitlines()[0] == "probe: A probe strategy."

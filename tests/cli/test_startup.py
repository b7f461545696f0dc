"""``confide --help`` and ``confide strategies list|show`` start without importing torch."""

import json
import subprocess
import sys

import pytest
from confide_testing import ROOT

# runs the CLI in a fresh interpreter, then reports which heavy packages got imported
_PROBE = """
import json, sys
from confide.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code or 0
else:
    code = 0
heavy = sorted(m for m in ("torch", "opacus", "flwr", "numpy", "sklearn") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


@pytest.mark.parametrize("args", [
    ["--help"],
    ["simulate", "--help"],
    ["strategies", "list"],
    ["strategies", "show", "fedprox"],
    ["config"],
])
def test_command_imports_no_torch(args):
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stdout
    assert "torch" not in report["heavy"], report
    assert report["heavy"] == [], report  # nor opacus, flwr, numpy or scikit-learn

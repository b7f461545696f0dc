"""The package's structure, as tests over its import graph (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "confide"
#: floors, lowest first (docs/architecture.md); a room imports only rooms on lower floors
FLOORS = [{"ground"}, {"strategies"}, {"client"}, {"privacy"}, {"server", "simulations"},
          {"app"}, {"cli"}]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module(p): p for p in PKG.rglob("*.py")}


def _imports(mod: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = node.module or ""
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                prefix = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in FILES else prefix
                     for a in node.names]
        for name in names:
            while name and name not in FILES:
                name = name.rpartition(".")[0]
            if name and name != mod and name.startswith("confide"):
                out.add(name)
    return out


GRAPH = {m: _imports(m, p) for m, p in FILES.items()}


def _room(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) > 1 and (PKG / parts[1]).is_dir():
        return parts[1]
    return "face" if mod == "confide" else "ground"


def _floor(room: str) -> int:
    return next(i for i, rooms in enumerate(FLOORS) if room in rooms)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_files():
    assert _cycles(GRAPH) == []


def test_no_import_cycle_between_subpackages_and_floors_hold():
    rooms: dict[str, set[str]] = {}
    upward = []
    for mod, targets in GRAPH.items():
        a = _room(mod)
        for t in targets:
            b = _room(t)
            if a == b or a == "face":
                continue
            rooms.setdefault(a, set()).add(b)
            if b == "face" or _floor(b) >= _floor(a):
                upward.append(f"{mod} -> {t}")
    assert _cycles(rooms) == []
    assert upward == []


@pytest.mark.parametrize("path", sorted(FILES.values()), ids=lambda p: str(p.relative_to(PKG)))
def test_no_file_over_600_lines(path):
    assert path.read_text(encoding="utf-8").count("\n") <= 600


def test_the_entry_points_call_the_one_job_builder():
    callers = sorted(m for m, p in FILES.items() if m != "confide.app.job"
                     and re.search(r"\bbuild_job\(", p.read_text(encoding="utf-8")))
    # the Flower App's ServerApp (flower_project) is the fourth: `flwr run` builds the same job
    assert callers == ["confide.app.client_app", "confide.app.deploy",
                       "confide.app.flower_project", "confide.app.simulate"]
    # nobody else assembles a job: strategies and privacy are built in the job builder only
    for needle in (r"\bbuild_round_privacy\(", r"get_strategy\([^)]*\)\.from_options\("):
        others = sorted(m for m, p in FILES.items()
                        if re.search(needle, p.read_text(encoding="utf-8"))
                        and m not in {"confide.app.job", "confide.privacy"})
        assert others == [], needle


def test_one_round_loop():
    # the server update (DESIGN.md step 7) is applied in one place: Coordinator.run_round
    appliers = sorted(m for m, p in FILES.items()
                      if re.search(r"strategy\.apply\(", p.read_text(encoding="utf-8")))
    assert appliers == ["confide.server.coordinator"]

"""The layout of docs/architecture.md holds: the import contracts of pyproject.toml
(`lint-imports`), no import cycle, the engine reached through its public face, small modules and
a `pipeline/` top level of shared modules and wings only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = {"__init__", "cli", "errors", "storage", "redaction", "images", "stages"}
WINGS = {"job", "input", "output", "score", "worker", "driver", "tools", "curate"}
MAX_LINES = 400


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    """Every import of sdedit and pipeline, function-local and TYPE_CHECKING ones included."""
    return grimp.build_graph("sdedit", "pipeline", include_external_packages=False)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            component.append(v)
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_import_contracts_hold() -> None:
    """The layers and forbidden imports declared in pyproject.toml ([tool.importlinter])."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    done = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and "Contracts: 4 kept, 0 broken." in done.stdout


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    assert cycles(edges) == []


def test_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: a loop through three modules is found, a chain is not."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_pipeline_reaches_the_engine_through_its_face(graph: grimp.ImportGraph) -> None:
    """Every import of the engine in pipeline/ is `from sdedit import ...` (grimp reads
    `from sdedit import edit` as the module sdedit.edit, hence the look at the line)."""
    deep = []
    for imp in graph.find_matching_direct_imports(import_expression="pipeline.** -> sdedit.**"):
        for detail in graph.get_import_details(importer=imp["importer"],
                                               imported=imp["imported"]):
            if not detail["line_contents"].startswith("from sdedit import "):
                deep.append(f"{imp['importer']}:{detail['line_number']}: "
                            f"{detail['line_contents']}")
    assert deep == [], "import these names from `sdedit` (export them there if needed)"


def test_modules_are_small() -> None:
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("sdedit", "pipeline") for p in (ROOT / folder).rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_pipeline_top_level_is_shared_modules_and_wings() -> None:
    top = ROOT / "pipeline"
    modules = {p.stem for p in top.glob("*.py")}
    folders = {p.name for p in top.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert (modules, folders) == (SHARED, WINGS)

"""The package's layout is its data flow: each subpackage imports only the parts of the flow
before it (batchscan/__init__.py), and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "batchscan"
#: The parts of the flow, in order (storage, how anything is put on disk, below them all);
#: the top-level modules come after all of them.
FLOW = ("storage", "ingest", "scoring", "engines", "results", "site", "pacs")
TOP = len(FLOW)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _level(module: str) -> int:
    parts = module.split(".")
    return FLOW.index(parts[1]) if len(parts) > 1 and parts[1] in FLOW else TOP


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The batchscan modules `path` imports (``from batchscan import x`` counts as the module
    ``batchscan.x`` when that is a module, else as ``batchscan``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "batchscan" or node.module.startswith("batchscan."):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    as_path = PACKAGE.parent / candidate.replace(".", "/")
                    is_module = as_path.with_suffix(".py").is_file() or as_path.is_dir()
                    found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("batchscan")}
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_top_level_shows_the_flow() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert subpackages == {*FLOW, "models"}
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == {"cli", "scan", "config", "options", "synth"}
    for name in FLOW:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"batchscan/{name}/__init__.py says what it may import"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _level(m) < TOP))
def test_a_part_of_the_flow_imports_only_the_parts_before_it(module: str) -> None:
    own = _level(module)
    for imported in _imports(MODULES[module]):
        if imported == "batchscan":  # the versions only (__version__, versions())
            continue
        assert _level(imported) <= own, f"{module} reaches up the flow to {imported}"


def test_no_modules_import_each_other_in_a_circle() -> None:
    graph = {
        m: {i for i in _imports(p, top_level_only=True) if i in MODULES} for m, p in MODULES.items()
    }
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for imported in graph[module]:
            if state.get(imported) == 1:
                cycle = [*trail[trail.index(imported) :], imported] if imported in trail else trail
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if imported not in state:
                visit(imported, [*trail, imported])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_jobs_share_helpers_through_common_only() -> None:
    """A script under jobs/ imports shared helpers from jobs/common/, never from another
    script (a one-off measurement is not a library)."""
    jobs = PACKAGE.parent / "jobs"
    scripts = {p.stem for p in jobs.rglob("*.py") if p.parent.name != "common"}
    for path in jobs.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for name in names:
                assert name.split(".")[0] not in scripts, f"{path} imports the script {name}"

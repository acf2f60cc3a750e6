"""The tree's shape holds: no import cycle inside exporter/, calibration/ or runtimes/ (every import
counts, also those written inside functions: a cycle dodged by a late import is still a cycle), the
dependency direction exporter → calibration → runtimes, recipes import stages and never the reverse,
and no file over ~500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("exporter", "calibration", "runtimes")
# exporter/'s stage subpackages, in pipeline order (the recipes in exporter/recipes/ run them).
STAGES = ("source", "export", "lower", "build", "gate", "bundle")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            mods[name] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (absolute or relative, at any depth of the file)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            candidates = [prefix] + [f"{prefix}.{a.name}" for a in node.names]
        else:
            continue
        for c in candidates:
            # `import exporter.x.y` depends on exporter.x.y; the packages above it are its parents, not deps
            if c in mods and c != name:
                found.add(c)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" ↔ ".join(c) for c in found)


def test_dependency_direction():
    """exporter → calibration → runtimes: runtimes imports neither, calibration never exporter."""
    allowed = {"runtimes": {"runtimes"}, "calibration": {"calibration", "runtimes"},
               "exporter": {"exporter", "calibration", "runtimes"}}
    wrong = [f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
             if d.split(".")[0] not in allowed[m.split(".")[0]]]
    assert not wrong, wrong


def test_no_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 520}
    assert not long, long


def test_no_function_over_80_lines():
    long = []
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                if (n := node.end_lineno - node.lineno + 1) > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_recipes_import_stages_never_the_reverse():
    """The recipe modules (and the table) import stages; no stage imports a recipe."""
    graph = import_graph()
    recipes = {m for m in graph if m == "exporter.recipes" or m.startswith("exporter.recipes.")}
    stages = {m for m in graph if m.split(".")[:2] in ([["exporter", s] for s in STAGES])}
    assert len(stages) > 25 and len(recipes) >= 4, (len(stages), sorted(recipes))
    wrong = [f"{m} imports {d}" for m in stages for d in graph[m] if d in recipes]
    assert not wrong, wrong

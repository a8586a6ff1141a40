"""The package's shape: one subpackage per concern, imports only downward (lazy ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import lit_llmtime

PACKAGE = Path(lit_llmtime.__file__).parent
# From the bottom up: a subpackage imports only those before it (and the top-level modules).
LAYERS = ("text", "data", "model", "budget", "forecasting", "training", "app")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every lit_llmtime module -> the lit_llmtime modules it imports anywhere (lazily too)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lit_llmtime"):
                for alias in node.names:  # "from lit_llmtime.data import module" names a module
                    target = f"{node.module}.{alias.name}"
                    targets.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("lit_llmtime")}
        graph[name] = {t for t in targets if t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` as the list of its nodes, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (cycle := visit(node)):
            return cycle
    return None


def subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def test_no_import_cycle_between_modules():
    graph = {m: {t for t in ts if t != "lit_llmtime"} for m, ts in import_graph().items()}
    assert find_cycle(graph) is None


def test_subpackages_import_only_downward():
    upward = []
    for module, targets in import_graph().items():
        mine = subpackage(module)
        for target in targets:
            theirs = subpackage(target)
            if module == "lit_llmtime" or mine is None or theirs is None or theirs == mine:
                continue  # the public API at the top imports everything; top-level modules import none
            if LAYERS.index(theirs) > LAYERS.index(mine):
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_top_level_modules_import_no_subpackage():
    top = [m for m in import_graph() if m.count(".") == 1 and subpackage(m) is None]
    assert all(subpackage(t) is None for m in top for t in import_graph()[m]), top


def test_the_tree_shows_the_concerns():
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == sorted(LAYERS)
    top_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top_modules) <= 6, top_modules


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None

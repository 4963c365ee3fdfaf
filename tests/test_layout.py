"""The package's layout (README "What it does"): modules stay small, no module reads another's
private names, the import graph has no cycle, and functions stay short. Read from the source with
`ast`, so the check costs nothing at run time."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "explainfix_cli"
README = PACKAGE.parent / "README.md"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(name: str, tree: ast.Module, modules: dict[str, ast.Module]) -> list[tuple[str, str]]:
    """(imported module, imported name or '') for every import of this package's modules."""
    is_package = (PACKAGE.parent / Path(*name.split("."))).is_dir()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "explainfix_cli":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "explainfix_cli"]
    return found


def test_no_module_is_over_500_lines() -> None:
    long = {p.name: n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_no_module_imports_another_modules_private_name() -> None:
    modules = _modules()
    private = [(name, f"{mod}.{n}") for name, tree in modules.items() for mod, n in _imports(name, tree, modules) if n.startswith("_") and not n.endswith("__") and mod != name]
    assert not private, private


def test_the_import_graph_has_no_cycle() -> None:
    modules = _modules()
    graph = {name: {mod for mod, _ in _imports(name, tree, modules) if mod in modules and mod != name} for name, tree in modules.items()}
    # a package's __init__ may re-export its own modules; a cycle through that is not a design cycle
    graph = {k: {v for v in vs if not k.startswith(v + ".")} for k, vs in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle.extend([*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, [*path, nxt]):
                return True
        state[node] = 2
        return False

    assert not any(visit(n, [n]) for n in sorted(graph) if n not in state), " -> ".join(cycle)


def test_functions_are_short_or_say_why() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                doc = ast.get_docstring(node) or ""
                if lines > MAX_FUNCTION_LINES and "Long because" not in doc:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines})")
    assert not long, long


def test_readme_is_a_users_guide_of_at_most_30000_bytes() -> None:
    assert len(README.read_bytes()) <= 30_000

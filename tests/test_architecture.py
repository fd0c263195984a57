"""The layer rules README's Architecture section states, checked on the source tree.

Every import of an ``slm_export`` module counts, lazy ones inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slm_export"

# A module may import modules of a lower rank, and modules of its own package (a package's
# files may use each other). Equal ranks of different packages may not import each other,
# except where ALLOWED says so; nothing may form a cycle.
RANKS = {
    "errors": 0,
    "config": 1, "registry": 1,
    "devices": 2, "inductor_cpu": 2, "model": 2, "tokenizer": 2, "stories": 2, "optim": 2, "artifacts": 2,
    "loss": 3,
    "checkpoint": 3,
    "data": 4,
    "training": 5, "plots": 5,
    "runtime": 6,
    "export": 7,
    "cli": 8, "doctor": 8,
    "benchmark": 9, "serve": 9, "evaluate": 9,
}
ALLOWED = {("training", "plots")}  # the trainer draws the plots at the end of a run
LONG_FUNCTIONS = 60  # lines, decorators and docstring included


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """slm_export modules ``path`` imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    known = modules()
    return {m for m in out if m in known and m != name}


def unit(module: str) -> str:
    """The rank table's unit: the first name below slm_export."""
    return module.split(".")[1] if module != "slm_export" else ""


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            a, b = unit(src), unit(dst)
            if a and b and a != b and (a, b) not in ALLOWED and RANKS[b] >= RANKS[a]:
                bad.append(f"{src} -> {dst}")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle between modules, or []. A package's __init__ importing its own
    modules is not a cycle with them."""
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> list[str]:
        for t in sorted(edges.get(m, ())):
            if t in stack:
                return stack[stack.index(t):] + [t]
            if t not in done:
                found = visit(t, [*stack, t])
                if found:
                    return found
        done.add(m)
        return []

    for m in sorted(edges):
        if m not in done:
            found = visit(m, [m])
            if found:
                return found
    return []


def long_functions(path: Path, name: str) -> list[str]:
    long = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if node.end_lineno - first + 1 > LONG_FUNCTIONS:
                long.append(f"{name}.{node.name}: {node.end_lineno - first + 1} lines")
    return long


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: imports(path, name) for name, path in modules().items()}


def test_every_module_has_a_rank(graph):
    missing = sorted({unit(m) for m in graph if m != "slm_export"} - RANKS.keys())
    assert not missing, f"add {missing} to RANKS (and to README's Architecture section)"


def test_imports_go_down_only(graph):
    assert not layer_violations(graph), "\n".join(layer_violations(graph))


def test_no_import_cycles(graph):
    assert not find_cycle(graph), " -> ".join(find_cycle(graph))


def test_functions_fit_on_a_screen():
    long = [f for name, path in modules().items() for f in long_functions(path, name)]
    assert not long, "\n".join(long)


def test_the_checks_fail_on_a_tree_that_breaks_them(tmp_path):
    lazy = tmp_path / "x.py"
    lazy.write_text("def f():\n    from slm_export.export import build\n" + "    pass\n" * 60)
    up = imports(lazy, "slm_export.runtime.x")
    assert up == {"slm_export.export"}
    assert layer_violations({"slm_export.runtime.x": up}) == ["slm_export.runtime.x -> slm_export.export"]
    assert find_cycle({"slm_export.plots": {"slm_export.training"},
                       "slm_export.training": {"slm_export.plots"}})
    assert long_functions(lazy, "x") == ["x.f: 62 lines"]

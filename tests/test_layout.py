"""The package's shape: every import runs down the floors `converter/__init__.py` declares, none goes round in a
circle, and every module is small and says first what it holds."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import converter

PACKAGE = Path(converter.__file__).parent
MAX_LINES = 500


def floors() -> dict[str, int]:
    """Top-level module or package -> its floor (0 the lowest), from the table in the package's docstring."""
    rows = re.findall(r"^    (\w+) +(\w+(?:, \w+)*)$", converter.__doc__, re.MULTILINE)
    assert rows, "converter/__init__.py declares no floors"
    return {name: len(rows) - 1 - k for k, (_, names) in enumerate(rows) for name in names.split(", ")}


def modules() -> dict[str, Path]:
    """Dotted name under `converter` -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(p for p in parts if p != "__init__")] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that `name` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("converter"):
                target = node.module.removeprefix("converter").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from . import arch` imports a module, `from .plan import X` a name
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in known else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("converter.") for a in node.names if a.name.startswith("converter.")}
    return {m for m in found if m and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) & set(known) for name, path in known.items()}


def top(name: str) -> str:
    return name.split(".")[0]


def test_every_module_stands_on_a_declared_floor():
    level = floors()
    unplaced = sorted({top(m) for m in modules() if m and top(m) not in level})
    assert unplaced == [], f"modules on no floor of converter/__init__.py: {unplaced}"
    assert sorted(set(level) - {top(m) for m in modules() if m}) == [], "floors name modules that do not exist"


def test_no_import_climbs_to_a_higher_floor():
    level = floors()
    climbs = sorted(f"{m} -> {d}" for m, deps in graph().items() if m for d in deps
                    if d and level[top(d)] > level[top(m)])
    assert climbs == []


def test_no_import_circle():
    edges = graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_the_layout_test_sees_a_climb_and_a_circle(tmp_path, monkeypatch):
    """The checks above can fail: a planted upward import and a planted circle are found."""
    (tmp_path / "__init__.py").write_text('"""x\n\n    high  b\n    low   a\n"""\n')
    (tmp_path / "a.py").write_text('"""a"""\nfrom . import b\n')
    (tmp_path / "b.py").write_text('"""b"""\ndef f():\n    from .a import g\n')
    monkeypatch.setattr(converter, "__doc__", (tmp_path / "__init__.py").read_text())
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path)
    edges = graph()
    assert edges == {"": set(), "a": {"b"}, "b": {"a"}}
    with pytest.raises(AssertionError, match=r"a -> b"):
        test_no_import_climbs_to_a_higher_floor()
    with pytest.raises(AssertionError, match=r"\['a', 'b'\]"):
        test_no_import_circle()


@pytest.mark.parametrize("name", sorted(m for m in modules() if m))
def test_each_module_is_small_and_says_what_it_holds(name):
    path = modules()[name]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)}: {lines} lines, more than {MAX_LINES}"
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring, f"{path.relative_to(PACKAGE.parent)}: no docstring saying what it holds"

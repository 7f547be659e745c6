#!/usr/bin/env python3
"""Print the import graph of ``src/catzilla_tasks`` and check it for cycles.

    python scripts/import_graph.py            # the graph, one module a line
    python scripts/import_graph.py --check    # exit 1 if the eager imports have a cycle

An edge is *eager* when the import runs while the importing module loads (module level, also
under ``if``/``try``), and *lazy* when it sits inside a function or under ``if TYPE_CHECKING``
(it runs on first use, or never). Eager imports must form no cycle: a reader (and the
interpreter) can then load the package bottom-up. A lazy import that points back up the graph
is the documented way to break a cycle, and is printed with ``(lazy)``.

Modules talk through public names: ``private_imports`` lists every ``from .x import _y`` (printed
as PRIVATE lines) unless ``x`` is itself a private helper module (``_wire``, ``_pool``...) of the
importer's own package, whose underscore names are that package's internals. (A private
*module*, ``from . import _engine``, is a module import, not a private name.)
tests/test_import_graph.py holds the list to the known ones: no new one may appear.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "catzilla_tasks"
ROOT = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_pkg: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = current.split(".")
    if not is_pkg:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


class _Imports(ast.NodeVisitor):
    def __init__(self, current: str, is_pkg: bool, known: set[str]) -> None:
        self.current, self.is_pkg, self.known = current, is_pkg, known
        self.depth = 0  # > 0 inside a function or an `if TYPE_CHECKING:` block
        self.edges: dict[str, str] = {}  # target -> "eager" | "lazy" (eager wins)
        self.private: list[str] = []  # "module._name" imported from another module, refused

    def _add(self, name: str) -> None:
        # the longest known module that `name` is or lies inside
        while name and name not in self.known:
            name = name.rpartition(".")[0]
        if not name or name == self.current:
            return
        kind = "lazy" if self.depth else "eager"
        if self.edges.get(name) != "eager":
            self.edges[name] = kind

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        if checking:
            self.depth += 1
            for child in node.body:
                self.visit(child)
            self.depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == PACKAGE:
                self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = _resolve(self.current, self.is_pkg, node.level, node.module)
        if base.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            full = f"{base}.{alias.name}"
            self._add(full if full in self.known else base)
            dunder = alias.name.startswith("__") and alias.name.endswith("__")
            if alias.name.startswith("_") and not dunder and full not in self.known and not self._internal(base):
                self.private.append(full)

    def _internal(self, source: str) -> bool:
        """``source`` is a private helper module of the importer's own package."""
        pkg = self.current if self.is_pkg else self.current.rpartition(".")[0]
        parent, _, leaf = source.rpartition(".")
        return leaf.startswith("_") and parent == pkg


def graph(root: Path = ROOT) -> dict[str, dict[str, str]]:
    """{module: {imported module: "eager" | "lazy"}} for the package under ``root``."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    # extension modules (a .pyi stub beside no .py) are leaves: the C code imports nothing eagerly
    stubs = [f for f in (root / PACKAGE).rglob("*.pyi") if not f.with_suffix(".py").exists()]
    known = {module_name(f, root) for f in files + stubs}
    out: dict[str, dict[str, str]] = {module_name(f, root): {} for f in stubs}
    for f in files:
        name = module_name(f, root)
        v = _Imports(name, f.name == "__init__.py", known)
        v.visit(ast.parse(f.read_text(), str(f)))
        out[name] = v.edges
    return out


def private_imports(root: Path = ROOT) -> dict[str, list[str]]:
    """{module: [another module's private name it imports, ...]} (see the module docstring)."""
    files = sorted((root / PACKAGE).rglob("*.py"))
    stubs = [f for f in (root / PACKAGE).rglob("*.pyi") if not f.with_suffix(".py").exists()]
    known = {module_name(f, root) for f in files + stubs}
    out: dict[str, list[str]] = {}
    for f in files:
        name = module_name(f, root)
        v = _Imports(name, f.name == "__init__.py", known)
        v.visit(ast.parse(f.read_text(), str(f)))
        if v.private:
            out[name] = v.private
    return out


def eager_cycles(g: dict[str, dict[str, str]]) -> list[list[str]]:
    """Every cycle of eager edges, each once (as found by a depth-first search).

    A submodule's import of its own package (``catzilla_tasks.brokers.redis`` importing from
    ``catzilla_tasks``) is not a cycle the interpreter trips over when the package imports the
    submodule lazily, and is counted like any other edge here: the check is strict."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m, kind in sorted(g.get(n, {}).items()):
            if kind != "eager":
                continue
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n)
    return cycles


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if the eager imports have a cycle")
    args = p.parse_args()
    g = graph()
    for name in sorted(g):
        deps = ", ".join(m + (" (lazy)" if k == "lazy" else "") for m, k in sorted(g[name].items()))
        print(f"{name}: {deps or '-'}")
    cycles = eager_cycles(g)
    for c in cycles:
        print("CYCLE: " + " -> ".join(c), file=sys.stderr)
    private = private_imports()
    for name, names in sorted(private.items()):
        print(f"PRIVATE: {name} imports {', '.join(names)}", file=sys.stderr)
    if args.check and cycles:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

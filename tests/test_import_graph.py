"""No import cycles inside the ``zooaudit`` package.

Every module of ``zooaudit/`` is parsed with :mod:`ast` (nothing is imported), and an
edge ``a → b`` is drawn for every import of package module ``b`` written in ``a`` —
at module level *and* inside functions or classes (a lazy import is still a
dependency: it only hides the cycle until the function runs). ``from . import x``
counts as an import of the submodule ``x`` when ``x`` is one, else of the package.
The implicit import of a submodule's parent packages is not drawn as an edge.

The model and dataset sources register without importing back: the sources import the
leaves ``zoo.types`` (LoadedModel) and ``data.types`` / ``data.registry`` (AuditDataset, the
name → loader table), the packages import the sources, and ``specs`` reads the leaves
``data.registry`` and ``zoo.catalog`` (not ``load_dataset`` or the training code, which build
specs). The ``file:`` source is handed ``resolve_model`` instead of importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "zooaudit"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module named by a ``from ... import`` statement in ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Package modules imported anywhere in ``path`` (module level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest prefix that is a module of the package (``a.b.func`` → ``a.b``)
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in modules:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if target.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                add(sub if sub in modules else target)
    found.discard(module)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..a import x\n")
    (pkg / "c.py").write_text("import zooaudit.sub.b\n")
    graph = import_graph(pkg)
    assert graph["zooaudit.a"] == {"zooaudit.sub.b"}
    assert graph["zooaudit.sub.b"] == {"zooaudit.a"}
    assert graph["zooaudit.c"] == {"zooaudit.sub.b"}
    assert find_cycle(graph) in (["zooaudit.a", "zooaudit.sub.b", "zooaudit.a"],
                                 ["zooaudit.sub.b", "zooaudit.a", "zooaudit.sub.b"])


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert len(graph) > 20  # the package was found
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (module-level and function-level imports count): " + " → ".join(cycle)

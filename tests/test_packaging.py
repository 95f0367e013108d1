"""Packaging rules: the core (``zooaudit/``) imports no Prefect and none of the orchestration
packages; those install under their own names (``zooaudit_flows``, ``zooaudit_tasks``,
``zooaudit_deployments``, ``zooaudit_infra``), never as top-level ``flows``/``tasks``/``deployments``.
Fast: the core is parsed with :mod:`ast`, nothing of it is imported here."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "zooaudit"
ORCHESTRATION = {"zooaudit_flows": "flows", "zooaudit_tasks": "tasks",
                 "zooaudit_deployments": "deployments", "zooaudit_infra": "infra"}
# Top-level names the core must never import, at module level or inside a function.
FORBIDDEN = {"prefect", "prefect_dask", "flows", "tasks", "deployments", "infra", *ORCHESTRATION}


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _imported_top_levels(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, top-level name)`` of every absolute import in ``tree``, wherever it is written,
    and of ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value.split(".")[0]))
    return out


def test_core_imports_neither_prefect_nor_the_orchestration_packages():
    modules = sorted(CORE.rglob("*.py"))
    assert len(modules) > 10
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {name}"
           for path in modules
           for line, name in _imported_top_levels(ast.parse(path.read_text(), filename=str(path)))
           if name in FORBIDDEN]
    assert not bad, "\n".join(bad)


def test_import_scanner_sees_lazy_and_dynamic_imports():
    tree = ast.parse("def f():\n    from flows.audit_zoo import audit_zoo\n"
                     "    import prefect.artifacts\n    importlib.import_module('zooaudit_tasks.extract')\n"
                     "from .store import Store\n")
    assert [name for _, name in _imported_top_levels(tree)] == ["flows", "prefect", "zooaudit_tasks"]


def test_pyproject_maps_the_orchestration_folders_and_lists_every_core_package():
    setuptools = _setuptools()
    assert setuptools["package-dir"] == ORCHESTRATION
    core = {".".join(p.parent.relative_to(ROOT).parts) for p in CORE.rglob("__init__.py")}
    assert set(setuptools["packages"]) == core | set(ORCHESTRATION)
    for folder in ORCHESTRATION.values():
        assert (ROOT / folder / "__init__.py").is_file(), folder
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"zooaudit": "zooaudit_infra.cli:main"}


def test_installed_names_import_from_anywhere_and_generic_names_do_not(tmp_path):
    """From a directory outside the repository (so the working directory's folders are not on
    ``sys.path``), as a fresh interpreter and so as a Dask worker process would."""
    code = (
        "import importlib, json\n"
        "out = {}\n"
        "for name in ['flows', 'tasks', 'deployments', 'infra', 'zooaudit_flows', 'zooaudit_tasks',\n"
        "             'zooaudit_deployments', 'zooaudit_infra', 'zooaudit_infra.cli', 'zooaudit_infra.stack']:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "        out[name] = True\n"
        "    except ModuleNotFoundError as err:\n"
        "        assert err.name == name, (name, err.name)   # missing itself, not a dependency\n"
        "        out[name] = False\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = __import__("json").loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"flows": False, "tasks": False, "deployments": False, "infra": False,
                   "zooaudit_flows": True, "zooaudit_tasks": True, "zooaudit_deployments": True,
                   "zooaudit_infra": True, "zooaudit_infra.cli": True, "zooaudit_infra.stack": True}

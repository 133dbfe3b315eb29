"""The architecture as a test: the import contracts, no import cycle, short functions, test modules that stand alone,
and stage subpackages that say what they are for.

The contracts themselves live in pyproject.toml ([tool.importlinter]); this module only runs them.
"""
from __future__ import annotations

import ast
import graphlib
import re
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "reweight_audit"
TESTS = ROOT / "tests"
MAX_FUNCTION_LINES = 60  # lines of code, the docstring aside: a function must stay under this

LINT_IMPORTS = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def test_import_contracts_are_kept():
    """import-linter, with the repository's own configuration, finds every contract kept."""
    done = subprocess.run([sys.executable, "-c", LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"import contracts broken:\n{done.stdout}\n{done.stderr}"
    assert "0 broken" in done.stdout, done.stdout


def import_cycle(imports: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated last) in a module -> imported modules map, or None."""
    try:
        tuple(graphlib.TopologicalSorter(imports).static_order())
    except graphlib.CycleError as cycle:
        return list(reversed(cycle.args[1]))  # graphlib lists it importer-last; read it as "a imports b imports ..."
    return None


def package_imports(package: str = PACKAGE) -> dict[str, set[str]]:
    """Every module of the package -> the package's modules it imports, at the top or inside a function."""
    graph = grimp.build_graph(package, exclude_type_checking_imports=True, cache_dir=None)
    return {module: set(graph.find_modules_directly_imported_by(module)) for module in graph.modules}


def test_import_cycle_finder_finds_one():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) in (
        ["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])


def test_no_import_cycle_in_the_package():
    """No module imports, even lazily inside a function, a module that leads back to it."""
    imports = package_imports()
    assert len(imports) > 10  # the graph was built from the package, not from an empty name
    cycle = import_cycle(imports)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def lines_of_code(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """The function's lines, its docstring aside (the rule of /work/shared/hooks/before-stop)."""
    body = function.body
    has_doc = bool(body) and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        and isinstance(body[0].value.value, str)
    doc = body[0].end_lineno - body[0].lineno + 1 if has_doc else 0
    return function.end_lineno - function.lineno + 1 - doc


def long_functions(folder: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:name (n lines of code)' for every function (nested ones included) of limit lines or more."""
    out = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines_of_code(node) >= limit:
                out.append(f"{path.relative_to(ROOT)}:{node.name} ({lines_of_code(node)} lines of code)")
    return out


def test_functions_are_under_60_lines_of_code():
    offenders = long_functions(ROOT / PACKAGE)
    assert not offenders, f"functions of {MAX_FUNCTION_LINES}+ lines of code (split into named stages): " + ", ".join(offenders)


def imported_test_modules(path: Path, test_modules: set[str]) -> list[str]:
    """The test modules (or conftest) that the file imports: import statements anywhere, import_module("...") calls."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] in test_modules]
    return found


def test_no_test_module_imports_another():
    """Shared helpers live in tests/helpers.py, fixtures in conftest.py: a test module imports neither a test module
    nor conftest."""
    test_modules = {p.stem for p in TESTS.glob("test_*.py")} | {"conftest"}
    assert "test_architecture" in test_modules
    offenders = {p.name: found for p in sorted(TESTS.glob("*.py")) if (found := imported_test_modules(p, test_modules))}
    assert not offenders, f"test modules importing test modules (move the helper to tests/helpers.py): {offenders}"


def subpackage_docstring_problem(init: Path) -> str | None:
    """Why the subpackage's __init__.py does not open with a docstring saying its job and what it may import."""
    doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
    if doc is None:
        return "no docstring"
    if len(doc.split()) < 8:
        return f"a docstring of a few words ({doc!r}), not its job and what it may import"
    if not re.search(r"\bimports?\b", doc, re.IGNORECASE):
        return "the docstring does not say what the subpackage may import"
    return None


def test_every_stage_subpackage_says_its_job_and_its_imports():
    inits = sorted((ROOT / PACKAGE).glob("*/__init__.py"))
    assert {p.parent.name for p in inits} >= {"core", "injection", "scoring", "evaluation", "reporting", "training",
                                               "methods"}
    problems = {str(p.relative_to(ROOT)): why for p in inits if (why := subpackage_docstring_problem(p))}
    assert not problems, f"stage subpackages without a docstring saying their job and imports: {problems}"

"""The packages' import boundaries: ``dataspace_core`` imports neither side, the
client never imports the worker, and the worker imports the client only where it
acts as a client of its own service (``--demo``). Read from the source (AST), so
that an import hidden inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "dataspace_core": ROOT / "core" / "dataspace_core",
    "dataspace_client": ROOT / "client" / "dataspace_client",
    "dataspace_worker": ROOT / "worker" / "dataspace_worker",
}
#: package -> packages of this project it must not import
FORBIDDEN = {
    "dataspace_core": {"dataspace_client", "dataspace_worker"},
    "dataspace_client": {"dataspace_worker"},
    "dataspace_worker": {"dataspace_client"},
}
#: (module, function) allowed to break that rule, and why
ALLOWED = {
    ("dataspace_worker.cli", "run_demo"): "--demo is a client of the worker it started",
}


def _imports(path: Path):
    """(imported module, enclosing function or None) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = function
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = child.name
            if isinstance(child, ast.Import):
                found.extend((alias.name, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, function))
            visit(child, inner)

    visit(tree, None)
    return found


def _modules():
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield package, ".".join((package, *parts)), path


@pytest.mark.parametrize("package, module, path", list(_modules()), ids=lambda v: str(v))
def test_a_module_imports_only_what_its_layer_may(package, module, path):
    wrong = [
        (imported, function)
        for imported, function in _imports(path)
        if imported.split(".")[0] in FORBIDDEN[package] and (module, function) not in ALLOWED
    ]
    assert not wrong, f"{module} imports {wrong}: move what both sides need to dataspace_core"


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from dataspace_worker import cli\n")
    assert _imports(source) == [("dataspace_worker", "f")]


def test_every_module_of_a_subpackage_is_read():
    names = {module for _, module, _ in _modules()}
    assert {"dataspace_client.cli", "dataspace_client.cli.status"} <= names

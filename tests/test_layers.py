"""The packages' import boundaries: ``dataspace_core`` imports neither side, the
client never imports the worker, and the worker imports the client only where it
acts as a client of its own service (``--demo``). And the tests' own: no module
under tests/ imports a test module or a conftest (shared helpers live in
tests/support/). Read from the source (AST), so that an import hidden inside a
function counts too."""

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


# -- the tests' own imports -------------------------------------------------------------
TESTS = ROOT / "tests"


def _test_module_imports(path: Path, source: str | None = None) -> list[str]:
    """The test modules and conftest files ``path`` imports, as paths under tests/: a
    helper they share belongs in tests/support/ (or, for the fault tests only, a
    helper module of tests/faults/), where every module that uses it imports it from.
    Relative imports are resolved against ``path``'s package; ``from X import name``
    counts when X.name is a module (``from tests import test_lanes``). ``source``: the
    text to read instead of the file's."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    package = path.relative_to(ROOT).parent.parts
    candidates: list[tuple[str, ...]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates += [tuple(alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            base += tuple(node.module.split(".")) if node.module else ()
            candidates.append(base)
            candidates += [(*base, alias.name) for alias in node.names]
    wrong = []
    for parts in candidates:
        if parts[:1] != ("tests",):
            continue
        module = ROOT.joinpath(*parts).with_suffix(".py")
        if module.is_file() and (module.name.startswith("test_") or module.name == "conftest.py"):
            wrong.append(str(module.relative_to(ROOT)))
    return wrong


@pytest.mark.parametrize(
    "path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS))
)
def test_no_test_module_imports_another_or_a_conftest(path):
    wrong = _test_module_imports(path)
    assert not wrong, (
        f"{path.relative_to(ROOT)} imports {wrong}: move what it needs to tests/support/"
    )


@pytest.mark.parametrize(
    "source, imported",
    [
        ("from tests.test_lanes import lanes_space", ["tests/test_lanes.py"]),
        ("from tests import test_protocol", ["tests/test_protocol.py"]),
        ("import tests.conftest", ["tests/conftest.py"]),
        ("from tests.faults.test_hosts import Loads", ["tests/faults/test_hosts.py"]),
        ("from .test_hosts import Loads", ["tests/faults/test_hosts.py"]),
        ("from .conftest import worker_env", ["tests/faults/conftest.py"]),
        ("from . import conftest", ["tests/faults/conftest.py"]),
        ("from ..test_lanes import lanes_space", ["tests/test_lanes.py"]),
        ("def f():\n    from tests.test_protocol import RawClient", ["tests/test_protocol.py"]),
        ("from tests.support.lanes import lanes_space", []),
        ("from .load import Load\nfrom tests import services", []),
    ],
)
def test_the_check_resolves_each_form_of_import(source, imported):
    """Each form, read as if it were a module of tests/faults/."""
    assert _test_module_imports(TESTS / "faults" / "check_me.py", source) == imported


#: a module or a class past these sizes holds more than one job: split it (the
#: redesign's aim is ~400 and ~250; these leave a little room, not a lot)
MAX_MODULE_LINES = 420
MAX_CLASS_LINES = 260


def _product_modules():
    return sorted(p for root in PACKAGES.values() for p in root.rglob("*.py"))


@pytest.mark.parametrize("path", _product_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_or_class_grows_past_its_size(path):
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split it by concern"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name} is {size} lines: split it"

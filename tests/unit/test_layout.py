"""The layout a new engineer relies on: small classes, modules that say what they own, tests where they belong.

- No class of the package is longer than 300 lines (`end_lineno - lineno + 1` of its definition).
- Every module of the package has a docstring (generated code aside).
- Every test file lives in `tests/unit`, `tests/runtime` or `tests/integration`; helpers live in
  `tests/support`, and no test imports another test module (what two tests share is a helper).
  `tests/chaos` is the chaos suite (`make chaos`): its harness modules and its own tests, together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "supervisor_service"
TESTS = ROOT / "tests"
MAX_CLASS_LINES = 300
TEST_DIRS = ("unit", "runtime", "integration")


def package_files() -> list[Path]:
    """The package's own source: the generated protobuf code (`make proto`) is not ours to shape."""
    return [p for p in sorted(SOURCE.rglob("*.py")) if "_proto" not in p.relative_to(SOURCE).parts]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_class_is_longer_than_300_lines():
    offenders = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    offenders.append(f"{rel(path)}:{node.lineno} class {node.name}: {lines} lines")
    assert not offenders, f"classes over {MAX_CLASS_LINES} lines:\n" + "\n".join(offenders)


def test_every_module_has_a_docstring():
    missing = [rel(p) for p in package_files() if not (ast.get_docstring(ast.parse(p.read_text())) or "").strip()]
    assert not missing, "modules without a docstring (say what the module owns):\n" + "\n".join(missing)


def test_every_test_file_lives_in_unit_runtime_or_integration_and_helpers_in_support():
    misplaced = []
    for path in sorted(TESTS.rglob("*.py")):
        parts = path.relative_to(TESTS).parts
        if len(parts) == 1:
            ok = parts[0] in ("__init__.py", "conftest.py")
        elif len(parts) == 2 and parts[0] in TEST_DIRS:
            ok = parts[1] == "__init__.py" or parts[1].startswith("test_")
        elif len(parts) == 2 and parts[0] == "support":
            ok = not parts[1].startswith("test_")
        elif len(parts) == 2 and parts[0] == "chaos":
            ok = True  # a runnable package (python -m tests.chaos): harness modules and test_*.py
        else:
            ok = False
        if not ok:
            misplaced.append(rel(path))
    for directory in (*TEST_DIRS, "support"):
        if not (TESTS / directory / "__init__.py").is_file():
            misplaced.append(f"tests/{directory}/__init__.py is missing")
    assert not misplaced, (
        "test files belong in tests/unit, tests/runtime or tests/integration (named test_*.py), "
        "helpers in tests/support:\n" + "\n".join(misplaced))


def test_no_test_module_imports_another_test_module():
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("tests.") and name.rpartition(".")[2].startswith("test_"):
                    offenders.append(f"{rel(path)}:{node.lineno} imports {name}")
    assert not offenders, "shared test code belongs in tests/support:\n" + "\n".join(offenders)
